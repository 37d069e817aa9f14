/* The softmax passes of the spec's integer attention (verifier/numerics/attention.py), one query
 * row at a time, for the engine's CPU backend and the verifier.
 *
 * Every float operation is the spec's, in the spec's order, in IEEE binary32 with round to
 * nearest even: the build uses -ffp-contract=off and no fast-math, and refuses a target that
 * evaluates float expressions in wider precision (FLT_EVAL_METHOD != 0). Integer steps are exact.
 *
 * For row r of R (keys 0..nvis[r]-1 visible, the rest hidden):
 *   t_j = f32(f32(f32(f32(s_j * sq_r) * sk_j) * scale) * frac)   s_j: the exact score as f32
 *                                     (scores given as f32, or as f64 when f64 != 0)
 *   l_j = clamp(rint(t_j), -LOGIT_CLAMP, LOGIT_CLAMP)            integer logits
 *   w_j = table[min(max_l - l_j, cut)]                            the spec's table_weights
 *   z_r = sum_j w_j
 *   p_j = f32(f32(w_j) * 2^-15) * sv_j,  m_r = max_j p_j
 *   c_j = rint(f32(f32(p_j / m_r) * 2^15))                        0 for hidden keys
 * Rows of one K/V group share sk, sv (rows_per_group consecutive rows per group). The call
 * computes rows row0 .. row0 + rows - 1 of s, sq, nvis, c, z and m (pointers at those rows);
 * sk and sv point at group 0.
 */
#include "exact.h"
#include "layer.h"

#define LOGIT_CLAMP 1073741824.0f /* 2^30 */

int64_t commitllm_native_abi(void) { return 15; }


/* The spec's per-row softmax passes over fp32 scores sr[0..n): p_j (fp32) into p, Z and M.
 * 0 on success; -1: the value scale underflowed to 0 (or was NaN); -2: a logit was NaN. */
CLONES static int row_pass(const float *sr, int64_t n, float sqr, const float *skg,
                           const float *svg, float scale, float frac, const int32_t *table,
                           int64_t cut, int32_t *lg, float *p, int64_t *z, float *m) {
    int32_t top = INT32_MIN, bad = 0;
    for (int64_t j = 0; j < n; j++) {
        float t = sr[j] * sqr;
        t = t * skg[j];
        t = t * scale;
        t = t * frac;
        float l = rint_even(t);
        l = l > LOGIT_CLAMP ? LOGIT_CLAMP : l;
        l = l < -LOGIT_CLAMP ? -LOGIT_CLAMP : l;
        p[j] = l;  /* scratch: the clamped logit (NaN stays NaN) */
    }
    for (int64_t j = 0; j < n; j++) {
        const float l = p[j];
        const int32_t nan = l != l;
        bad |= nan;
        const int32_t li = (int32_t)(nan ? 0.0f : l);
        lg[j] = li;
        top = li > top ? li : top;
    }
    if (bad) return -2;
    /* distances min(top - l, cut) without int32 overflow: logits below top - cut are raised to it */
    const int32_t low = (int32_t)((int64_t)top - cut), icut = (int32_t)cut;
    const float coef_down = 1.0f / 32768.0f;
    int64_t zr = 0;
    int32_t mbits = 0;  /* max of p as bits: p >= 0 is ordered like its bit pattern */
    for (int64_t j = 0; j < n; j++) {
        const int32_t l = lg[j] < low ? low : lg[j];
        int32_t dist = top - l;
        dist = dist > icut ? icut : dist;
        const int32_t w = table[dist];
        zr += w;
        float pj = (float)w * coef_down;
        pj = pj * svg[j];
        p[j] = pj;
        int32_t bits;
        memcpy(&bits, &pj, 4);
        mbits = bits > mbits ? bits : mbits;
    }
    float mr;
    memcpy(&mr, &mbits, 4);
    if (!(mr > 0.0f)) return -1;
    *z = zr;
    *m = mr;
    return 0;
}

/* c_j = rint(f32(f32(p_j / m) * 2^15)), an integer in [0, 2^15]. */
static inline float coef(float pj, float m) {
    float q = pj / m;
    q = q * 32768.0f;
    return rint_even(q);
}

CLONES static void coefs_f64(const float *p, int64_t n, float m, double *c) {
    for (int64_t j = 0; j < n; j++) c[j] = (double)coef(p[j], m);
}

/* the coefficients as the planes c = 256 * hi + lo, hi in [0, 128], lo in [0, 255]; p is
 * overwritten with the coefficients as fp32 */
CLONES static void coef_planes(float *p, int64_t n, float m, int16_t *hi, int16_t *lo) {
    for (int64_t j = 0; j < n; j++) p[j] = coef(p[j], m);
    for (int64_t j = 0; j < n; j++) {
        const int32_t c = (int32_t)p[j];
        hi[j] = (int16_t)(c >> 8);
        lo[j] = (int16_t)(c & 255);
    }
}

/* exact integer scores (|s| < 2^53) to binary32 through binary64, as the spec rounds them:
 * by exact.h's f64_of_small (vectorized on AVX2; |s| <= d qmax^2 is below 2^51 for every head
 * width the spec allows at int16), a row with a score from 2^51 on the plain way */
CLONES static void scores_f32(const int64_t *s, int64_t n, float *row) {
    int wide = 0;
    for (int64_t j = 0; j < n; j++) {
        wide |= (s[j] >= F64_SMALL_LIMIT) | (s[j] < -F64_SMALL_LIMIT);
        row[j] = (float)f64_of_small(s[j]);
    }
    if (wide)
        for (int64_t j = 0; j < n; j++) row[j] = (float)(double)s[j];
}

