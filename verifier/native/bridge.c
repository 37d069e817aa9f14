/* The replay's elementwise steps between the exact matmuls ("the bridge"), as the numpy spec
 * computes them (verifier/numerics: norm.py, quant.py, exp2.py, rope.py), bit for bit.
 *
 * Every binary32 operation is written in the spec's order with no contraction (the build passes
 * -ffp-contract=off and no fast-math; exact.h refuses wider float evaluation), so each lane of a
 * vectorized loop does the same IEEE operations as the spec's numpy ufuncs. Integer steps and
 * float64 steps on exact integers give the same value in any order.
 *
 * The routines return -1 when an input or an output is not finite, and the Python wrappers
 * (bridge.py) then call the spec, which raises or computes what it defines: so whenever a routine
 * returns 0 its outputs are finite, and finite IEEE results do not depend on operand order or on
 * NaN payload rules. Rows are given by a pointer and a row stride in elements.
 */
#include "exact.h"

/* max(max x, -min x) over n binary32 values (the spec's amax, up to the sign of a zero max,
 * which no caller reads: both give s = 1 and e = 0), and whether all were finite. For non-NaN
 * values |x| orders as its bits do (sign cleared), so the maximum is an unsigned integer
 * maximum, which vectorizes; bits above those of FLT_MAX are an infinity or a NaN. */
CLONES static float row_amax(const float *x, int64_t n, int *finite) {
    const uint32_t *b = (const uint32_t *)x;
    uint32_t top = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t a = b[i] & 0x7fffffffu;
        top = a > top ? a : top;
    }
    *finite = top <= 0x7f7fffffu;
    float m;
    memcpy(&m, &top, 4);
    return m;
}

/* The exact sum of squares of X = rint(x * 2^(23 - e)) (norm.py's exact_sum_squares): |X| is
 * rint(|x| 2^(23 - e)), computed as (a + 2^52) - 2^52 (round half even, exact steps since
 * a <= 2^23); every product and partial sum is an integer below 2^53, so float64 adds in eight
 * lanes over chunks of 64 elements (each chunk's total <= 64 * 2^46 = 2^52) are exact, and the
 * chunk totals add in int64. */
CLONES static int64_t row_sum_squares(const float *x, int64_t n, double scale) {
    const double big = 4503599627370496.0; /* 2^52 */
    int64_t ss = 0;
    for (int64_t c = 0; c < n; c += 64) {
        const int64_t len = n - c < 64 ? n - c : 64;
        double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= len; i += 8)
            for (int j = 0; j < 8; j++) {
                const double a = (fabs((double)x[c + i + j] * scale) + big) - big;
                acc[j] += a * a;
            }
        for (; i < len; i++) {
            const double a = (fabs((double)x[c + i] * scale) + big) - big;
            acc[0] += a * a;
        }
        double t = 0.0;
        for (int j = 0; j < 8; j++) t += acc[j];
        ss += (int64_t)t;
    }
    return ss;
}

/* y[r] = (x[r] * rs) * w with rs = f32(1 / sqrt(ms + f64(eps))), ms = ldexp(f64(ss) / h,
 * 2 (e - 23)): norm.py's rmsnorm for rows x [rows][h] (row stride xs) into y [rows][h]. */
CLONES static int scale_row(const float *x, int64_t n, float rs, const float *w, float *y) {
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        const float t = x[i] * rs;
        const float v = t * w[i];
        bad |= !(fabsf(v) <= 3.40282347e38f);
        y[i] = v;
    }
    return bad;
}

int64_t br_rmsnorm(const float *x, int64_t rows, int64_t h, int64_t xs, const float *w,
                   float eps, float *y) {
    if (h > 131071) return -2; /* MAX_NORM_WIDTH */
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * xs;
        int finite;
        const float amax = row_amax(xr, h, &finite);
        if (!finite) return -1;
        int e;
        frexp((double)amax, &e);
        const int64_t ss = row_sum_squares(xr, h, ldexp(1.0, 23 - e));
        const double ms = ldexp((double)ss / (double)h, 2 * (e - 23));
        const float rs = (float)(1.0 / sqrt(ms + (double)eps));
        if (scale_row(xr, h, rs, w, y + r * h)) return -1;
    }
    return 0;
}

