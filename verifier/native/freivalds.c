/* Freivalds dot products modulo the Mersenne prime P = 2^61 - 1 (verifier/freivalds.py).
 *
 * fv_dot gives out[m] = sum_i a[i] * b[m, i] mod P for a secret vector a (int64 residues below
 * P, [n]) and integer rows b of int8, int16, int32 or int64 with |b| <= bound < 2^62 (checked;
 * code -3 if not). Every step is an exact integer operation:
 *   - a is cut in registers into three limbs a = l0 + l1 2^21 + l2 2^41 with l0 < 2^21 and
 *     l1, l2 < 2^20 (a mask and shifts; the secret is read as 8 bytes per element);
 *   - an int64 b is cut into lo = b mod 2^31 in [0, 2^31) and hi = b >> 31 (arithmetic), both
 *     within int32 as |b| < 2^62; narrower b is used as it is;
 *   - each limb-by-value product is below 2^21 * 2^31 = 2^52 in magnitude, so a block of
 *     FV_BLOCK = 1024 of them sums below 2^62 in int64, in any order;
 *   - each block sum is reduced modulo P (2^61 = 1 mod P: fold the bits above 61 back in) and
 *     added modulo P to that limb's total;
 *   - the totals are recombined with 2^k mod P, a rotation of the 61-bit residue by k mod 61.
 * Blocks of columns are the outer loop and rows the inner one, so each block of a is read from
 * memory once and from L1 for every further row. Three routes, chosen like the attention's
 * (AVX-512, AVX2, plain C): the same integer products summed in another order, hence the same
 * block sums.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FV_P 0x1FFFFFFFFFFFFFFFULL
#define FV_BLOCK 1024

int64_t attn_active_route(void); /* attn.c */

static inline uint64_t fv_fold(uint64_t x) { /* x mod P for any x < 2^64 */
    x = (x & FV_P) + (x >> 61);              /* < 2^61 + 8 */
    return x >= FV_P ? x - FV_P : x;
}

static inline uint64_t fv_of(int64_t s) { /* s mod P in [0, P) for |s| < 2^63 */
    if (s >= 0) return fv_fold((uint64_t)s);
    const uint64_t m = fv_fold((uint64_t)(-s));
    return m ? FV_P - m : 0;
}

static inline uint64_t fv_add(uint64_t a, uint64_t b) { /* a, b < P */
    const uint64_t s = a + b;
    return s >= FV_P ? s - FV_P : s;
}

static inline uint64_t fv_shift(uint64_t x, int64_t k) { /* x 2^k mod P, x < P */
    k %= 61;
    return k ? ((x << k) & FV_P) | (x >> (61 - k)) : x;
}

/* Block sums s[0..3) (and s[3..6) for the hi part of int64 b) over len <= FV_BLOCK elements:
 * s[j] = sum l_j[i] * v[i] with v the value (narrow b) or lo (int64 b), s[3 + j] with hi. */
