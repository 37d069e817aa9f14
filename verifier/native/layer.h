/* The argument structs of the verifier's fused layer route (layer.c, attn.c; their ctypes
 * twins: layer.py, which must list the same fields in the same order). */
#ifndef COMMITLLM_LAYER_H
#define COMMITLLM_LAYER_H
#include <stdint.h>

/* attn.c's attn_layer: one layer's attention step on the fused route (see there). */
typedef struct {
    int64_t t, n, heads, kv_heads, d, es;  /* es: the bytes of q, k, v elements (1 or 2) */
    const void *q;                         /* [t][heads][d] */
    const float *sq;                       /* [t][heads] */
    const void *k, *v;                     /* derived [t][kv_heads][d] */
    const float *sk, *sv;                  /* derived [t][kv_heads] */
    const int64_t *pos;                    /* [t]: the challenged positions, then the sample's */
    int64_t n_kv;
    const int64_t *kpos;                   /* opened positions [n_kv], sorted */
    const void *k_all, *v_all;             /* opened [n_kv][kv_heads][d], contiguous */
    const float *sk_all, *sv_all;          /* opened [n_kv][kv_heads] */
    int64_t window;                        /* keys a query sees (sliding window), or 0: all */
    float scale, frac;
    const int32_t *table;
    int64_t cut;
    float *out;                            /* [n][heads * d] */
} attn_layer_args;

/* A linear y = dequantize(W q(x)) with W [n][k]: its secret rows and scales from the key. */
typedef struct {
    const int64_t *r;  /* the secret row's residues [n] */
    const int64_t *v;  /* v = r W mod P [k] */
    const float *s;    /* weight scales [n] */
    const float *bias; /* [n] or NULL */
    int64_t n, k;
    int64_t bound;     /* k * qmax_x * qmax_w: every |z| must be within it */
} ly_linear;

/* Packed accumulator rows (opening version 2): rows x n values of w bytes each. */
typedef struct {
    const uint8_t *z;
    int64_t rows, w;
} ly_acc;

typedef struct {
    int64_t t, hidden, heads, kv_heads, head_dim;
    int64_t act_qmax, kv_qmax;
    float eps;
    const float *x;      /* [t][hidden] */
    const float *norm;   /* attn_norm [hidden] */
    const float *q_norm; /* [head_dim] or NULL (no head norms) */
    const float *k_norm;
    ly_linear qkv;
    ly_acc z[2];         /* the challenged rows, then the K/V sample's rows: t rows in all */
    const float *cos, *sin; /* [t][head_dim / 2] */
    void *q, *k, *v;     /* [t][heads or kv_heads][head_dim], int8 or int16 (kv_qmax) */
    float *sq, *sk, *sv; /* [t][heads or kv_heads] */
    double fv_seconds;   /* out: time spent in the Freivalds dot products */
} ly_pre_args;

typedef struct {
    int64_t n, hidden, inter, q_size;
    int64_t act_qmax;
    float eps, neg_log2e;
    const float *coefs;  /* exp2's 8 coefficients */
    const float *o;      /* [n][q_size] */
    const float *x;      /* [n][hidden] */
    const float *norm;   /* mlp_norm [hidden] */
    ly_linear lo, gate_up, down;
    ly_acc z_o, z_gate_up, z_down;
    float *out;          /* [n][hidden] */
    double fv_seconds;
} ly_post_args;

/* ly_layer: a whole dense layer in one call (layer.c). The caller fills pre, att and post but
 * for the arrays ly_layer makes and passes on itself (pre's x, cos, sin, q, k, v, sq, sk, sv;
 * att's q, sq, k, v, sk, sv, out; post's o, x, out), and gives the rows to gather by index. */
typedef struct {
    ly_pre_args pre;
    attn_layer_args att;
    ly_post_args post;
    const float *x_tab;      /* the opened x_l rows [x_rows][hidden] */
    int64_t x_rows;
    const int64_t *x_idx;    /* [t]: the row of each position (challenged, then the sample's) */
    const float *y_tab;      /* the opened x_{l+1} rows [y_rows][hidden] */
    int64_t y_rows;
    const int64_t *y_idx;    /* [n]: the row of each challenged position */
    const float *cos_tab, *sin_tab; /* RoPE rows [rope_rows][head_dim / 2] */
    int64_t rope_rows;
    const int64_t *rope_idx; /* [t]: the RoPE row of each position */
    float *out;              /* [n][hidden] or NULL: a copy of the layer's output rows */
    double fv_seconds;       /* out: the time in Freivalds dot products */
    double attn_seconds;     /* out: the time in attn_layer */
} ly_layer_args;

int64_t attn_layer(const attn_layer_args *A, int64_t row0, int64_t rows, int64_t checks);
int64_t ly_pre(ly_pre_args *a);
int64_t ly_post(ly_post_args *a);
int64_t ly_layer(ly_layer_args *a);

#endif