/* 0 on success; -1: a row's value scale underflowed to 0; -2: a logit was NaN; -3: no memory. */
int64_t attn_coefs(const void *scores, int64_t f64, int64_t row0, int64_t rows, int64_t n_keys, const float *sq,
                   const float *sk, const float *sv, int64_t rows_per_group,
                   const int64_t *nvis, float scale, float frac, const int32_t *table,
                   int64_t cut, double *c, int64_t *z, float *m) {
    const size_t width = (size_t)(n_keys > 0 ? n_keys : 1);
    int32_t *lg = malloc(sizeof(int32_t) * width);
    float *row = malloc(sizeof(float) * width);
    float *p = malloc(sizeof(float) * width);
    if (!lg || !row || !p) { free(lg); free(row); free(p); return -3; }
    int64_t code = 0;
    for (int64_t r = 0; r < rows && !code; r++) {
        const float *sr = (const float *)scores + r * n_keys;
        const int64_t grp = (row0 + r) / rows_per_group;
        double *cr = c + r * n_keys;
        int64_t n = nvis[r];
        if (n > n_keys) n = n_keys;
        if (n < 0) n = 0;
        if (f64) {  /* exact integer scores in binary64: rounded once to binary32, as the spec */
            const double *d = (const double *)scores + r * n_keys;
            for (int64_t j = 0; j < n; j++) row[j] = (float)d[j];
            sr = row;
        }
        code = row_pass(sr, n, sq[r], sk + grp * n_keys, sv + grp * n_keys, scale, frac, table,
                        cut, lg, p, z + r, m + r);
        if (code) break;
        coefs_f64(p, n, m[r], cr);
        for (int64_t j = n; j < n_keys; j++) cr[j] = 0.0;
    }
    free(lg);
    free(row);
    free(p);
    return code;
}

/* ------------------------------------------------------------------------------------------
 * The whole attention of the spec, integer products included (attn_fused).
 *
 * Scores s = q . k and value sums A_i = sum_j c_j v_ji are exact integers (int64). They are
 * computed with 16-bit pair products summed in int32, which cannot overflow by these bounds:
 *   q = 256 * qh + ql with qh, ql in [-128, 128] (any int16; a8 rows are one plane, qh = q),
 *   so a pair of products qh*k is at most 2 * 128 * 2^15 = 2^23 and 128 pairs (256 dims) stay
 *   below 2^30 before they are widened into int64;
 *   c = 256 * ch + cl with ch in [0, 128], cl in [0, 255], so a pair of cl*v is below 2^24 and
 *   64 pairs (128 keys) stay below 2^30 before they are widened.
 * Any order of exact integer sums gives the same integers, so the SIMD routes (AVX-512 VNNI,
 * AVX2) and the plain C one agree bit for bit; tests compare each with the numpy spec.
 *
 * Layouts (prepared by commitllm.verifier.native.prepare):
 *   qh, ql  int16 [rows][dp]           query planes, dp = head dim rounded up to even (zeros)
 *   kp      int16 [G][nkb][dp/2][16][2] keys in blocks of 16; lane = key, pair = 2 dims
 *   vp      int16 [G][nvp][dv][2]      values in pairs of keys; lane = dim, dv = dim up to 32
 *   sk, sv  fp32 [G][S]; sq fp32 [rows]; nvis int64 [rows]: row r sees keys 0 .. nvis[r]-1,
 *           nlo int64 [rows] or NULL (all 0): ... and only keys from nlo[r] on (a sliding
 *           window); hidden keys get coefficient 0 and add nothing, so skipping them is exact
 * Row r belongs to group r / rows_per_group (one K/V head of one sequence).
 * Output: out fp32 [rows][d] = (f32(A) / f32(Z)) * M, and z int64 [rows], m fp32 [rows].
 * Every row-indexed pointer is the array's base; the call computes rows row0 .. row0+rows-1.
 * ------------------------------------------------------------------------------------------ */

#define KB 16      /* keys per score block */
#define QCHUNK 128 /* dim pairs summed in int32 before widening (scores) */
#define VCHUNK 64  /* key pairs summed in int32 before widening (values) */
#define TR 4       /* query rows per tile */

typedef struct {
    const int32_t *q[2][TR];  /* planes hi, lo of each tile row, as int32 pairs */
    int planes;
} qtile;

/* scores of the tile's TR rows against one block of 16 keys (npairs dim pairs): out[r][16] */
static void score_plain(const qtile *t, const int16_t *kb, int64_t npairs, int64_t *out) {
    for (int r = 0; r < TR; r++) {
        int64_t acc[KB] = {0};
        for (int h = 0; h < t->planes; h++) {
            const int16_t *q = (const int16_t *)t->q[h][r];
            for (int64_t p = 0; p < npairs; p++) {
                const int16_t *k = kb + p * 2 * KB;
                for (int l = 0; l < KB; l++) {
                    const int64_t v = (int64_t)q[2 * p] * k[2 * l] + (int64_t)q[2 * p + 1] * k[2 * l + 1];
                    acc[l] += h == 0 && t->planes == 2 ? v * 256 : v;
                }
            }
        }
        for (int l = 0; l < KB; l++) out[r * KB + l] = acc[l];
    }
}