/* q = clip(rint(x / s), -qmax, qmax), s = amax / qmax (1 where that is 0): quant.py's
 * quantize_rows for rows x [rows][k] (stride xs) into q (int8 when qbytes is 1, else int16)
 * [rows][k] and s [rows]. */
CLONES static void quant_row8(const float *x, int64_t n, float s, float qmax, int8_t *q) {
    for (int64_t i = 0; i < n; i++) {
        float v = rint_even(x[i] / s);
        v = v < -qmax ? -qmax : (v > qmax ? qmax : v);
        q[i] = (int8_t)v;
    }
}

CLONES static void quant_row16(const float *x, int64_t n, float s, float qmax, int16_t *q) {
    for (int64_t i = 0; i < n; i++) {
        float v = rint_even(x[i] / s);
        v = v < -qmax ? -qmax : (v > qmax ? qmax : v);
        q[i] = (int16_t)v;
    }
}

int64_t br_quantize(const float *x, int64_t rows, int64_t k, int64_t xs, int64_t qmax,
                    int64_t qbytes, void *q, float *s) {
    if (qmax < 1 || qmax > 32767 || (qbytes == 1 && qmax > 127) || (qbytes != 1 && qbytes != 2))
        return -2;
    const float fq = (float)qmax;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * xs;
        int finite;
        const float amax = row_amax(xr, k, &finite);
        if (!finite) return -1;
        float sr = amax / fq;
        if (sr == 0.0f) sr = 1.0f;
        s[r] = sr;
        if (qbytes == 1) quant_row8(xr, k, sr, fq, (int8_t *)q + r * k);
        else quant_row16(xr, k, sr, fq, (int16_t *)q + r * k);
    }
    return 0;
}

/* y = ((f32(f64(z)) * sx) * sw) + bias [+ then resid + y]: quant.py's dequantize (and the
 * residual add h = x + linear(...) after it) for z int64 [rows][n]; every |z| < 2^53 or -1.
 * The steps after the conversion, for value j (each one IEEE binary32 operation). */
static inline float dequant_steps(float t, int64_t j, float sx, const float *sw,
                                  const float *bias, const float *resid, int *bad) {
    t = t * sx;
    t = t * sw[j];
    if (bias) t = t + bias[j];
    if (resid) t = resid[j] + t;
    *bad |= !(fabsf(t) <= 3.40282347e38f);
    return t;
}

/* dequant_row's loop with (double)v: every |v| < 2^53 (the rows with a value from 2^51 on). */
static int dequant_row_wide(const int64_t *z, int64_t n, float sx, const float *sw,
                            const float *bias, const float *resid, float *y) {
    int bad = 0;
    for (int64_t j = 0; j < n; j++) {
        const int64_t v = z[j];
        bad |= (v >= 9007199254740992LL) | (v <= -9007199254740992LL);
        y[j] = dequant_steps((float)(double)v, j, sx, sw, bias, resid, &bad);
    }
    return bad;
}

/* One row, 1 when a |z| >= 2^53 or an output is not finite. The conversion is f64_of_small's, so
 * the loop vectorizes on AVX2 (the same double for |z| < 2^51, below every profile's accumulator
 * bound); a row with a value from 2^51 on is done again by dequant_row_wide. */
