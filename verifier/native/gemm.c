/* Exact integer GEMM for the engine's linears at few rows (decode steps): z = x . w^T in int64,
 * from int16 activations and int8 weights, with no int8 planes to split and recombine.
 *
 *   z[m][n] = sum_k x[m][k] * w[n][k]     x int16 [M][K2] (K2 = K rounded up to even, zeros),
 *                                         w int8 [N][K] (or int16 as two int8 planes),
 *                                         z int64 [M][N]
 *
 * Bounds: |x| <= 2^15 and |w| <= 2^7 for any int16 and int8, so a pair x0*w0 + x1*w1 is at most
 * 2^23 and GCHUNK = 128 pairs (256 products) stay at most 2^30 < 2^31 before they are widened
 * into int64; z is exact for any K below 2^40. Integer sums in any order give the same integers,
 * so the SIMD routes (AVX-512 VNNI vpdpwssd, AVX2 vpmaddwd) and the plain C one agree bit for bit
 * (tests/test_native.py compares each with int64 numpy on extreme values).
 *
 * Weight layout (commitllm.verifier.native.pack_weight): wp int8 [NB][K2/2][GN][2], NB =
 * ceil(N / GN) blocks of GN = 16 output columns; in block b, pair p, lane l holds
 * (w[16b + l][2p], w[16b + l][2p + 1]); zeros past N and K. A block's weights are contiguous,
 * so a call streams the weight once, block after block, and each block stays in L1 while every
 * row tile of x passes over it.
 *
 * The call computes blocks b0 .. b1 - 1 (threads split the blocks; the split changes no bit).
 * The route is attn.c's (attn_active_route: 0 plain C, 1 AVX2, 2 AVX-512 VNNI).
 */
#include "exact.h"

#define GN 16      /* output columns per weight block */
#define GCHUNK 128 /* pairs summed in int32 before widening */
#define GR 4       /* rows of x per tile */

int64_t attn_active_route(void);

/* the pair x[2p], x[2p + 1] as one int32 (memcpy: no aliasing of int16 data as int32) */
static inline int32_t pair32(const int16_t *x) {
    int32_t v;
    memcpy(&v, x, sizeof v);
    return v;
}

/* the GR row pointers of the tile at row r0, and how many are real: rows past the last repeat
 * row r0 (computed, never stored) */
static inline int tile_rows(const int16_t *x, int64_t rows, int64_t xs, int64_t r0,
                            const int16_t *xr[GR]) {
    const int nr = rows - r0 < GR ? (int)(rows - r0) : GR;
    for (int r = 0; r < GR; r++) xr[r] = x + (r0 + (r < nr ? r : 0)) * xs;
    return nr;
}

static void block_plain(const int16_t *x, int64_t rows, int64_t xs, const int8_t *wb,
                        int64_t kp, int64_t *acc /* [rows][GN] */) {
    for (int64_t r = 0; r < rows; r++) {
        const int16_t *xr = x + r * xs;
        for (int l = 0; l < GN; l++) {
            int64_t s = 0;
            for (int64_t p = 0; p < kp; p++)
                s += (int64_t)xr[2 * p] * wb[(p * GN + l) * 2]
                     + (int64_t)xr[2 * p + 1] * wb[(p * GN + l) * 2 + 1];
            acc[r * GN + l] = s;
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define AVX2 __attribute__((target("avx2")))

VNNI static inline void widen512(int64_t *dst, __m512i a) {
    __m512i a0 = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a));
    __m512i a1 = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a, 1));
    _mm512_storeu_si512(dst, _mm512_add_epi64(_mm512_loadu_si512(dst), a0));
    _mm512_storeu_si512(dst + 8, _mm512_add_epi64(_mm512_loadu_si512(dst + 8), a1));
}

VNNI static void block_vnni(const int16_t *x, int64_t rows, int64_t xs, const int8_t *wb,
                            int64_t kp, int64_t *acc) {
    for (int64_t i = 0; i < rows * GN; i++) acc[i] = 0;
    for (int64_t r0 = 0; r0 < rows; r0 += GR) {
        const int16_t *xr[GR];
        const int nr = tile_rows(x, rows, xs, r0, xr);
        for (int64_t c0 = 0; c0 < kp; c0 += GCHUNK) {
            const int64_t c1 = c0 + GCHUNK < kp ? c0 + GCHUNK : kp;
            __m512i a[GR];
            for (int r = 0; r < GR; r++) a[r] = _mm512_setzero_si512();
            for (int64_t p = c0; p < c1; p++) {
                const __m512i w = _mm512_cvtepi8_epi16(
                    _mm256_loadu_si256((const __m256i *)(wb + p * 2 * GN)));
                for (int r = 0; r < GR; r++)
                    a[r] = _mm512_dpwssd_epi32(a[r], _mm512_set1_epi32(pair32(xr[r] + 2 * p)), w);
            }
            for (int r = 0; r < nr; r++) widen512(acc + (r0 + r) * GN, a[r]);
        }
    }
}