/* acc[r][0..32) += sum over key pairs p of (c pairs of row r) . (value pairs), dims d0..d0+32 */
static void value_plain(const int32_t *ch[TR], const int32_t *cl[TR], const int16_t *vp,
                        int64_t dv, int64_t d0, int64_t p0, int64_t p1, int64_t *acc[TR]) {
    for (int r = 0; r < TR; r++) {
        const int16_t *h = (const int16_t *)ch[r], *lo = (const int16_t *)cl[r];
        for (int64_t p = p0; p < p1; p++) {
            const int16_t *v = vp + (p * dv + d0) * 2;
            const int64_t h0 = h[2 * p], h1 = h[2 * p + 1], l0 = lo[2 * p], l1 = lo[2 * p + 1];
            for (int i = 0; i < 32; i++) {
                const int64_t a = v[2 * i], b = v[2 * i + 1];
                acc[r][d0 + i] += (h0 * a + h1 * b) * 256 + (l0 * a + l1 * b);
            }
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define AVX2 __attribute__((target("avx2")))

VNNI static inline void add_wide512(int64_t *dst, __m512i hi, __m512i lo, int two) {
    /* dst[0..16) += (two ? 256 * hi + lo : hi), the int32 lanes widened to int64 */
    __m512i h0 = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(hi));
    __m512i h1 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(hi, 1));
    if (two) {
        h0 = _mm512_add_epi64(_mm512_slli_epi64(h0, 8),
                              _mm512_cvtepi32_epi64(_mm512_castsi512_si256(lo)));
        h1 = _mm512_add_epi64(_mm512_slli_epi64(h1, 8),
                              _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(lo, 1)));
    }
    _mm512_storeu_si512(dst, _mm512_add_epi64(_mm512_loadu_si512(dst), h0));
    _mm512_storeu_si512(dst + 8, _mm512_add_epi64(_mm512_loadu_si512(dst + 8), h1));
}

VNNI static void score_vnni(const qtile *t, const int16_t *kb, int64_t npairs, int64_t *out) {
    for (int i = 0; i < TR * KB; i++) out[i] = 0;
    const int two = t->planes == 2;
    for (int64_t c0 = 0; c0 < npairs; c0 += QCHUNK) {
        const int64_t c1 = c0 + QCHUNK < npairs ? c0 + QCHUNK : npairs;
        __m512i h[TR], l[TR];
        for (int r = 0; r < TR; r++) h[r] = l[r] = _mm512_setzero_si512();
        for (int64_t p = c0; p < c1; p++) {
            const __m512i k = _mm512_loadu_si512(kb + p * 2 * KB);
            for (int r = 0; r < TR; r++) {
                h[r] = _mm512_dpwssd_epi32(h[r], _mm512_set1_epi32(t->q[0][r][p]), k);
                if (two) l[r] = _mm512_dpwssd_epi32(l[r], _mm512_set1_epi32(t->q[1][r][p]), k);
            }
        }
        for (int r = 0; r < TR; r++) add_wide512(out + r * KB, h[r], l[r], two);
    }
}

VNNI static void value_vnni(const int32_t *ch[TR], const int32_t *cl[TR], const int16_t *vp,
                            int64_t dv, int64_t d0, int64_t p0, int64_t p1, int64_t *acc[TR]) {
    __m512i h[TR][2], l[TR][2];
    for (int r = 0; r < TR; r++) h[r][0] = h[r][1] = l[r][0] = l[r][1] = _mm512_setzero_si512();
    for (int64_t p = p0; p < p1; p++) {
        const int16_t *v = vp + (p * dv + d0) * 2;
        const __m512i v0 = _mm512_loadu_si512(v), v1 = _mm512_loadu_si512(v + 32);
        for (int r = 0; r < TR; r++) {
            const __m512i bh = _mm512_set1_epi32(ch[r][p]), bl = _mm512_set1_epi32(cl[r][p]);
            h[r][0] = _mm512_dpwssd_epi32(h[r][0], bh, v0);
            h[r][1] = _mm512_dpwssd_epi32(h[r][1], bh, v1);
            l[r][0] = _mm512_dpwssd_epi32(l[r][0], bl, v0);
            l[r][1] = _mm512_dpwssd_epi32(l[r][1], bl, v1);
        }
    }
    for (int r = 0; r < TR; r++) {
        add_wide512(acc[r] + d0, h[r][0], l[r][0], 1);
        add_wide512(acc[r] + d0 + 16, h[r][1], l[r][1], 1);
    }
}

AVX2 static inline void add_wide256(int64_t *dst, __m256i hi, __m256i lo, int two) {
    __m256i h0 = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(hi));
    __m256i h1 = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(hi, 1));
    if (two) {
        h0 = _mm256_add_epi64(_mm256_slli_epi64(h0, 8),
                              _mm256_cvtepi32_epi64(_mm256_castsi256_si128(lo)));
        h1 = _mm256_add_epi64(_mm256_slli_epi64(h1, 8),
                              _mm256_cvtepi32_epi64(_mm256_extracti128_si256(lo, 1)));
    }
    _mm256_storeu_si256((__m256i *)dst, _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)dst), h0));
    _mm256_storeu_si256((__m256i *)(dst + 4),
                        _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)(dst + 4)), h1));
}

AVX2 static void score_avx2(const qtile *t, const int16_t *kb, int64_t npairs, int64_t *out) {
    for (int i = 0; i < TR * KB; i++) out[i] = 0;
    const int two = t->planes == 2;
    for (int half = 0; half < 2; half++) {
        for (int64_t c0 = 0; c0 < npairs; c0 += QCHUNK) {
            const int64_t c1 = c0 + QCHUNK < npairs ? c0 + QCHUNK : npairs;
            __m256i h[TR], l[TR];
            for (int r = 0; r < TR; r++) h[r] = l[r] = _mm256_setzero_si256();
            for (int64_t p = c0; p < c1; p++) {
                const __m256i k = _mm256_loadu_si256((const __m256i *)(kb + p * 2 * KB + 16 * half));
                for (int r = 0; r < TR; r++) {
                    h[r] = _mm256_add_epi32(h[r], _mm256_madd_epi16(_mm256_set1_epi32(t->q[0][r][p]), k));
                    if (two)
                        l[r] = _mm256_add_epi32(l[r], _mm256_madd_epi16(_mm256_set1_epi32(t->q[1][r][p]), k));
                }
            }
            for (int r = 0; r < TR; r++) add_wide256(out + r * KB + 8 * half, h[r], l[r], two);
        }
    }
}