static int64_t sums_plain(const int64_t *r, const void *b, int64_t btype, int64_t len,
                          int64_t bound, int64_t s[6]) {
    int64_t a[6] = {0, 0, 0, 0, 0, 0}, bad = 0;
    for (int64_t i = 0; i < len; i++) {
        const int64_t l0 = r[i] & 0x1FFFFF, l1 = (r[i] >> 21) & 0xFFFFF, l2 = r[i] >> 41;
        int64_t x, h = 0;
        if (btype == 1) x = ((const int8_t *)b)[i];
        else if (btype == 2) x = ((const int16_t *)b)[i];
        else if (btype == 4) x = ((const int32_t *)b)[i];
        else { x = ((const int64_t *)b)[i]; }
        bad |= (x > bound) | (x < -bound);
        if (btype == 8) { h = x >> 31; x &= 0x7FFFFFFF; }
        a[0] += l0 * x; a[1] += l1 * x; a[2] += l2 * x;
        a[3] += l0 * h; a[4] += l1 * h; a[5] += l2 * h;
    }
    for (int j = 0; j < 6; j++) s[j] = a[j];
    return bad;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

/* AVX-512: eight 64-bit lanes; _mm512_mul_epi32 multiplies the low 32 bits of each lane as
 * signed integers into an exact 64-bit product. The limbs are below 2^21, lo in [0, 2^31) and
 * hi within int32 (its low 32 bits are bits 31..62 of b, which a logical shift gives), so every
 * lane product is the integer product. Each lane sums at most FV_BLOCK / 8 products. */
__attribute__((target("avx512f"))) static int64_t sums_avx512(
        const int64_t *r, const void *b, int64_t btype, int64_t len, int64_t bound, int64_t s[6]) {
    const __m512i hib = _mm512_set1_epi64(bound), lob = _mm512_set1_epi64(-bound);
    __mmask8 bad = 0;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, h0 = a0, h1 = a0, h2 = a0;
    const __m512i m31 = _mm512_set1_epi64(0x7FFFFFFF), m21 = _mm512_set1_epi64(0x1FFFFF);
    const __m512i m20 = _mm512_set1_epi64(0xFFFFF);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        const __m512i ra = _mm512_loadu_si512((const void *)(r + i));
        const __m512i k0 = _mm512_and_si512(ra, m21);
        const __m512i k1 = _mm512_and_si512(_mm512_srli_epi64(ra, 21), m20);
        const __m512i k2 = _mm512_srli_epi64(ra, 41);
        __m512i x;
        if (btype == 8) {
            const __m512i v = _mm512_loadu_si512((const void *)((const int64_t *)b + i));
            bad |= _mm512_cmpgt_epi64_mask(v, hib) | _mm512_cmplt_epi64_mask(v, lob);
            const __m512i hi = _mm512_srli_epi64(v, 31);
            x = _mm512_and_si512(v, m31);
            h0 = _mm512_add_epi64(h0, _mm512_mul_epi32(k0, hi));
            h1 = _mm512_add_epi64(h1, _mm512_mul_epi32(k1, hi));
            h2 = _mm512_add_epi64(h2, _mm512_mul_epi32(k2, hi));
        } else if (btype == 2) {
            x = _mm512_cvtepi16_epi64(_mm_loadu_si128((const __m128i *)((const int16_t *)b + i)));
        } else if (btype == 1) {
            x = _mm512_cvtepi8_epi64(_mm_loadl_epi64((const __m128i *)((const int8_t *)b + i)));
        } else {
            x = _mm512_cvtepi32_epi64(_mm256_loadu_si256((const __m256i *)((const int32_t *)b + i)));
        }
        if (btype != 8) bad |= _mm512_cmpgt_epi64_mask(x, hib) | _mm512_cmplt_epi64_mask(x, lob);
        a0 = _mm512_add_epi64(a0, _mm512_mul_epi32(k0, x));
        a1 = _mm512_add_epi64(a1, _mm512_mul_epi32(k1, x));
        a2 = _mm512_add_epi64(a2, _mm512_mul_epi32(k2, x));
    }
    int64_t t[6];
    const int64_t tail = sums_plain(r + i, (const char *)b + i * btype, btype, len - i, bound, t);
    s[0] = t[0] + _mm512_reduce_add_epi64(a0); s[1] = t[1] + _mm512_reduce_add_epi64(a1);
    s[2] = t[2] + _mm512_reduce_add_epi64(a2); s[3] = t[3] + _mm512_reduce_add_epi64(h0);
    s[4] = t[4] + _mm512_reduce_add_epi64(h1); s[5] = t[5] + _mm512_reduce_add_epi64(h2);
    return tail | (bad != 0);
}

__attribute__((target("avx2"))) static int64_t hsum256(__m256i v) {
    int64_t t[4];
    _mm256_storeu_si256((__m256i *)t, v);
    return t[0] + t[1] + t[2] + t[3];
}

/* AVX2: the same with four lanes (_mm256_mul_epi32). */
__attribute__((target("avx2"))) static int64_t sums_avx2(
        const int64_t *r, const void *b, int64_t btype, int64_t len, int64_t bound, int64_t s[6]) {
    const __m256i hib = _mm256_set1_epi64x(bound), lob = _mm256_set1_epi64x(-bound);
    __m256i bad = _mm256_setzero_si256();
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, h0 = a0, h1 = a0, h2 = a0;
    const __m256i m31 = _mm256_set1_epi64x(0x7FFFFFFF), m21 = _mm256_set1_epi64x(0x1FFFFF);
    const __m256i m20 = _mm256_set1_epi64x(0xFFFFF);
    int64_t i = 0;
    for (; i + 4 <= len; i += 4) {
        const __m256i ra = _mm256_loadu_si256((const __m256i *)(r + i));
        const __m256i k0 = _mm256_and_si256(ra, m21);
        const __m256i k1 = _mm256_and_si256(_mm256_srli_epi64(ra, 21), m20);
        const __m256i k2 = _mm256_srli_epi64(ra, 41);
        __m256i x;
        if (btype == 8) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)((const int64_t *)b + i));
            bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpgt_epi64(v, hib),
                                                       _mm256_cmpgt_epi64(lob, v)));
            const __m256i hi = _mm256_srli_epi64(v, 31);
            x = _mm256_and_si256(v, m31);
            h0 = _mm256_add_epi64(h0, _mm256_mul_epi32(k0, hi));
            h1 = _mm256_add_epi64(h1, _mm256_mul_epi32(k1, hi));
            h2 = _mm256_add_epi64(h2, _mm256_mul_epi32(k2, hi));
        } else if (btype == 2) {
            int64_t w; memcpy(&w, (const int16_t *)b + i, 8);
            x = _mm256_cvtepi16_epi64(_mm_cvtsi64_si128(w));
        } else if (btype == 1) {
            int32_t w; memcpy(&w, (const int8_t *)b + i, 4);
            x = _mm256_cvtepi8_epi64(_mm_cvtsi32_si128(w));
        } else {
            x = _mm256_cvtepi32_epi64(_mm_loadu_si128((const __m128i *)((const int32_t *)b + i)));
        }
        if (btype != 8)
            bad = _mm256_or_si256(bad, _mm256_or_si256(_mm256_cmpgt_epi64(x, hib),
                                                       _mm256_cmpgt_epi64(lob, x)));
        a0 = _mm256_add_epi64(a0, _mm256_mul_epi32(k0, x));
        a1 = _mm256_add_epi64(a1, _mm256_mul_epi32(k1, x));
        a2 = _mm256_add_epi64(a2, _mm256_mul_epi32(k2, x));
    }
    int64_t t[6];
    const int64_t tail = sums_plain(r + i, (const char *)b + i * btype, btype, len - i, bound, t);
    s[0] = t[0] + hsum256(a0); s[1] = t[1] + hsum256(a1); s[2] = t[2] + hsum256(a2);
    s[3] = t[3] + hsum256(h0); s[4] = t[4] + hsum256(h1); s[5] = t[5] + hsum256(h2);
    return tail | !_mm256_testz_si256(bad, bad);
}
#endif

