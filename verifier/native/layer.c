/* One layer's replay steps between the opened rows and the attention, and after it, in one call
 * each (verifier/native/layer.py; replay.py's fused route): the same compiled routines the
 * step-by-step route calls from Python one by one (bridge.c, freivalds.c), in the spec's order,
 * so every value is the one that route computes, without some 25 calls from Python per layer.
 *
 * These routines decide nothing. They return 0 when every step ran and every Freivalds check
 * passed, and 1 when a step could not run here (a non-finite value, a width beyond a routine's
 * limit, an accumulator beyond its bound) or a check failed: the caller then replays the layer
 * on the step-by-step route, which raises the rejection with its reason in the spec's order of
 * checks. So a verdict, its reason and its detail never depend on which route ran.
 *
 * ly_pre: x rows [t][hidden] -> RMSNorm -> quantize -> the qkv linear (its packed accumulators
 * decoded, checked by Freivalds, dequantized) -> q, k, v heads (head norms when the family has
 * them) -> RoPE on q and k -> q, k, v quantized per head: what the attention and the K/V
 * comparison read.
 * ly_post: attention output o [n][q_size] -> quantize -> the o linear + x -> h -> RMSNorm ->
 * quantize -> gate_up -> SwiGLU -> quantize -> down + h: the layer's output rows, which the
 * caller compares with the committed x_{l+1}.
 * ly_layer: the whole dense layer in one call: the x_l and RoPE rows gathered by index from the
 * opened tables, ly_pre, attn.c's attn_layer (its K/V row checks included), ly_post, and the
 * output rows compared with the opened x_{l+1} rows as floats (np.array_equal's ==), so the
 * Python around a layer is one call instead of three calls, two gathers and a comparison.
 * The argument structs: layer.h.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime and pthread keys under -std=c11 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>

#include "layer.h"

int64_t br_rmsnorm(const float *x, int64_t rows, int64_t h, int64_t xs, const float *w,
                   float eps, float *y);
int64_t br_quantize(const float *x, int64_t rows, int64_t k, int64_t xs, int64_t qmax,
                    int64_t qbytes, void *q, float *s);
int64_t br_dequant(const int64_t *z, int64_t rows, int64_t n, const float *sx, const float *sw,
                   const float *bias, const float *resid, int64_t rs, float *y);
int64_t br_swiglu(const float *g, const float *u, int64_t rows, int64_t n, int64_t gs,
                  int64_t us, float neg_log2e, const float *coefs, float *out);
int64_t br_rope(const float *x, int64_t t, int64_t heads, int64_t d, int64_t xs, int64_t hs,
                const float *cos, const float *sin, float *out);
int64_t fv_dot(const int64_t *a, int64_t n, const void *b, int64_t btype, int64_t rows,
               int64_t bound, uint64_t *out);
int64_t fv_acc_linear(const int64_t *a, int64_t n, const uint8_t *zp, int64_t w, int64_t rows,
                      int64_t bound, uint64_t *out, const float *sx, const float *sw,
                      const float *bias, const float *resid, int64_t rs, float *y);

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int64_t qbytes_of(int64_t qmax) { return qmax <= 127 ? 1 : 2; } /* quant.int_dtype */

/* The linear's packed accumulators (parts, rows in order) in one pass each (freivalds.c's
 * fv_acc_linear: every |z| within the bound, r z_m mod P, dequantized into y, + resid), then
 * v qx_m mod P over the quantized input rows, which must equal r z_m row by row: 0, else 1. */
static int64_t linear(const ly_linear *L, const ly_acc *parts, int64_t nparts, const void *qx,
                      int64_t qmax, const float *sx, const float *resid, uint64_t *fa,
                      uint64_t *fb, float *y, double *fv_seconds) {
    int64_t rows = 0;
    const double t0 = now();
    for (int64_t i = 0; i < nparts; i++) {
        const int64_t r = parts[i].rows;
        if (r && fv_acc_linear(L->r, L->n, parts[i].z, parts[i].w, r, L->bound, fa + rows,
                               sx + rows, L->s, L->bias, resid ? resid + rows * L->n : NULL,
                               L->n, y + rows * L->n))
            return 1;
        rows += r;
    }
    const int64_t bad = fv_dot(L->v, L->k, qx, qbytes_of(qmax), rows, qmax, fb);
    *fv_seconds += now() - t0;
    if (bad) return 1;
    for (int64_t m = 0; m < rows; m++)
        if (fa[m] != fb[m]) return 1;
    return 0;
}