AVX2 static void value_avx2(const int32_t *ch[TR], const int32_t *cl[TR], const int16_t *vp,
                            int64_t dv, int64_t d0, int64_t p0, int64_t p1, int64_t *acc[TR]) {
    for (int e = 0; e < 32; e += 8) {
        __m256i h[TR], l[TR];
        for (int r = 0; r < TR; r++) h[r] = l[r] = _mm256_setzero_si256();
        for (int64_t p = p0; p < p1; p++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(vp + (p * dv + d0 + e) * 2));
            for (int r = 0; r < TR; r++) {
                h[r] = _mm256_add_epi32(h[r], _mm256_madd_epi16(_mm256_set1_epi32(ch[r][p]), v));
                l[r] = _mm256_add_epi32(l[r], _mm256_madd_epi16(_mm256_set1_epi32(cl[r][p]), v));
            }
        }
        for (int r = 0; r < TR; r++) add_wide256(acc[r] + d0 + e, h[r], l[r], 1);
    }
}
#endif

typedef void (*score_fn)(const qtile *, const int16_t *, int64_t, int64_t *);
typedef void (*value_fn)(const int32_t *[TR], const int32_t *[TR], const int16_t *, int64_t,
                         int64_t, int64_t, int64_t, int64_t *[TR]);

/* Which route attn_fused takes: 0 plain C, 1 AVX2, 2 AVX-512 VNNI; the best the CPU has unless
 * attn_route(r) asked for a lower one (tests run every route the machine can). */
static int route_forced = -1;

int64_t attn_best_route(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vnni"))
        return 2;
    if (__builtin_cpu_supports("avx2")) return 1;
#endif
    return 0;
}

/* Set the route (-1: the best); returns the route now in use, lowered to what the CPU has. */
int64_t attn_route(int64_t r) {
    const int64_t best = attn_best_route();
    route_forced = r < 0 || r > best ? -1 : (int)r;
    return route_forced < 0 ? best : route_forced;
}

/* The route in use now (freivalds.c takes the same one). */
int64_t attn_active_route(void) { return route_forced < 0 ? attn_best_route() : route_forced; }

int64_t attn_pack(const void *src, int64_t esize, int64_t vals, int64_t B, int64_t H, int64_t S,
                  int64_t d, int64_t sb, int64_t sh, int64_t ss, int64_t sd, int64_t width,
                  int64_t blocks, int16_t *dst);

/* The K/V rows as they lie (attn_fused_rows): k, v int8/int16 [S][G][d] with element strides
 * desc = {esize, k's S, G, d strides, v's S, G, d strides}; each group's keys and values are
 * packed (attn_pack) into buffers of this call when its first tile starts, so the packed copy
 * stays in cache instead of making a pass of its own over every group. */
struct kvrows {
    const char *k, *v;
    const int64_t *desc;
};