typedef int64_t (*sums_fn)(const int64_t *, const void *, int64_t, int64_t, int64_t,
                           int64_t[6]);

static const int64_t LIMB_SHIFT[3] = {0, 21, 41};

/* The block-sum routine of the active route (AVX-512, AVX2, plain C). */
static sums_fn pick_sums(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    const int64_t route = attn_active_route();
    if (route == 2) return sums_avx512;
    if (route == 1) return sums_avx2;
#endif
    return sums_plain;
}

/* A row's six limb totals recombined into its residue: limb j % 3 of the secret, times the
 * value's lo (j < 3) or hi (j >= 3, weight 2^31) part. */
static uint64_t recombine(const uint64_t tot[6]) {
    uint64_t acc = 0;
    for (int j = 0; j < 6; j++)
        acc = fv_add(acc, fv_shift(tot[j], LIMB_SHIFT[j % 3] + 31 * (j / 3)));
    return acc;
}

#define FV_ROWS 64 /* rows per pass over the columns (their running totals on the stack) */
#define IFMA_LIMIT ((int64_t)1 << 51) /* bound below it: z + bound in [0, 2^52), IFMA's width */

static int ifma_ok(void);
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
static int64_t dot_ifma(const int64_t *a, int64_t n, const void *b, int64_t btype, int64_t rows,
                        int64_t bound, uint64_t *out);
#endif

/* out[m] for rows m of b (btype: its width in bytes, 1, 2, 4 or 8; row-major [rows][n]), with
 * a the secret residues int64 [n] (each below P: the caller checks) and every |b| <= bound < 2^62
 * checked on the way. 0 on success; -3: a value beyond the bound (out is then undefined); -5:
 * bad btype or bound. */
int64_t fv_dot(const int64_t *a, int64_t n, const void *b, int64_t btype, int64_t rows,
               int64_t bound, uint64_t *out) {
    const sums_fn sums = pick_sums();
    if ((btype != 1 && btype != 2 && btype != 4 && btype != 8) || bound < 0
        || bound >= ((int64_t)1 << 62)) /* hi = b >> 31 must fit int32 */
        return -5;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    if (bound < IFMA_LIMIT && ifma_ok()) return dot_ifma(a, n, b, btype, rows, bound, out);
#endif
    int64_t bad = 0;
    for (int64_t m0 = 0; m0 < rows; m0 += FV_ROWS) {
        const int64_t mr = rows - m0 < FV_ROWS ? rows - m0 : FV_ROWS;
        uint64_t tot[FV_ROWS][6];
        memset(tot, 0, sizeof tot);
        for (int64_t i0 = 0; i0 < n; i0 += FV_BLOCK) {
            const int64_t len = n - i0 < FV_BLOCK ? n - i0 : FV_BLOCK;
            for (int64_t m = 0; m < mr; m++) {
                const char *row = (const char *)b + ((m0 + m) * n + i0) * btype;
                int64_t s[6];
                bad |= sums(a + i0, row, btype, len, bound, s);
                for (int j = 0; j < 6; j++) tot[m][j] = fv_add(tot[m][j], fv_of(s[j]));
            }
        }
        for (int64_t m = 0; m < mr; m++) out[m0 + m] = recombine(tot[m]);
    }
    return bad ? -3 : 0;
}

/* A block of len packed values (w bytes each) at src into dst; the first `safe` of them may be
 * read with an 8-byte load (their 8 bytes lie inside the array), the others w bytes at a time. */
#define UNPACK_BLOCK(W) \
    static void unpack_block_##W(const uint8_t *src, int64_t len, int64_t safe, int64_t *dst) { \
        int64_t i = 0; \
        for (; i < safe && i < len; i++) { \
            uint64_t u; \
            memcpy(&u, src + i * (W), 8); \
            dst[i] = (int64_t)(u << (64 - 8 * (W))) >> (64 - 8 * (W)); \
        } \
        for (; i < len; i++) { \
            uint64_t u = 0; \
            memcpy(&u, src + i * (W), (W)); \
            dst[i] = (int64_t)(u << (64 - 8 * (W))) >> (64 - 8 * (W)); \
        } \
    }