static int64_t max3(int64_t a, int64_t b, int64_t c) {
    const int64_t m = a > b ? a : b;
    return m > c ? m : c;
}

/* Scratch buffers carved from one allocation, each 64-byte aligned. The allocation is the
 * calling thread's and kept for its next call (grown when a call needs more, freed when the
 * thread ends): at a deep tier's 128 rows of a 70B layer it is some 60 MB, which malloc maps
 * afresh, and the kernel faults in page by page, on every call otherwise. */
typedef struct {
    char *base, *p;
} arena;

struct held {
    char *base;
    size_t size;
};
/* slot 0: ly_pre's and ly_post's scratch; slot 1: what ly_layer passes between them */
static pthread_key_t held_key[2];
static pthread_once_t held_once = PTHREAD_ONCE_INIT;
static int held_ok;

static void held_free(void *v) {
    struct held *t = v;
    free(t->base);
    free(t);
}

static void held_init(void) {
    held_ok = pthread_key_create(&held_key[0], held_free) == 0
              && pthread_key_create(&held_key[1], held_free) == 0;
}

static char *held_get(int slot, size_t need) {
    pthread_once(&held_once, held_init);
    if (!held_ok) return NULL;
    struct held *t = pthread_getspecific(held_key[slot]);
    if (!t) {
        t = calloc(1, sizeof *t);
        if (!t || pthread_setspecific(held_key[slot], t)) {
            free(t);
            return NULL;
        }
    }
    if (t->size < need) {
        free(t->base);
        t->base = malloc(need);
        t->size = t->base ? need : 0;
    }
    return t->base;
}

static int arena_open(arena *A, int slot, const size_t *sizes, int count) {
    size_t need = 64;
    for (int i = 0; i < count; i++) need += (sizes[i] + 63) & ~(size_t)63;
    A->base = held_get(slot, need);
    A->p = A->base ? (char *)(((uintptr_t)A->base + 63) & ~(uintptr_t)63) : NULL;
    return A->base != NULL;
}

static void *carve(arena *A, size_t size) {
    void *out = A->p;
    A->p += (size + 63) & ~(size_t)63;
    return out;
}

int64_t ly_pre(ly_pre_args *a) {
    const int64_t t = a->t, h = a->hidden, d = a->head_dim, nh = a->heads, nkv = a->kv_heads;
    const int64_t nq = a->qkv.n, qs = nh * d, ks = nkv * d;
    a->fv_seconds = 0.0;
    if (t < 1 || h < 1 || d < 2 || d % 2 || nh < 1 || nkv < 1 || nq != qs + 2 * ks
        || a->qkv.k != h || a->z[0].rows + a->z[1].rows != t)
        return 1;
    const int64_t kvb = qbytes_of(a->kv_qmax);
    const size_t T = (size_t)t;
    /* normed x, qkv, rotated q and k, head-normed q and k (when there), the Freivalds residues,
     * the activation scales and the quantized activations */
    const size_t sizes[] = {T * h * 4, T * nq * 4, T * qs * 4, T * ks * 4, T * (qs + ks) * 4,
                            T * 8, T * 8, T * 4, T * h * 2};
    arena A;
    if (!arena_open(&A, 0, sizes, 9)) return 1;
    float *an = carve(&A, sizes[0]);
    float *qkv = carve(&A, sizes[1]);
    float *rq = carve(&A, sizes[2]);
    float *rk = carve(&A, sizes[3]);
    float *nrm = carve(&A, sizes[4]);
    uint64_t *fa = carve(&A, sizes[5]);
    uint64_t *fb = carve(&A, sizes[6]);
    float *sx = carve(&A, sizes[7]);
    void *qx = carve(&A, sizes[8]);
    int64_t rc = 1;
    if (br_rmsnorm(a->x, t, h, h, a->norm, a->eps, an)) goto done;
    if (br_quantize(an, t, h, h, a->act_qmax, qbytes_of(a->act_qmax), qx, sx)) goto done;
    if (linear(&a->qkv, a->z, 2, qx, a->act_qmax, sx, NULL, fa, fb, qkv, &a->fv_seconds))
        goto done;
    /* q [t][nh][d] at offset 0, k at qs, v at qs + ks of each qkv row (forward.split_qkv) */
    const float *qsrc = qkv, *ksrc = qkv + qs;
    int64_t qrs = nq, krs = nq; /* the token strides of what RoPE reads */
    if (a->q_norm) {            /* forward.head_norm: RMSNorm over each head's d values */
        for (int64_t r = 0; r < t; r++)
            if (br_rmsnorm(qkv + r * nq, nh, d, d, a->q_norm, a->eps, nrm + r * qs)
                || br_rmsnorm(qkv + r * nq + qs, nkv, d, d, a->k_norm, a->eps,
                              nrm + (size_t)t * qs + r * ks))
                goto done;
        qsrc = nrm, ksrc = nrm + (size_t)t * qs, qrs = qs, krs = ks;
    }
    if (br_rope(qsrc, t, nh, d, qrs, d, a->cos, a->sin, rq)
        || br_rope(ksrc, t, nkv, d, krs, d, a->cos, a->sin, rk))
        goto done;
    if (br_quantize(rq, t * nh, d, d, a->kv_qmax, kvb, a->q, a->sq)
        || br_quantize(rk, t * nkv, d, d, a->kv_qmax, kvb, a->k, a->sk))
        goto done;
    for (int64_t r = 0; r < t; r++) /* v: rows of d inside each token's qkv row */
        if (br_quantize(qkv + r * nq + qs + ks, nkv, d, d, a->kv_qmax, kvb,
                        (char *)a->v + (size_t)r * ks * kvb, a->sv + r * nkv))
            goto done;
    rc = 0;
done:
    return rc;
}