CLONES static int dequant_row(const int64_t *z, int64_t n, float sx, const float *sw,
                              const float *bias, const float *resid, float *y) {
    int bad = 0, wide = 0; /* one loop: each element's operations in the spec's order (the loop
                            * is unswitched on bias and resid, so each variant vectorizes) */
    for (int64_t j = 0; j < n; j++) {
        const int64_t v = z[j];
        wide |= (v >= F64_SMALL_LIMIT) | (v < -F64_SMALL_LIMIT);
        y[j] = dequant_steps((float)f64_of_small(v), j, sx, sw, bias, resid, &bad);
    }
    return wide ? dequant_row_wide(z, n, sx, sw, bias, resid, y) : bad;
}

int64_t br_dequant(const int64_t *z, int64_t rows, int64_t n, const float *sx, const float *sw,
                   const float *bias, const float *resid, int64_t rs, float *y) {
    for (int64_t r = 0; r < rows; r++)
        if (dequant_row(z + r * n, n, sx[r], sw, bias, resid ? resid + r * rs : NULL, y + r * n))
            return -1;
    return 0;
}

/* out = (g / (1 + 2^clip(g * c, -64, 64))) * u, exp2 as exp2.py's: n = rint(y), f = y - n,
 * Horner of degree 7 with the given fp32 coefficients, times 2^n from the bits (n + 127) << 23.
 * g, u rows of f (strides gs, us), out [rows][f]. */
CLONES static int swiglu_row(const float *g, const float *u, int64_t n, float neg_log2e,
                             const float *c, float *out) {
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        const float gi = g[i], ui = u[i];
        bad |= !(fabsf(gi) <= 3.40282347e38f) | !(fabsf(ui) <= 3.40282347e38f);
        float y = gi * neg_log2e;
        y = pick_f32(y < -64.0f, -64.0f, y); /* y < -64 ? -64 : (y > 64 ? 64 : y), vectorized */
        y = pick_f32(y > 64.0f, 64.0f, y);
        const float k = rint_even(y);
        const float f = y - k;
        float p = f * c[7];
        p = p + c[6];
        for (int d = 5; d >= 0; d--) {
            p = p * f;
            p = p + c[d];
        }
        const int32_t bits = ((int32_t)(k + 127.0f)) << 23;
        float two_k;
        memcpy(&two_k, &bits, 4);
        p = p * two_k;
        p = p + 1.0f;
        p = gi / p;
        p = p * ui;
        bad |= !(fabsf(p) <= 3.40282347e38f);
        out[i] = p;
    }
    return bad;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BRV __attribute__((target("avx512f")))
#ifndef COMMITLLM_ONE_TARGET
int64_t attn_active_route(void); /* attn.c */
#endif

/* swiglu_row's steps on 16 lanes, each the same IEEE binary32 operation (no FMA: separate
 * multiplies and adds): the clamps as max / min, which equal the comparisons for every y that
 * is not NaN (a NaN y comes from a NaN g, flagged); rint by roundscale to nearest even, which is
 * rint_even's value for every finite y; the C cast's truncation of k + 127 (an integer in
 * [63, 191]) as cvtt. m: the lanes in the row; `bad` gathers those with a non-finite input or
 * output. */
BRV static inline __m512 swiglu16(__m512 g, __m512 u, const __m512 c[8], __m512 nl, __mmask16 m,
                                  __mmask16 *bad) {
    const __m512 lim = _mm512_set1_ps(3.40282347e38f);
    *bad |= m & ~(_mm512_cmp_ps_mask(_mm512_abs_ps(g), lim, _CMP_LE_OQ)
                  & _mm512_cmp_ps_mask(_mm512_abs_ps(u), lim, _CMP_LE_OQ));
    __m512 y = _mm512_mul_ps(g, nl);
    y = _mm512_max_ps(y, _mm512_set1_ps(-64.0f));
    y = _mm512_min_ps(y, _mm512_set1_ps(64.0f));
    const __m512 k = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, k);
    __m512 p = _mm512_add_ps(_mm512_mul_ps(f, c[7]), c[6]);
    for (int d = 5; d >= 0; d--) p = _mm512_add_ps(_mm512_mul_ps(p, f), c[d]);
    const __m512 two_k = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvttps_epi32(_mm512_add_ps(k, _mm512_set1_ps(127.0f))), 23));
    p = _mm512_add_ps(_mm512_mul_ps(p, two_k), _mm512_set1_ps(1.0f));
    p = _mm512_mul_ps(_mm512_div_ps(g, p), u);
    *bad |= m & ~_mm512_cmp_ps_mask(_mm512_abs_ps(p), lim, _CMP_LE_OQ);
    return p;
}