UNPACK_BLOCK(1) UNPACK_BLOCK(2) UNPACK_BLOCK(3) UNPACK_BLOCK(4)
UNPACK_BLOCK(5) UNPACK_BLOCK(6) UNPACK_BLOCK(7) UNPACK_BLOCK(8)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* AVX-512 VBMI: eight values per step. A masked load takes their 8w bytes (no byte past the
 * array is read); one byte permutation puts value j's w bytes at the top of 64-bit lane j; an
 * arithmetic shift by 64 - 8w sign-extends it, as the scalar decoder's two shifts do. */
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) static void unpack_block_vbmi(
        const uint8_t *src, int64_t len, int64_t w, int64_t *dst) {
    uint8_t idx[64];
    for (int j = 0; j < 8; j++)
        for (int b = 0; b < 8; b++)
            idx[8 * j + b] = (uint8_t)(j * w + (b >= 8 - w ? b - (8 - w) : 0));
    const __m512i perm = _mm512_loadu_si512((const void *)idx);
    const __mmask64 full = 8 * w == 64 ? ~(__mmask64)0 : (((__mmask64)1 << (8 * w)) - 1);
    const __m512i sh = _mm512_set1_epi64(64 - 8 * w);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        const __m512i raw = _mm512_maskz_loadu_epi8(full, src + i * w);
        _mm512_storeu_si512((void *)(dst + i),
                            _mm512_srav_epi64(_mm512_permutexvar_epi8(perm, raw), sh));
    }
    if (i < len) {
        const int64_t rest = len - i;
        const __mmask64 m = (((__mmask64)1 << (rest * w)) - 1);
        const __m512i raw = _mm512_maskz_loadu_epi8(m, src + i * w);
        int64_t t[8];
        _mm512_storeu_si512((void *)t, _mm512_srav_epi64(_mm512_permutexvar_epi8(perm, raw), sh));
        memcpy(dst + i, t, (size_t)rest * 8);
    }
}
#endif

typedef void (*unpack_fn)(const uint8_t *, int64_t, int64_t, int64_t *);
static const unpack_fn UNPACK[9] = {NULL, unpack_block_1, unpack_block_2, unpack_block_3,
                                    unpack_block_4, unpack_block_5, unpack_block_6,
                                    unpack_block_7, unpack_block_8};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* AVX2: four values per step, two per 128-bit lane: a 16-byte load at value i (values i, i + 1)
 * and one at value i + 2 (i + 2, i + 3); a byte shuffle puts value j's w bytes at the bottom of
 * 64-bit lane j (zeros above); (u ^ 2^(8w-1)) - 2^(8w-1) sign-extends it (AVX2 has no 64-bit
 * arithmetic shift), the scalar decoder's value. A 16-byte load at value j stays inside the array
 * when value j + ceil(8 / w) may take an 8-byte one (below `safe`); the rest as the scalar
 * decoder does. */
__attribute__((target("avx2"))) static void unpack_block_avx2(const uint8_t *src, int64_t len,
                                                              int64_t w, int64_t safe,
                                                              int64_t *dst) {
    uint8_t ctl[32];
    for (int lane = 0; lane < 2; lane++)
        for (int v = 0; v < 2; v++)
            for (int b = 0; b < 8; b++)
                ctl[16 * lane + 8 * v + b] = b < w ? (uint8_t)(v * w + b) : 0x80;
    const __m256i c = _mm256_loadu_si256((const __m256i *)ctl);
    const __m256i m = _mm256_set1_epi64x(w == 8 ? 0 : (int64_t)((uint64_t)1 << (8 * w - 1)));
    const int64_t ahead = 2 + (8 + w - 1) / w; /* the second load's value, and its 16 bytes */
    int64_t i = 0;
    for (; i + 4 <= len && i + ahead < safe; i += 4) {
        const __m256i raw = _mm256_loadu2_m128i((const __m128i *)(src + (i + 2) * w),
                                                (const __m128i *)(src + i * w));
        const __m256i u = _mm256_shuffle_epi8(raw, c);
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_sub_epi64(_mm256_xor_si256(u, m), m));
    }
    if (i < len) UNPACK[w](src + i * w, len - i, safe - i, dst + i);
}
#endif

/* The unpack route: 2 AVX-512 VBMI, 1 AVX2, 0 plain C (attn_route's route). */
static int unpack_route(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    const int64_t r = attn_active_route();
    if (r == 2 && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bw"))
        return 2;
    if (r >= 1 && __builtin_cpu_supports("avx2")) return 1;
#endif
    return 0;
}

static int vbmi_ok(void) { return unpack_route() == 2; }

/* n packed values of w bytes at src into dst: with AVX-512 VBMI eight per masked load, with AVX2
 * four per two 16-byte loads (unpack_block_avx2), else one 8-byte load per value except the last
 * ceil(8 / w), whose 8 bytes would reach past src: those load their w bytes alone. */
static void unpack_any(const uint8_t *src, int64_t n, int64_t w, int64_t safe, int64_t *dst,
                       int route) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    if (route == 2) {
        unpack_block_vbmi(src, n, w, dst);
        return;
    }
    if (route == 1) {
        unpack_block_avx2(src, n, w, safe, dst);
        return;
    }
#endif
    (void)route;
    UNPACK[w](src, n, safe, dst);
}