static int64_t attn_run(const int16_t *qh, const int16_t *ql, const int16_t *kp, const int16_t *vp,
                        const struct kvrows *raw,
                        const float *sq, const float *sk, const float *sv, const int64_t *nvis,
                        const int64_t *nlo,
                        int64_t row0, int64_t rows, int64_t rows_per_group, int64_t n_keys,
                        int64_t dp, int64_t nkb, int64_t dv, int64_t nvp, int64_t d, float scale,
                        float frac, const int32_t *table, int64_t cut, float *out, int64_t *z,
                        float *m) {
    const int64_t route = route_forced < 0 ? attn_best_route() : route_forced;
    score_fn score = score_plain;
    value_fn value = value_plain;
#if defined(__x86_64__) && defined(__GNUC__)
    if (route == 2) { score = score_vnni; value = value_vnni; }
    if (route == 1) { score = score_avx2; value = value_avx2; }
#endif
    const int64_t npairs = dp / 2, width = nkb * KB;
    int64_t *sc = malloc(sizeof(int64_t) * TR * width);      /* scores of the tile, [TR][width] */
    int64_t *blk = malloc(sizeof(int64_t) * TR * KB);
    float *row = malloc(sizeof(float) * width);
    int32_t *lg = malloc(sizeof(int32_t) * width);
    float *p = malloc(sizeof(float) * width);
    int32_t *cpl = malloc(sizeof(int32_t) * 2 * TR * nvp);   /* c planes hi, lo as int32 pairs */
    int64_t *acc = malloc(sizeof(int64_t) * TR * dv);
    int16_t *kbuf = raw ? malloc(sizeof(int16_t) * (size_t)(nkb * npairs * 2 * KB)) : 0;
    int16_t *vbuf = raw ? malloc(sizeof(int16_t) * (size_t)(nvp * dv * 2)) : 0;
    int64_t code = 0, packed = -1;  /* the group now in kbuf / vbuf */
    if (!sc || !blk || !row || !lg || !p || !cpl || !acc || (raw && (!kbuf || !vbuf))) code = -3;
    for (int64_t a = row0; a < row0 + rows && !code;) {
        const int64_t grp = a / rows_per_group;
        int64_t b = a + TR;
        if (b > row0 + rows) b = row0 + rows;
        if (b > (grp + 1) * rows_per_group) b = (grp + 1) * rows_per_group;
        const int nr = (int)(b - a);
        int64_t nv[TR], nl[TR], top = 0, bot = n_keys;
        qtile t;
        t.planes = ql ? 2 : 1;
        for (int r = 0; r < TR; r++) {
            const int64_t rr = a + (r < nr ? r : nr - 1);  /* padding rows repeat the last one */
            int64_t n = nvis[rr];
            nv[r] = n < 0 ? 0 : n > n_keys ? n_keys : n;
            const int64_t f = nlo ? nlo[rr] : 0;
            nl[r] = f < 0 ? 0 : f > nv[r] ? nv[r] : f;
            top = nv[r] > top ? nv[r] : top;
            bot = nl[r] < bot ? nl[r] : bot;
            t.q[0][r] = (const int32_t *)(qh + rr * dp);
            t.q[1][r] = ql ? (const int32_t *)(ql + rr * dp) : 0;
        }
        /* scores for every key block that some tile row sees */
        if (raw && grp != packed) {
            const int64_t *t = raw->desc, es = t[0];
            if (attn_pack(raw->k + grp * t[2] * es, es, 0, 1, 1, n_keys, d, 0, 0, t[1], t[3], dp,
                          nkb, kbuf)
                || attn_pack(raw->v + grp * t[5] * es, es, 1, 1, 1, n_keys, d, 0, 0, t[4], t[6],
                             dv, nvp, vbuf)) {
                code = -4;
                break;
            }
            packed = grp;
        }
        const int16_t *kg = raw ? kbuf : kp + grp * nkb * npairs * 2 * KB;
        const int64_t blocks = (top + KB - 1) / KB;
        for (int64_t kb = bot / KB; kb < blocks; kb++) {
            score(&t, kg + kb * npairs * 2 * KB, npairs, blk);
            for (int r = 0; r < TR; r++)
                for (int l = 0; l < KB; l++) sc[r * width + kb * KB + l] = blk[r * KB + l];
        }
        /* softmax passes per row, then the coefficient planes */
        const int64_t pairs = (top + 1) / 2;
        const int32_t *ch[TR], *cl[TR];
        int64_t *ar[TR];
        for (int r = 0; r < TR; r++) {
            int16_t *hr = (int16_t *)(cpl + (2 * r) * nvp), *lr = (int16_t *)(cpl + (2 * r + 1) * nvp);
            ch[r] = (const int32_t *)hr;
            cl[r] = (const int32_t *)lr;
            ar[r] = acc + r * dv;
            for (int64_t i = 0; i < dv; i++) ar[r][i] = 0;
            for (int64_t j = 0; j < 2 * pairs; j++) hr[j] = lr[j] = 0;
            if (r >= nr) continue;  /* a padding row: zero coefficients, its sums unused */
            const int64_t f = nl[r], n = nv[r] - f;  /* keys f .. nv[r]-1 */
            scores_f32(sc + r * width + f, n, row);
            code = row_pass(row, n, sq[a + r], sk + grp * n_keys + f, sv + grp * n_keys + f,
                            scale, frac, table, cut, lg, p, z + a + r, m + a + r);
            if (code) break;
            coef_planes(p, n, m[a + r], hr + f, lr + f);
        }
        if (code) break;
        /* value sums over the visible key pairs, widened every VCHUNK pairs */
        const int16_t *vg = raw ? vbuf : vp + grp * nvp * dv * 2;
        for (int64_t d0 = 0; d0 < dv; d0 += 32)
            for (int64_t p0 = bot / 2; p0 < pairs; p0 += VCHUNK)
                value(ch, cl, vg, dv, d0, p0, p0 + VCHUNK < pairs ? p0 + VCHUNK : pairs, ar);
        for (int r = 0; r < nr; r++) {
            const float zf = (float)(double)z[a + r], mr = m[a + r];
            float *o = out + (a + r) * d;
            for (int64_t i = 0; i < d; i++) {
                float v = (float)(double)ar[r][i];
                v = v / zf;
                o[i] = v * mr;
            }
        }
        a = b;
    }
    free(sc); free(blk); free(row); free(lg); free(p); free(cpl); free(acc); free(kbuf); free(vbuf);
    return code;
}

int64_t attn_fused(const int16_t *qh, const int16_t *ql, const int16_t *kp, const int16_t *vp,
                   const float *sq, const float *sk, const float *sv, const int64_t *nvis,
                   const int64_t *nlo,
                   int64_t row0, int64_t rows, int64_t rows_per_group, int64_t n_keys, int64_t dp,
                   int64_t nkb, int64_t dv, int64_t nvp, int64_t d, float scale, float frac,
                   const int32_t *table, int64_t cut, float *out, int64_t *z, float *m) {
    return attn_run(qh, ql, kp, vp, 0, sq, sk, sv, nvis, nlo, row0, rows, rows_per_group, n_keys,
                    dp, nkb, dv, nvp, d, scale, frac, table, cut, out, z, m);
}

/* attn_fused over K/V rows as they lie (struct kvrows); -4: sizes attn_pack refuses. */
int64_t attn_fused_rows(const int16_t *qh, const int16_t *ql, const void *k, const void *v,
                        const int64_t *desc, const float *sq, const float *sk, const float *sv,
                        const int64_t *nvis, const int64_t *nlo, int64_t row0, int64_t rows,
                        int64_t rows_per_group, int64_t n_keys, int64_t dp, int64_t nkb,
                        int64_t dv, int64_t nvp, int64_t d, float scale, float frac,
                        const int32_t *table, int64_t cut, float *out, int64_t *z, float *m) {
    const struct kvrows raw = {(const char *)k, (const char *)v, desc};
    if (desc[0] != 1 && desc[0] != 2) return -4;
    return attn_run(qh, ql, 0, 0, &raw, sq, sk, sv, nvis, nlo, row0, rows, rows_per_group, n_keys,
                    dp, nkb, dv, nvp, d, scale, frac, table, cut, out, z, m);
}