int64_t ly_post(ly_post_args *a) {
    const int64_t n = a->n, h = a->hidden, f = a->inter, qs = a->q_size;
    a->fv_seconds = 0.0;
    if (n < 1 || h < 1 || f < 1 || qs < 1 || a->lo.n != h || a->lo.k != qs
        || a->gate_up.n != 2 * f || a->gate_up.k != h || a->down.n != h || a->down.k != f
        || a->z_o.rows != n || a->z_gate_up.rows != n || a->z_down.rows != n)
        return 1;
    const int64_t qb = qbytes_of(a->act_qmax), wide = max3(qs, h, f);
    const size_t N = (size_t)n;
    /* gate_up, h, the normed h, the activation, the Freivalds residues, the activation scales
     * and the quantized activations */
    const size_t sizes[] = {N * 2 * f * 4, N * h * 4, N * h * 4, N * f * 4, N * 8, N * 8, N * 4,
                            N * wide * 2};
    arena A;
    if (!arena_open(&A, 0, sizes, 8)) return 1;
    float *gu = carve(&A, sizes[0]);
    float *hh = carve(&A, sizes[1]);
    float *m = carve(&A, sizes[2]);
    float *act = carve(&A, sizes[3]);
    uint64_t *fa = carve(&A, sizes[4]);
    uint64_t *fb = carve(&A, sizes[5]);
    float *sx = carve(&A, sizes[6]);
    void *qx = carve(&A, sizes[7]);
    int64_t rc = 1;
    if (br_quantize(a->o, n, qs, qs, a->act_qmax, qb, qx, sx)
        || linear(&a->lo, &a->z_o, 1, qx, a->act_qmax, sx, a->x, fa, fb, hh,
                  &a->fv_seconds))
        goto done;
    if (br_rmsnorm(hh, n, h, h, a->norm, a->eps, m)
        || br_quantize(m, n, h, h, a->act_qmax, qb, qx, sx)
        || linear(&a->gate_up, &a->z_gate_up, 1, qx, a->act_qmax, sx, NULL, fa, fb, gu,
                  &a->fv_seconds))
        goto done;
    if (br_swiglu(gu, gu + f, n, f, 2 * f, 2 * f, a->neg_log2e, a->coefs, act)
        || br_quantize(act, n, f, f, a->act_qmax, qb, qx, sx)
        || linear(&a->down, &a->z_down, 1, qx, a->act_qmax, sx, hh, fa, fb, a->out,
                  &a->fv_seconds))
        goto done;
    rc = 0;
done:
    return rc;
}