AVX2 static inline void widen256(int64_t *dst, __m256i a) {
    __m256i a0 = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(a));
    __m256i a1 = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(a, 1));
    _mm256_storeu_si256((__m256i *)dst,
                        _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)dst), a0));
    _mm256_storeu_si256((__m256i *)(dst + 4),
                        _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)(dst + 4)), a1));
}

AVX2 static void block_avx2(const int16_t *x, int64_t rows, int64_t xs, const int8_t *wb,
                            int64_t kp, int64_t *acc) {
    for (int64_t i = 0; i < rows * GN; i++) acc[i] = 0;
    for (int64_t r0 = 0; r0 < rows; r0 += GR) {
        const int16_t *xr[GR];
        const int nr = tile_rows(x, rows, xs, r0, xr);
        for (int half = 0; half < 2; half++) {  /* lanes 0-7, then 8-15 */
            for (int64_t c0 = 0; c0 < kp; c0 += GCHUNK) {
                const int64_t c1 = c0 + GCHUNK < kp ? c0 + GCHUNK : kp;
                __m256i a[GR];
                for (int r = 0; r < GR; r++) a[r] = _mm256_setzero_si256();
                for (int64_t p = c0; p < c1; p++) {
                    const __m256i w = _mm256_cvtepi8_epi16(
                        _mm_loadu_si128((const __m128i *)(wb + p * 2 * GN + GN * half)));
                    for (int r = 0; r < GR; r++)
                        a[r] = _mm256_add_epi32(
                            a[r], _mm256_madd_epi16(_mm256_set1_epi32(pair32(xr[r] + 2 * p)), w));
                }
                for (int r = 0; r < nr; r++) widen256(acc + (r0 + r) * GN + 8 * half, a[r]);
            }
        }
    }
}
#endif

typedef void (*block_fn)(const int16_t *, int64_t, int64_t, const int8_t *, int64_t, int64_t *);

/* z[m][16b + l] for blocks b0 .. b1 - 1 (l < 16, columns below n); x rows of stride xs int16
 * elements, kp pairs. The weight has nw planes (1 for int8 weights; int16 ones as 2: hi, then
 * lo, w = 256 * hi + lo), each [NB][kp][16][2] at a stride of ps bytes:
 * z = sum over planes of 256^(nw - 1 - h) * (x . plane h). 0, -2 bad plane count, -3 no memory. */
int64_t gemm_i16i8(const int16_t *x, int64_t rows, int64_t xs, const int8_t *wp, int64_t nw,
                   int64_t ps, int64_t kp, int64_t n, int64_t b0, int64_t b1, int64_t *z) {
    if (nw < 1 || nw > 2) return -2;
    if (rows <= 0 || b1 <= b0) return 0;
    block_fn f = block_plain;
#if defined(__x86_64__) && defined(__GNUC__)
    const int64_t route = attn_active_route();
    if (route == 2) f = block_vnni;
    if (route == 1) f = block_avx2;
#endif
    int64_t *acc = malloc((size_t)rows * GN * sizeof(int64_t) * (size_t)nw);
    if (!acc) return -3;
    int64_t *lo = acc + rows * GN;
    for (int64_t b = b0; b < b1; b++) {
        f(x, rows, xs, wp + b * kp * 2 * GN, kp, acc);
        if (nw == 2) {  /* |x . hi| < 2^53 / 256 for any K below 2^30: the shift is exact */
            f(x, rows, xs, wp + ps + b * kp * 2 * GN, kp, lo);
            for (int64_t i = 0; i < rows * GN; i++) acc[i] = acc[i] * 256 + lo[i];
        }
        const int64_t cols = n - b * GN < GN ? n - b * GN : GN;
        for (int64_t r = 0; r < rows; r++)
            memcpy(z + r * n + b * GN, acc + r * GN, (size_t)cols * sizeof(int64_t));
    }
    free(acc);
    return 0;
}