/* One layer's attention step of the verifier's fused route (replay.py's _attend_fused), as one
 * call instead of some twenty numpy steps around attn_fused_rows:
 *   1. (checks != 0) the opened positions kpos [n_kv] strictly increasing; each of the t derived
 *      K/V rows (k, v, sk, sv of position pos[i], from ly_pre) must be the opened row of that
 *      position: integers compared as
 *      integers of one element size, scales as floats (== : the step route's np.array_equal);
 *      the keys lo .. hi-1 that the n challenged positions see must all be opened, in order;
 *   2. the attention of the n challenged rows' queries over those keys, rows ordered
 *      [kv head][group][position] as native/attention.py orders them (query planes, their
 *      scales, visible ranges and the K/V scales transposed here), rows row0 .. row0+rows-1 of
 *      heads * n; their outputs written to out [n][heads * d] at (position, head).
 * It decides nothing: 1 means "not answered" (a derived row differs, a row is not opened, a
 * dtype or size this call does not take); the caller then takes the step route, which decides
 * and gives the reason. -1 / -2 / -3 / -4 as attn_fused_rows. Its arguments: layer.h. */

static int64_t lower_bound(const int64_t *a, int64_t n, int64_t x) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (a[mid] < x) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static int floats_equal(const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!(a[i] == b[i])) return 0;
    return 1;
}

int64_t attn_layer(const attn_layer_args *A, int64_t row0, int64_t rows, int64_t checks) {
    const int64_t t = A->t, n = A->n, nh = A->heads, nkv = A->kv_heads, d = A->d, es = A->es;
    if ((es != 1 && es != 2) || n < 1 || n > t || nkv < 1 || nh % nkv || d < 1 || row0 < 0
        || rows < 0 || row0 + rows > nh * n)
        return 1;
    const int64_t kvw = nkv * d;  /* elements of one position's K (or V) row */
    const char *k_all = A->k_all, *v_all = A->v_all;
    if (checks) {
        /* positions strictly increasing: one row per position, found by any search alike */
        for (int64_t j = 1; j < A->n_kv; j++)
            if (A->kpos[j] <= A->kpos[j - 1]) return 1;
        for (int64_t i = 0; i < t; i++) {
            const int64_t at = lower_bound(A->kpos, A->n_kv, A->pos[i]);
            if (at >= A->n_kv || A->kpos[at] != A->pos[i]) return 1;
            if (memcmp((const char *)A->k + i * kvw * es, k_all + at * kvw * es, kvw * es)
                || memcmp((const char *)A->v + i * kvw * es, v_all + at * kvw * es, kvw * es)
                || !floats_equal(A->sk + i * nkv, A->sk_all + at * nkv, nkv)
                || !floats_equal(A->sv + i * nkv, A->sv_all + at * nkv, nkv))
                return 1;
        }
    }
    /* the keys lo .. hi-1 the challenged positions see, opened rows a .. a + S - 1 */
    int64_t pmin = A->pos[0], pmax = A->pos[0];
    for (int64_t i = 1; i < n; i++) {
        pmin = A->pos[i] < pmin ? A->pos[i] : pmin;
        pmax = A->pos[i] > pmax ? A->pos[i] : pmax;
    }
    const int64_t w = A->window;
    const int64_t lo = w > 0 && pmin - (w - 1) > 0 ? pmin - (w - 1) : 0, S = pmax + 1 - lo;
    const int64_t a = lower_bound(A->kpos, A->n_kv, lo);
    if (S < 1 || a + S > A->n_kv) return 1;
    if (checks)
        for (int64_t j = 0; j < S; j++)
            if (A->kpos[a + j] != lo + j) return 1;
    if (rows == 0) return 0;
    const int64_t g = nh / nkv, R = nh * n, rpg = g * n, dp = d + d % 2;
    const int64_t g0 = row0 / rpg, g1 = (row0 + rows - 1) / rpg + 1;  /* groups of the rows */
    int16_t *qh = calloc((size_t)(R * dp), sizeof(int16_t));
    int16_t *ql = es == 2 ? calloc((size_t)(R * dp), sizeof(int16_t)) : 0;
    float *sqr = malloc(sizeof(float) * R), *skt = malloc(sizeof(float) * nkv * S);
    float *svt = malloc(sizeof(float) * nkv * S), *o = malloc(sizeof(float) * R * d);
    int64_t *nvis = malloc(sizeof(int64_t) * R), *nlo = w > 0 ? malloc(sizeof(int64_t) * R) : 0;
    int64_t *z = malloc(sizeof(int64_t) * R);
    float *m = malloc(sizeof(float) * R);
    int64_t code = 0;
    if (!qh || (es == 2 && !ql) || !sqr || !skt || !svt || !o || !nvis || (w > 0 && !nlo) || !z
        || !m)
        code = -3;
    if (!code) {
        for (int64_t r = row0; r < row0 + rows; r++) {
            const int64_t h = r / n, i = r % n, rel = A->pos[i] - lo;
            int16_t *hr = qh + r * dp;
            if (es == 1) {
                const int8_t *src = (const int8_t *)A->q + (i * nh + h) * d;
                for (int64_t j = 0; j < d; j++) hr[j] = src[j];
            } else {  /* q = 256 hi + lo, lo in [-128, 128) (native.pack_queries) */
                const int16_t *src = (const int16_t *)A->q + (i * nh + h) * d;
                int16_t *lr = ql + r * dp;
                for (int64_t j = 0; j < d; j++) {
                    const int32_t x = src[j], low = ((x + 128) & 255) - 128;
                    lr[j] = (int16_t)low;
                    hr[j] = (int16_t)((x - low) >> 8);
                }
            }
            sqr[r] = A->sq[i * nh + h];
            nvis[r] = rel + 1 < 0 ? 0 : rel + 1 > S ? S : rel + 1;
            if (nlo) nlo[r] = rel - (w - 1) > 0 ? rel - (w - 1) : 0;
        }
        for (int64_t grp = g0; grp < g1; grp++)
            for (int64_t j = 0; j < S; j++) {
                skt[grp * S + j] = A->sk_all[(a + j) * nkv + grp];
                svt[grp * S + j] = A->sv_all[(a + j) * nkv + grp];
            }
        /* the opened rows a .. a+S-1 as [S][kv_heads][d]: strides in elements */
        const int64_t desc[7] = {es, kvw, d, 1, kvw, d, 1};
        code = attn_fused_rows(qh, ql, k_all + a * kvw * es, v_all + a * kvw * es, desc, sqr, skt,
                               svt, nvis, nlo, row0, rows, rpg, S, dp, (S + KB - 1) / KB,
                               (d + 31) / 32 * 32, (S + 1) / 2, d, A->scale, A->frac, A->table,
                               A->cut, o, z, m);
    }
    if (!code)
        for (int64_t r = row0; r < row0 + rows; r++) {
            const int64_t h = r / n, i = r % n;
            memcpy(A->out + (i * nh + h) * d, o + r * d, sizeof(float) * d);
        }
    free(qh); free(ql); free(sqr); free(skt); free(svt); free(o); free(nvis); free(nlo); free(z);
    free(m);
    return code;
}