/* Packed accumulators (opening version 2): n integers of w bytes (1 to 8) each, little-endian
 * two's complement at src, into int64 dst, sign-extended: the w bytes are the low bytes of a
 * uint64, shifted to the top and shifted back arithmetically (GCC and Clang define the
 * conversion and the signed shift as two's complement). 0, or -5 for a bad width. */
int64_t acc_unpack(const uint8_t *src, int64_t n, int64_t w, int64_t *dst) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    (void)src, (void)n, (void)w, (void)dst;
    return -5; /* the numpy route decodes on other hosts */
#else
    if (w < 1 || w > 8) return -5;
    if (n > 0) unpack_any(src, n, w, n - (8 + w - 1) / w, dst, unpack_route());
    return 0;
#endif
}

int64_t br_dequant(const int64_t *z, int64_t rows, int64_t n, const float *sx, const float *sw,
                   const float *bias, const float *resid, int64_t rs, float *y); /* bridge.c */

/* The fused AVX-512 IFMA route of fv_acc_linear (bound < 2^51): on or off for tests (-1: on when
 * the CPU has it, with the AVX-512 route active; 0: off), and whether it is in use now. */
static int64_t ifma_mode = -1;

static int ifma_ok(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    return ifma_mode != 0 && vbmi_ok() && __builtin_cpu_supports("avx512ifma")
           && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
    return 0;
#endif
}

int64_t fv_ifma(int64_t mode) {
    ifma_mode = mode == 0 ? 0 : -1;
    return ifma_ok();
}

/* The IFMA route asks for the next block's bytes (FV_PREFETCH values on: this row's packed
 * values, the secret and the weight scales, the residual) while it works on this one; the rows
 * of a block are the inner loop, so the hardware prefetchers see short interleaved streams. A
 * prefetch never faults, past the arrays' ends included. Measured on a routine 8B audit (cold
 * layer data): about 15 us less per ly_pre / ly_post call. */
#define FV_PREFETCH 1024
/* the address as an integer: no pointer is formed past an array's end */
#define FV_PF(p, bytes) _mm_prefetch((const char *)((uintptr_t)(p) + (uintptr_t)(bytes)), _MM_HINT_T0)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define IFMA_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512ifma")))

/* Eight values (k: which are there) of block_ifma into the accumulators of one of its two
 * interleaved sets (two sets, and two for the middle term, so no IFMA waits on the previous
 * one's result). */
typedef struct {
    __m512i s0, s1, t1, s2, q0, q1;
} ifma_acc;

/* The sums of eight values z (k: which are there) into one accumulator set: u = z + bound, its
 * range (u <= 2 bound, unsigned: z < -bound wraps above it), the four 52-bit products with the
 * secret's parts lo and hi, and (sum_a) the parts themselves. */
IFMA_TARGET static inline __attribute__((always_inline)) void sum_ifma(
        ifma_acc *A, const int64_t *a, __m512i z, __mmask8 k, __m512i off, __m512i lim, int sum_a,
        __mmask8 *badz) {
    const __m512i m52 = _mm512_set1_epi64(((int64_t)1 << 52) - 1);
    const __m512i u = _mm512_maskz_add_epi64(k, z, off);
    *badz |= _mm512_mask_cmpgt_epu64_mask(k, u, lim);
    const __m512i ra = _mm512_maskz_loadu_epi64(k, a);
    const __m512i lo = _mm512_and_si512(ra, m52), hi = _mm512_srli_epi64(ra, 52);
    A->s0 = _mm512_madd52lo_epu64(A->s0, lo, u);
    A->s1 = _mm512_madd52hi_epu64(A->s1, lo, u);
    A->t1 = _mm512_madd52lo_epu64(A->t1, hi, u);
    A->s2 = _mm512_madd52hi_epu64(A->s2, hi, u);
    if (sum_a) {
        A->q0 = _mm512_add_epi64(A->q0, lo);
        A->q1 = _mm512_add_epi64(A->q1, hi);
    }
}

IFMA_TARGET static inline __attribute__((always_inline)) void step_ifma(
        ifma_acc *A, const int64_t *a, const uint8_t *src, int64_t w, __mmask8 k, __mmask64 bm,
        __m512i perm, __m512i sh, __m512i off, __m512i lim, __m256 vsx, const float *sw,
        const float *bias, const float *resid, float *y, int sum_a, __mmask8 *badz,
        __mmask8 *badf) {
    const __m256 fmax = _mm256_set1_ps(3.40282347e38f);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m512i raw = _mm512_maskz_loadu_epi8(bm, src);
    const __m512i z = _mm512_srav_epi64(_mm512_permutexvar_epi8(perm, raw), sh);
    sum_ifma(A, a, z, k, off, lim, sum_a, badz);
    __m256 t = _mm512_cvtpd_ps(_mm512_cvtepi64_pd(z));
    t = _mm256_mul_ps(t, vsx);
    t = _mm256_mul_ps(t, _mm256_maskz_loadu_ps(k, sw));
    if (bias) t = _mm256_add_ps(t, _mm256_maskz_loadu_ps(k, bias));
    if (resid) t = _mm256_add_ps(_mm256_maskz_loadu_ps(k, resid), t);
    *badf |= k & ~_mm256_cmp_ps_mask(_mm256_and_ps(t, absmask), fmax, _CMP_LE_OQ);
    _mm256_mask_storeu_ps(y, k, t);
}