/* swiglu_row, 32 values a step (two independent vectors keep the division unit busy), the tail
 * masked. */
BRV static int swiglu_row16(const float *g, const float *u, int64_t n, float neg_log2e,
                            const float *coefs, float *out) {
    __m512 c[8];
    for (int d = 0; d < 8; d++) c[d] = _mm512_set1_ps(coefs[d]);
    const __m512 nl = _mm512_set1_ps(neg_log2e);
    __mmask16 bad = 0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512 a = swiglu16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i), c, nl, 0xFFFF,
                                  &bad);
        const __m512 b = swiglu16(_mm512_loadu_ps(g + i + 16), _mm512_loadu_ps(u + i + 16), c,
                                  nl, 0xFFFF, &bad);
        _mm512_storeu_ps(out + i, a);
        _mm512_storeu_ps(out + i + 16, b);
    }
    for (; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(out + i, m, swiglu16(_mm512_maskz_loadu_ps(m, g + i),
                                                   _mm512_maskz_loadu_ps(m, u + i), c, nl, m,
                                                   &bad));
    }
    return bad != 0;
}

/* The AVX-512 route when the compiled core's route is AVX-512 (attn_route; tests run both);
 * in a build of this file alone for one instruction set (the tests'), when that set is
 * AVX-512. */
static int swiglu_vector(void) {
#ifdef COMMITLLM_ONE_TARGET
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
#else
    return attn_active_route() == 2 && __builtin_cpu_supports("avx512f");
#endif
}
#endif

int64_t br_swiglu(const float *g, const float *u, int64_t rows, int64_t n, int64_t gs,
                  int64_t us, float neg_log2e, const float *coefs, float *out) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (swiglu_vector()) {
        for (int64_t r = 0; r < rows; r++)
            if (swiglu_row16(g + r * gs, u + r * us, n, neg_log2e, coefs, out + r * n))
                return -1;
        return 0;
    }
#endif
    for (int64_t r = 0; r < rows; r++)
        if (swiglu_row(g + r * gs, u + r * us, n, neg_log2e, coefs, out + r * n)) return -1;
    return 0;
}

/* rope.py's apply_rope, rotate-half: out1 = (x1 * c) - (x2 * s), out2 = (x2 * c) + (x1 * s)
 * for x [t][heads][d] (token stride xs, head stride hs), cos/sin [t][d/2], out contiguous
 * [t][heads][d]. */
CLONES static int rope_head(const float *x, int64_t half, const float *c, const float *s,
                            float *o) {
    int bad = 0;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i] * c[i], b = x[half + i] * s[i];
        const float v = a - b;
        bad |= !(fabsf(v) <= 3.40282347e38f);
        o[i] = v;
    }
    for (int64_t i = 0; i < half; i++) {
        const float a = x[half + i] * c[i], b = x[i] * s[i];
        const float v = a + b;
        bad |= !(fabsf(v) <= 3.40282347e38f);
        o[half + i] = v;
    }
    return bad;
}

int64_t br_rope(const float *x, int64_t t, int64_t heads, int64_t d, int64_t xs, int64_t hs,
                const float *cos, const float *sin, float *out) {
    if (d % 2) return -2;
    const int64_t half = d / 2;
    for (int64_t r = 0; r < t; r++)
        for (int64_t h = 0; h < heads; h++)
            if (rope_head(x + r * xs + h * hs, half, cos + r * half, sin + r * half,
                          out + (r * heads + h) * d))
                return -1;
    return 0;
}