/* Pack keys or values for attn_fused from any strided int8/int16 array src[B][H][S][d] (strides in
 * elements), group g = b * H + h; every padding element is written as 0.
 *   keys   (vals == 0): dst int16 [G][nkb][dp/2][16][2], width = dp (even, >= d), blocks = nkb
 *   values (vals != 0): dst int16 [G][nvp][dv][2],       width = dv (>= d),      blocks = nvp */
/* The packing loops for rows of contiguous dims of element type T (int8_t or int16_t). */
/* The packings of whole blocks of int16 rows with width == d (the usual case), no per-element
 * tests: keys [d/2][16][2] (the rows' 32-bit dim pairs, transposed), values [d][2] (two rows
 * interleaved). The same values as the general loops below. */
#if defined(__x86_64__) && defined(__GNUC__)
/* 16 dim pairs of the 16 key rows at once: a 16 x 16 transpose of 32-bit words in registers
 * (32-bit, then 64-bit interleaves, then two rounds of 128-bit lane shuffles), each row read as
 * whole 64-byte lines instead of 4 bytes from each of 16 rows in turn. Pure data movement: the
 * same words land where the scalar loop puts them. Returns the pairs done (a multiple of 16). */
__attribute__((target("avx512f"))) static int64_t pack_keys16_avx512(
        int16_t *o, const int16_t *const row[KB], int64_t pairs) {
    int64_t p0 = 0;
    for (; p0 + 16 <= pairs; p0 += 16) {
        __m512i r[16], a[16], b[16];
        for (int l = 0; l < 16; l++) r[l] = _mm512_loadu_si512((const void *)(row[l] + 2 * p0));
        for (int i = 0; i < 8; i++) {
            a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 4; i++) { /* b[4i + c], lane j: rows 4i..4i+3 of pair 4j + c */
            b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
            b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
            b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
            b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
        }
        for (int c = 0; c < 4; c++) { /* pair 4j + c: lane i from b[4i + c]'s lane j */
            const __m512i e0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44);
            const __m512i e1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
            const __m512i e2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
            const __m512i e3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
            int16_t *dst = o + (p0 + c) * KB * 2;
            _mm512_storeu_si512((void *)dst, _mm512_shuffle_i32x4(e0, e2, 0x88));
            _mm512_storeu_si512((void *)(dst + 4 * KB * 2), _mm512_shuffle_i32x4(e0, e2, 0xDD));
            _mm512_storeu_si512((void *)(dst + 8 * KB * 2), _mm512_shuffle_i32x4(e1, e3, 0x88));
            _mm512_storeu_si512((void *)(dst + 12 * KB * 2), _mm512_shuffle_i32x4(e1, e3, 0xDD));
        }
    }
    return p0;
}
#endif

CLONES static void pack_keys16(int16_t *o, const int16_t *const row[KB], int64_t width) {
    int64_t start = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if (attn_active_route() == 2) start = pack_keys16_avx512(o, row, width / 2);
#endif
    for (int64_t p = start; p < width / 2; p++)
        for (int64_t l = 0; l < KB; l++) {
            uint32_t w;
            memcpy(&w, row[l] + 2 * p, 4);
            memcpy(o + (p * KB + l) * 2, &w, 4);
        }
}

CLONES static void pack_vals16(int16_t *o, const int16_t *r0, const int16_t *r1, int64_t d) {
    for (int64_t i = 0; i < d; i++) {
        o[2 * i] = r0[i];
        o[2 * i + 1] = r1[i];
    }
}