static int rows_equal(const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++) /* as floats: -0 == +0, NaN equals nothing (np.array_equal) */
        if (!(a[i] == b[i])) return 0;
    return 1;
}

static int indices_ok(const int64_t *idx, int64_t count, int64_t rows) {
    for (int64_t i = 0; i < count; i++)
        if (idx[i] < 0 || idx[i] >= rows) return 0;
    return 1;
}

/* A whole dense layer, as replay.py's fused route ran it in three calls from Python: its x_l
 * rows and RoPE rows gathered by index, ly_pre, attn_layer over all rows (its checks included),
 * ly_post, and the output rows compared with the opened x_{l+1} rows of the challenged
 * positions. 0: every step ran and every check passed (the layer is accepted); 1: not answered
 * (the step route decides). */
int64_t ly_layer(ly_layer_args *a) {
    ly_pre_args *P = &a->pre;
    attn_layer_args *T = &a->att;
    ly_post_args *Q = &a->post;
    a->fv_seconds = a->attn_seconds = 0.0;
    const int64_t t = P->t, n = Q->n, h = P->hidden, nh = P->heads, nkv = P->kv_heads;
    const int64_t d = P->head_dim, es = qbytes_of(P->kv_qmax);
    if (t < 1 || n < 1 || n > t || h < 1 || d < 2 || d % 2 || nh < 1 || nkv < 1 || T->t != t
        || T->n != n || T->heads != nh || T->kv_heads != nkv || T->d != d || T->es != es
        || Q->hidden != h || Q->q_size != nh * d || !indices_ok(a->x_idx, t, a->x_rows)
        || !indices_ok(a->rope_idx, t, a->rope_rows) || !indices_ok(a->y_idx, n, a->y_rows))
        return 1;
    const size_t T_ = (size_t)t, N = (size_t)n, half = (size_t)d / 2;
    /* x, cos, sin, q, k, v, their scales, the attention's output, the layer's output */
    const size_t sizes[] = {T_ * h * 4, T_ * half * 4, T_ * half * 4, T_ * nh * d * es,
                            T_ * nkv * d * es, T_ * nkv * d * es, T_ * nh * 4, T_ * nkv * 4,
                            T_ * nkv * 4, N * nh * d * 4, N * h * 4};
    arena A;
    if (!arena_open(&A, 1, sizes, 11)) return 1;
    float *x = carve(&A, sizes[0]), *cs = carve(&A, sizes[1]), *sn = carve(&A, sizes[2]);
    void *q = carve(&A, sizes[3]), *k = carve(&A, sizes[4]), *v = carve(&A, sizes[5]);
    float *sq = carve(&A, sizes[6]), *sk = carve(&A, sizes[7]), *sv = carve(&A, sizes[8]);
    float *o = carve(&A, sizes[9]), *out = carve(&A, sizes[10]);
    for (int64_t i = 0; i < t; i++) {
        memcpy(x + i * h, a->x_tab + a->x_idx[i] * h, sizeof(float) * h);
        memcpy(cs + i * half, a->cos_tab + a->rope_idx[i] * half, sizeof(float) * half);
        memcpy(sn + i * half, a->sin_tab + a->rope_idx[i] * half, sizeof(float) * half);
    }
    P->x = x, P->cos = cs, P->sin = sn, P->q = q, P->k = k, P->v = v;
    P->sq = sq, P->sk = sk, P->sv = sv;
    const int64_t pre = ly_pre(P);
    a->fv_seconds += P->fv_seconds;
    if (pre) return 1;
    T->q = q, T->sq = sq, T->k = k, T->v = v, T->sk = sk, T->sv = sv, T->out = o;
    const double t0 = now();
    const int64_t att = attn_layer(T, 0, nh * n, 1);
    a->attn_seconds = now() - t0;
    if (att) return 1;
    Q->o = o, Q->x = x, Q->out = out;
    const int64_t post = ly_post(Q);
    a->fv_seconds += Q->fv_seconds;
    if (post) return 1;
    if (a->out) memcpy(a->out, out, sizeof(float) * N * h);
    for (int64_t i = 0; i < n; i++)
        if (!rows_equal(out + i * h, a->y_tab + a->y_idx[i] * h, h)) return 1;
    return 0;
}