/* The least and the greatest of n int8 (esize 1) or int16 (esize 2) values in one pass: an
 * opening's range checks (verifier/opened.py) read each K/V array once instead of twice.
 * n > 0; returns -2 for another esize. */
CLONES static void minmax16(const int16_t *x, int64_t n, int64_t *lo, int64_t *hi) {
    int16_t a = x[0], b = x[0];
    for (int64_t i = 0; i < n; i++) {
        a = x[i] < a ? x[i] : a;
        b = x[i] > b ? x[i] : b;
    }
    *lo = a, *hi = b;
}

CLONES static void minmax8(const int8_t *x, int64_t n, int64_t *lo, int64_t *hi) {
    int8_t a = x[0], b = x[0];
    for (int64_t i = 0; i < n; i++) {
        a = x[i] < a ? x[i] : a;
        b = x[i] > b ? x[i] : b;
    }
    *lo = a, *hi = b;
}

int64_t br_minmax(const void *x, int64_t n, int64_t esize, int64_t *lo_hi) {
    if (n <= 0 || (esize != 1 && esize != 2)) return -2;
    if (esize == 2) minmax16((const int16_t *)x, n, lo_hi, lo_hi + 1);
    else minmax8((const int8_t *)x, n, lo_hi, lo_hi + 1);
    return 0;
}

/* The spec's RoPE rows (verifier/numerics/rope.py build_rows) for n positions: for each position
 * p, (1, 0) rotated in binary64 by the base rotation (cb[b], sb[b]) of each set bit b of p,
 * lowest bit first (c' = c cb - s sb, s' = s cb + c sb, each product rounded, no fusion), then
 * rounded to binary32 once. cb, sb: double [bits][half]; cos, sin: float [n][half]. Each row
 * depends on its own position only. Returns 0; -1 when an output is not finite (which order of
 * operands a NaN takes is the compiler's, and numpy warns there: the spec decides); -2 for a
 * position outside [0, 2^bits), bits outside [0, 62] or half < 0. On -1 / -2 the caller takes
 * the spec's numpy route. */
CLONES static int rope_row(const double *cb, const double *sb, int64_t half, int64_t bits,
                           int64_t p, double *c, double *s, float *co, float *so) {
    for (int64_t i = 0; i < half; i++) c[i] = 1.0, s[i] = 0.0;
    for (int64_t b = 0; b < bits; b++) {
        if (!((p >> b) & 1)) continue;
        const double *x = cb + b * half, *y = sb + b * half;
        for (int64_t i = 0; i < half; i++) {
            const double cn = (c[i] * x[i]) - (s[i] * y[i]);
            const double sn = (s[i] * x[i]) + (c[i] * y[i]);
            c[i] = cn;
            s[i] = sn;
        }
    }
    int bad = 0;
    for (int64_t i = 0; i < half; i++) {
        co[i] = (float)c[i], so[i] = (float)s[i];
        bad |= !isfinite(co[i]) | !isfinite(so[i]);
    }
    return bad;
}

int64_t br_rope_rows(const double *cb, const double *sb, int64_t half, int64_t bits,
                     const int64_t *pos, int64_t n, float *cos, float *sin) {
    if (half < 0 || bits < 0 || bits > 62 || n < 0) return -2;
    for (int64_t r = 0; r < n; r++)
        if (pos[r] < 0 || pos[r] >= ((int64_t)1 << bits)) return -2;
    double *c = malloc(sizeof(double) * (size_t)(half > 0 ? half : 1));
    double *s = malloc(sizeof(double) * (size_t)(half > 0 ? half : 1));
    if (!c || !s) { free(c); free(s); return -3; }
    int64_t code = 0;
    for (int64_t r = 0; r < n && !code; r++)
        code = rope_row(cb, sb, half, bits, pos[r], c, s, cos + r * half, sin + r * half) ? -1 : 0;
    free(c);
    free(s);
    return code;
}