#define PACK_ROWS(T) \
        for (int64_t b = 0; b < B; b++) \
            for (int64_t h = 0; h < H; h++) { \
                int16_t *o = dst + (b * H + h) * gsize; \
                const T *base = (const T *)src + b * sb + h * sh; \
                for (int64_t blk = 0; blk < blocks; blk++) { \
                    const T *row[KB]; \
                    for (int64_t l = 0; l < per; l++) { \
                        const int64_t s = blk * per + l; \
                        row[l] = s < S ? base + s * ss : 0; \
                    } \
                    int whole = sizeof(T) == 2 && width == d; \
                    for (int64_t l = 0; l < per; l++) whole = whole && row[l]; \
                    if (whole && vals) { \
                        pack_vals16(o, (const int16_t *)row[0], (const int16_t *)row[1], d); \
                    } else if (whole) { \
                        pack_keys16(o, (const int16_t *const *)row, width); \
                    } else if (vals) {  /* [dv][2]: dim i of keys 2 blk and 2 blk + 1 side by side */ \
                        for (int64_t i = 0; i < width; i++) { \
                            o[2 * i] = row[0] && i < d ? row[0][i] : 0; \
                            o[2 * i + 1] = row[1] && i < d ? row[1][i] : 0; \
                        } \
                    } else {  /* [dp/2][16][2]: dims 2p, 2p+1 of 16 keys */ \
                        for (int64_t p = 0; p < width / 2; p++) { \
                            const int64_t i = 2 * p; \
                            for (int64_t l = 0; l < KB; l++) { \
                                o[(p * KB + l) * 2] = row[l] && i < d ? row[l][i] : 0; \
                                o[(p * KB + l) * 2 + 1] = row[l] && i + 1 < d ? row[l][i + 1] : 0; \
                            } \
                        } \
                    } \
                    o += per * width; \
                } \
            } \
        return 0;

int64_t attn_pack(const void *src, int64_t esize, int64_t vals, int64_t B, int64_t H, int64_t S,
                  int64_t d, int64_t sb, int64_t sh, int64_t ss, int64_t sd, int64_t width,
                  int64_t blocks, int16_t *dst) {
    const int64_t per = vals ? 2 : KB;  /* keys per block */
    if (blocks * per < S || width < d || (!vals && width % 2)) return -4;
    const int64_t gsize = blocks * per * width;
    if (sd == 1 && esize == 2) {  /* rows of contiguous dims: the usual case, no index math */
        PACK_ROWS(int16_t)
    }
    if (sd == 1 && esize == 1) {
        PACK_ROWS(int8_t)
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            int16_t *g = dst + (b * H + h) * gsize;
            for (int64_t s = 0; s < blocks * per; s++) {
                const int64_t off = b * sb + h * sh + (s < S ? s : 0) * ss;
                for (int64_t i = 0; i < width; i++) {
                    int16_t x = 0;
                    if (s < S && i < d)
                        x = esize == 1 ? ((const int8_t *)src)[off + i * sd]
                                       : ((const int16_t *)src)[off + i * sd];
                    const int64_t at = vals ? ((s / 2) * width + i) * 2 + s % 2
                                            : (((s / KB) * (width / 2) + i / 2) * KB + s % KB) * 2 + i % 2;
                    g[at] = x;
                }
            }
        }
    return 0;
}

/* Recombine int8-plane products and dequantize a linear's output in one pass (the engine's
 * untraced linears): parts int32 [nw][nx * M][N] holds the plane products of nw weight planes
 * and nx activation planes (most significant first), so the exact accumulator is
 *   z[m][n] = sum_w 256^(nw - 1 - w) * sum_x 256^(nx - 1 - x) * parts[w][x * M + m][n]  (int64),
 * and y[m][n] = ((f32(f64(z)) * sx[m]) * sw[n]) + bias[n] (no bias: the product alone), the
 * spec's dequantize, each fp32 operation rounded once, in this order. Rows m0 .. m1-1. */
CLONES static void dequant_row(const int32_t *parts, int64_t nw, int64_t nx, int64_t M, int64_t N,
                               int64_t m, float sxm, const float *sw, const float *bias, float *y,
                               int64_t *z) {
    int64_t *t = z + N;  /* one weight plane's sum over the activation planes */
    for (int64_t n = 0; n < N; n++) z[n] = 0;
    for (int64_t w = 0; w < nw; w++) {
        for (int64_t n = 0; n < N; n++) t[n] = 0;
        for (int64_t x = 0; x < nx; x++) {
            const int32_t *p = parts + ((w * nx + x) * M + m) * N;
            for (int64_t n = 0; n < N; n++) t[n] = t[n] * 256 + p[n];
        }
        for (int64_t n = 0; n < N; n++) z[n] = z[n] * 256 + t[n];
    }
    if (bias) {
        for (int64_t n = 0; n < N; n++) {
            float v = (float)(double)z[n];
            v = v * sxm;
            v = v * sw[n];
            y[n] = v + bias[n];
        }
    } else {
        for (int64_t n = 0; n < N; n++) {
            float v = (float)(double)z[n];
            v = v * sxm;
            y[n] = v * sw[n];
        }
    }
}

int64_t dequant_planes(const int32_t *parts, int64_t nw, int64_t nx, int64_t M, int64_t N,
                       int64_t m0, int64_t m1, const float *sx, const float *sw,
                       const float *bias, float *y) {
    int64_t *z = malloc(sizeof(int64_t) * 2 * (size_t)(N > 0 ? N : 1));
    if (!z) return -3;
    for (int64_t m = m0; m < m1; m++) dequant_row(parts, nw, nx, M, N, m, sx[m], sw, bias, y + m * N, z);
    free(z);
    return 0;
}