/* The two sets' sums over their lanes into s[0..3) and (rs given) rs[0..2). */
IFMA_TARGET static inline void reduce_ifma(const ifma_acc *A, const ifma_acc *B, uint64_t s[3],
                                           uint64_t rs[2]) {
    s[0] = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(A->s0, B->s0));
    s[1] = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(A->s1, B->s1),
                                                               _mm512_add_epi64(A->t1, B->t1)));
    s[2] = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(A->s2, B->s2));
    if (rs) {
        rs[0] = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(A->q0, B->q0));
        rs[1] = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(A->q1, B->q1));
    }
}

/* A row's residue from its three totals (weights 1, 2^52, 2^104) less bound * sum(a): the
 * offset's share (a z = a u - bound a). */
static uint64_t recombine_ifma(const uint64_t tot[3], uint64_t corr) {
    uint64_t acc = fv_add(tot[0], fv_shift(tot[1], 52));
    acc = fv_add(acc, fv_shift(tot[2], 104));
    return fv_add(acc, corr ? FV_P - corr : 0);
}

/* bound * (sum_lo + 2^52 sum_hi) mod P, for bound < 2^51 and sums below P */
static uint64_t offset_share(int64_t bound, uint64_t sum_lo, uint64_t sum_hi) {
    const uint64_t asum = fv_add(sum_lo, fv_shift(sum_hi, 52));
    const unsigned __int128 pr = (unsigned __int128)(uint64_t)bound * asum;
    return fv_fold(((uint64_t)pr & FV_P) + (uint64_t)(pr >> 61));
}

/* A row's block sums s (and, in the first pass, the secret's parts q) into its totals mod P:
 * the shared step of the two IFMA drivers below. */
static void take_block(uint64_t tot[3], const uint64_t s[3], const uint64_t *q,
                       uint64_t sums[2]) {
    for (int j = 0; j < 3; j++) tot[j] = fv_add(tot[j], fv_fold(s[j]));
    if (q) {
        sums[0] = fv_add(sums[0], fv_fold(q[0]));
        sums[1] = fv_add(sums[1], fv_fold(q[1]));
    }
}

/* The residues of a pass's mr rows from their totals, less the offset's share. */
static void finish_rows(uint64_t tot[][3], int64_t mr, int64_t bound, const uint64_t sums[2],
                        uint64_t *out) {
    const uint64_t corr = offset_share(bound, sums[0], sums[1]);
    for (int64_t m = 0; m < mr; m++) out[m] = recombine_ifma(tot[m], corr);
}

/* One row's block of len <= FV_BLOCK packed values in one pass, eight per step: decoded as
 * unpack_block_vbmi decodes them (masked load, byte permutation, arithmetic shift), bounded,
 * summed and dequantized without leaving the registers.
 * The sum: with u = z + bound in [0, 2^52) (for every |z| <= bound; a value beyond it is flagged
 * and nothing else matters) and the secret residue a = lo + hi 2^52 (lo < 2^52, hi < 2^9), IFMA
 * gives the low and the high 52 bits of the exact 104-bit products lo u and hi u, so
 *     a u = L(lo u) + 2^52 (H(lo u) + L(hi u)) + 2^104 H(hi u)
 * summed into s[0], s[1], s[2]. Every term is below 2^52 and a block has at most FV_BLOCK =
 * 1,024 values, so s[0] (one term per value, over all lanes and both accumulator sets) stays
 * below 2^62, s[1] (two) below 2^63, s[2] far below; every lane's partial sum is smaller still,
 * so nothing wraps in any order of addition. When rs is given, the block's lo and hi parts of a are
 * summed into rs[0], rs[1] (for the offset: a z = a u - bound a). Dequantized as dequant_row
 * computes it: f32(f64(z)) * sx * sw [+ bias] [resid +], each step one IEEE operation in
 * round-to-nearest-even (|z| < 2^51, so the conversion to f64 is exact). Returns 1 for a value
 * beyond the bound, 2 for a non-finite output (the bound first, as the other route checks it
 * first), else 0. */
