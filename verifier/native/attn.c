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
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "float expressions must be evaluated in binary32 (FLT_EVAL_METHOD == 0)"
#endif

#define LOGIT_CLAMP 1073741824.0f /* 2^30 */
#define TWO23 8388608.0f

/* rint in round-to-nearest-even for binary32 without a libm call: below 2^23 in magnitude,
 * (|x| + 2^23) - 2^23 rounds |x| to an integer in the default rounding mode (exact steps
 * otherwise, since no FMA contraction or reassociation is allowed); from 2^23 up x is already
 * an integer. The sign is put back with copysign so -0.4 gives -0, as rintf does. */
static inline float rint_even(float x) {
    const float a = fabsf(x);
    const float r = (a + TWO23) - TWO23;
    return copysignf(a < TWO23 ? r : a, x);
}

int64_t commitllm_native_abi(void) { return 1; }

/* 0 on success; -1: a row's value scale underflowed to 0; -2: a logit was NaN; -3: no memory. */
int64_t attn_coefs(const void *scores, int64_t f64, int64_t row0, int64_t rows, int64_t n_keys, const float *sq,
                   const float *sk, const float *sv, int64_t rows_per_group,
                   const int64_t *nvis, float scale, float frac, const int32_t *table,
                   int64_t cut, double *c, int64_t *z, float *m) {
    const size_t width = (size_t)(n_keys > 0 ? n_keys : 1);
    int32_t *lg = malloc(sizeof(int32_t) * width);
    float *row = malloc(sizeof(float) * width);
    if (!lg || !row) { free(lg); free(row); return -3; }
    const float coef_down = 1.0f / 32768.0f, coef_up = 32768.0f;
    for (int64_t r = 0; r < rows; r++) {
        const float *sr = (const float *)scores + r * n_keys;
        const int64_t grp = (row0 + r) / rows_per_group;
        const float *skg = sk + grp * n_keys, *svg = sv + grp * n_keys;
        double *cr = c + r * n_keys;
        const float sqr = sq[r];
        int64_t n = nvis[r];
        if (n > n_keys) n = n_keys;
        if (n < 0) n = 0;
        if (f64) {  /* exact integer scores in binary64: rounded once to binary32, as the spec */
            const double *d = (const double *)scores + r * n_keys;
            for (int64_t j = 0; j < n; j++) row[j] = (float)d[j];
            sr = row;
        }
        int32_t top = INT32_MIN;
        int bad = 0;
        for (int64_t j = 0; j < n; j++) {
            float t = sr[j] * sqr;
            t = t * skg[j];
            t = t * scale;
            t = t * frac;
            float l = rint_even(t);
            l = l > LOGIT_CLAMP ? LOGIT_CLAMP : l;
            l = l < -LOGIT_CLAMP ? -LOGIT_CLAMP : l;
            bad |= l != l;  /* NaN */
            const int32_t li = (int32_t)(l != l ? 0.0f : l);
            lg[j] = li;
            top = li > top ? li : top;
        }
        if (bad) { free(lg); free(row); return -2; }
        int64_t zr = 0;
        float mr = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            int64_t dist = (int64_t)top - (int64_t)lg[j];
            if (dist > cut) dist = cut;
            const int32_t w = table[dist];
            zr += w;
            float p = (float)w * coef_down;
            p = p * svg[j];
            cr[j] = (double)p;
            if (p > mr) mr = p;
        }
        if (!(mr > 0.0f)) { free(lg); free(row); return -1; }
        for (int64_t j = 0; j < n; j++) {
            float q = (float)cr[j] / mr;
            q = q * coef_up;
            cr[j] = (double)rint_even(q);
        }
        for (int64_t j = n; j < n_keys; j++) cr[j] = 0.0;
        z[r] = zr;
        m[r] = mr;
    }
    free(lg);
    free(row);
    return 0;
}