IFMA_TARGET static inline int64_t block_ifma(
        const int64_t *a, const uint8_t *src, int64_t len, int64_t w, __m512i perm, __m512i sh,
        __mmask64 full, int64_t bound, float sx, const float *sw, const float *bias,
        const float *resid, float *y, uint64_t s[3], uint64_t rs[2]) {
    const __m512i off = _mm512_set1_epi64(bound), lim = _mm512_set1_epi64(2 * bound);
    const __m256 vsx = _mm256_set1_ps(sx);
    const __m512i zero = _mm512_setzero_si512();
    ifma_acc A = {zero, zero, zero, zero, zero, zero}, B = A;
    __mmask8 badz = 0, badf = 0;
    const int sum_a = rs != NULL;
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
        FV_PF(src, (i + FV_PREFETCH) * w);
        FV_PF(src, (i + FV_PREFETCH) * w + 64);
        FV_PF(a, (i + FV_PREFETCH) * 8);
        FV_PF(a, (i + FV_PREFETCH) * 8 + 64);
        FV_PF(sw, (i + FV_PREFETCH) * 4);
        if (resid) FV_PF(resid, (i + FV_PREFETCH) * 4);
        step_ifma(&A, a + i, src + i * w, w, 0xFF, full, perm, sh, off, lim, vsx, sw + i,
                  bias ? bias + i : NULL, resid ? resid + i : NULL, y + i, sum_a, &badz, &badf);
        step_ifma(&B, a + i + 8, src + (i + 8) * w, w, 0xFF, full, perm, sh, off, lim, vsx,
                  sw + i + 8, bias ? bias + i + 8 : NULL, resid ? resid + i + 8 : NULL, y + i + 8,
                  sum_a, &badz, &badf);
    }
    for (; i < len; i += 8) {
        const int64_t rest = len - i;
        const __mmask8 k = rest >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << rest) - 1);
        const __mmask64 bm = rest >= 8 ? full : (((__mmask64)1 << (rest * w)) - 1);
        step_ifma(&A, a + i, src + i * w, w, k, bm, perm, sh, off, lim, vsx, sw + i,
                  bias ? bias + i : NULL, resid ? resid + i : NULL, y + i, sum_a, &badz, &badf);
    }
    reduce_ifma(&A, &B, s, rs);
    return badz ? 1 : (badf ? 2 : 0);
}

/* fv_acc_linear on the IFMA route (bound < 2^51, every width): the same blocks and rows in the
 * same order, each block checked (bound, then the dequantization) before the next, so the codes
 * are the other route's; out[m] = sum a z_m mod P is the same residue (it is unique). */
IFMA_TARGET static int64_t acc_linear_ifma(
        const int64_t *a, int64_t n, const uint8_t *zp, int64_t w, int64_t rows, int64_t bound,
        uint64_t *out, const float *sx, const float *sw, const float *bias, const float *resid,
        int64_t rs, float *y) {
    uint8_t idx[64];
    for (int j = 0; j < 8; j++)
        for (int b = 0; b < 8; b++)
            idx[8 * j + b] = (uint8_t)(j * w + (b >= 8 - w ? b - (8 - w) : 0));
    const __m512i perm = _mm512_loadu_si512((const void *)idx);
    const __mmask64 full = 8 * w == 64 ? ~(__mmask64)0 : (((__mmask64)1 << (8 * w)) - 1);
    const __m512i sh = _mm512_set1_epi64(64 - 8 * w);
    uint64_t sums[2] = {0, 0}; /* a's lo and hi parts summed mod P (the first pass) */
    for (int64_t m0 = 0; m0 < rows; m0 += FV_ROWS) {
        const int64_t mr = rows - m0 < FV_ROWS ? rows - m0 : FV_ROWS;
        uint64_t tot[FV_ROWS][3];
        memset(tot, 0, sizeof tot);
        for (int64_t i0 = 0; i0 < n; i0 += FV_BLOCK) {
            const int64_t len = n - i0 < FV_BLOCK ? n - i0 : FV_BLOCK;
            for (int64_t m = 0; m < mr; m++) {
                const int64_t first = (m0 + m) * n + i0;
                uint64_t s[3], q[2];
                const int first_pass = m0 == 0 && m == 0;
                const int64_t bad = block_ifma(
                    a + i0, zp + first * w, len, w, perm, sh, full, bound, sx[m0 + m], sw + i0,
                    bias ? bias + i0 : NULL, resid ? resid + (m0 + m) * rs + i0 : NULL,
                    y + first, s, first_pass ? q : NULL);
                if (bad) return bad == 1 ? -3 : -1;
                take_block(tot[m], s, first_pass ? q : NULL, sums);
            }
        }
        finish_rows(tot, mr, bound, sums, out + m0);
    }
    return 0;
}

/* Eight values of an int8, int16, int32 or int64 row (k: which are there) as int64 lanes. */
IFMA_TARGET static inline __attribute__((always_inline)) __m512i load_ifma(
        const void *b, int64_t btype, int64_t i, __mmask8 k) {
    if (btype == 1) return _mm512_cvtepi8_epi64(_mm_maskz_loadu_epi8(k, (const int8_t *)b + i));
    if (btype == 2) return _mm512_cvtepi16_epi64(_mm_maskz_loadu_epi16(k, (const int16_t *)b + i));
    if (btype == 4)
        return _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(k, (const int32_t *)b + i));
    return _mm512_maskz_loadu_epi64(k, (const int64_t *)b + i);
}

/* One row's block of fv_dot on the IFMA route: s[0..3) (and rs) as block_ifma sums them; 1 when
 * a value is beyond the bound, else 0. */
IFMA_TARGET static inline int64_t dot_block_ifma(const int64_t *a, const void *b, int64_t btype,
                                                 int64_t len, int64_t bound, uint64_t s[3],
                                                 uint64_t rs[2]) {
    const __m512i off = _mm512_set1_epi64(bound), lim = _mm512_set1_epi64(2 * bound);
    const __m512i zero = _mm512_setzero_si512();
    ifma_acc A = {zero, zero, zero, zero, zero, zero}, B = A;
    __mmask8 bad = 0;
    const int sum_a = rs != NULL;
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
        sum_ifma(&A, a + i, load_ifma(b, btype, i, 0xFF), 0xFF, off, lim, sum_a, &bad);
        sum_ifma(&B, a + i + 8, load_ifma(b, btype, i + 8, 0xFF), 0xFF, off, lim, sum_a, &bad);
    }
    for (; i < len; i += 8) {
        const int64_t rest = len - i;
        const __mmask8 k = rest >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << rest) - 1);
        sum_ifma(&A, a + i, load_ifma(b, btype, i, k), k, off, lim, sum_a, &bad);
    }
    reduce_ifma(&A, &B, s, rs);
    return bad != 0;
}

/* fv_dot on the IFMA route (bound < 2^51): the same blocks and rows; the same residues. */
IFMA_TARGET static int64_t dot_ifma(const int64_t *a, int64_t n, const void *b, int64_t btype,
                                    int64_t rows, int64_t bound, uint64_t *out) {
    uint64_t sums[2] = {0, 0};
    for (int64_t m0 = 0; m0 < rows; m0 += FV_ROWS) {
        const int64_t mr = rows - m0 < FV_ROWS ? rows - m0 : FV_ROWS;
        uint64_t tot[FV_ROWS][3];
        memset(tot, 0, sizeof tot);
        for (int64_t i0 = 0; i0 < n; i0 += FV_BLOCK) {
            const int64_t len = n - i0 < FV_BLOCK ? n - i0 : FV_BLOCK;
            for (int64_t m = 0; m < mr; m++) {
                const char *row = (const char *)b + ((m0 + m) * n + i0) * btype;
                uint64_t s[3], q[2];
                const int first_pass = m0 == 0 && m == 0;
                if (dot_block_ifma(a + i0, row, btype, len, bound, s, first_pass ? q : NULL))
                    return -3;
                take_block(tot[m], s, first_pass ? q : NULL, sums);
            }
        }
        finish_rows(tot, mr, bound, sums, out + m0);
    }
    return 0;
}
#endif

/* One opened linear in one pass over its packed accumulators (opening version 2): rows x n
 * values of w bytes at zp, decoded a block of FV_BLOCK at a time into a buffer that stays in L1;
 * each block is bounded (every |z| <= bound), summed into out[m] = a z_m mod P as fv_dot sums
 * it (the same block sums), and dequantized into y [rows][n] as br_dequant computes it (scale
 * sx[m], weight scales sw, bias, resid rows of stride rs; every element on its own, so a block
 * at a time gives the same values). 0; -3: a value beyond the bound; -1: a value br_dequant
 * does not take (|z| >= 2^53, a non-finite output); -5: bad width or bound. On a non-zero code
 * out and y are undefined. */
int64_t fv_acc_linear(const int64_t *a, int64_t n, const uint8_t *zp, int64_t w, int64_t rows,
                      int64_t bound, uint64_t *out, const float *sx, const float *sw,
                      const float *bias, const float *resid, int64_t rs, float *y) {
    const sums_fn sums = pick_sums();
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    return -5;
#endif
    if (w < 1 || w > 8 || bound < 0 || bound >= ((int64_t)1 << 62)) return -5;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    if (bound < IFMA_LIMIT && ifma_ok())
        return acc_linear_ifma(a, n, zp, w, rows, bound, out, sx, sw, bias, resid, rs, y);
#endif
    const int route = unpack_route();
    const int64_t total = rows * n, safe_all = total - (8 + w - 1) / w;
    int64_t zb[FV_BLOCK];
    int64_t bad = 0;
    for (int64_t m0 = 0; m0 < rows; m0 += FV_ROWS) {
        const int64_t mr = rows - m0 < FV_ROWS ? rows - m0 : FV_ROWS;
        uint64_t tot[FV_ROWS][6];
        memset(tot, 0, sizeof tot);
        for (int64_t i0 = 0; i0 < n; i0 += FV_BLOCK) {
            const int64_t len = n - i0 < FV_BLOCK ? n - i0 : FV_BLOCK;
            for (int64_t m = 0; m < mr; m++) {
                const int64_t first = (m0 + m) * n + i0; /* the block's first value */
                unpack_any(zp + first * w, len, w, safe_all - first, zb, route);
                int64_t s[6];
                bad |= sums(a + i0, zb, 8, len, bound, s);
                for (int j = 0; j < 6; j++) tot[m][j] = fv_add(tot[m][j], fv_of(s[j]));
                if (bad) return -3;
                if (br_dequant(zb, 1, len, sx + m0 + m, sw + i0, bias ? bias + i0 : NULL,
                               resid ? resid + (m0 + m) * rs + i0 : NULL, 0, y + first))
                    return -1;
            }
        }
        for (int64_t m = 0; m < mr; m++) out[m0 + m] = recombine(tot[m]);
    }
    return 0;
}
