/* BLAKE3 (the unkeyed hash, 32-byte digests) of many messages of one length at once, and the
 * Merkle multiproof walk of verifier/merkle.py over it: the trees' leaf and node hashes, which
 * the blake3 package computes one call per message.
 *
 * Written from the BLAKE3 specification (Aumasson, Neves, O'Connor, Wilcox-O'Hearn, 2020): 1024
 * byte chunks of 64-byte blocks, the 7-round compression of a 16-word state, chunk counters,
 * the CHUNK_START / CHUNK_END / PARENT / ROOT flags, and the binary tree whose left subtree
 * holds the largest power of two of chunks below the total. Messages of one length have the same
 * chunk and block structure, so LANES messages run side by side, one per vector lane: every step
 * is a 32-bit integer add, xor or rotation, exact in any order, and each lane computes what a
 * scalar BLAKE3 computes for its message. tests/test_hash_native.py checks every length class
 * (empty, partial blocks, whole chunks, several tree depths) against the blake3 package, and
 * the multiproof walk against merkle.verify_multiproof on honest and tampered proofs.
 */
#include "exact.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "hash.c reads message words with memcpy: little-endian hosts only (others use blake3-py)"
#endif

#define LANES 16
#define CHUNK_LEN 1024
#define BLOCK_LEN 64
#define MAX_STACK 64 /* chunk counts below 2^64 */

enum { CHUNK_START = 1, CHUNK_END = 2, PARENT = 4, ROOT = 8 };

static const uint32_t IV[8] = {0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
                               0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u};

/* The message word order of each round: round r reads the block permuted r times by the
 * specification's permutation (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8). */
static const uint8_t SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

typedef uint32_t lanes_t[LANES];

#define INLINE static inline __attribute__((always_inline))

INLINE uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

INLINE void store32(uint8_t *p, uint32_t w) {
    p[0] = (uint8_t)w, p[1] = (uint8_t)(w >> 8), p[2] = (uint8_t)(w >> 16), p[3] = (uint8_t)(w >> 24);
}

/* The quarter-round G on four state rows and two message rows, every lane at once. */
INLINE void g(uint32_t *restrict a, uint32_t *restrict b, uint32_t *restrict c,
              uint32_t *restrict d, const uint32_t *restrict x, const uint32_t *restrict y) {
    for (int j = 0; j < LANES; j++) {
        a[j] = a[j] + b[j] + x[j];
        d[j] = rotr(d[j] ^ a[j], 16);
        c[j] = c[j] + d[j];
        b[j] = rotr(b[j] ^ c[j], 12);
        a[j] = a[j] + b[j] + y[j];
        d[j] = rotr(d[j] ^ a[j], 8);
        c[j] = c[j] + d[j];
        b[j] = rotr(b[j] ^ c[j], 7);
    }
}

/* cv <- the first eight output words of compress(cv, m, counter, block_len, flags): the next
 * chaining value, and for a ROOT compression the digest's words. */
INLINE void compress(lanes_t cv[8], lanes_t m[16], uint64_t counter, uint32_t block_len,
                     uint32_t flags) {
    lanes_t v[16];
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < LANES; j++) v[i][j] = cv[i][j];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < LANES; j++) v[8 + i][j] = IV[i];
    for (int j = 0; j < LANES; j++) {
        v[12][j] = (uint32_t)counter;
        v[13][j] = (uint32_t)(counter >> 32);
        v[14][j] = block_len;
        v[15][j] = flags;
    }
    for (int r = 0; r < 7; r++) {
        const uint8_t *s = SCHEDULE[r];
        g(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
        g(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
        g(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
        g(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
        g(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
        g(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
        g(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
        g(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < LANES; j++) cv[i][j] = v[i][j] ^ v[i + 8][j];
}

/* The parent node of two chaining values: compress(IV, left || right, 0, 64, PARENT | flags),
 * the result left in right. */
INLINE void parent(lanes_t left[8], lanes_t right[8], uint32_t flags) {
    lanes_t m[16];
    memcpy(m, left, sizeof(lanes_t) * 8);
    memcpy(m + 8, right, sizeof(lanes_t) * 8);
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < LANES; j++) right[i][j] = IV[i];
    compress(right, m, 0, BLOCK_LEN, PARENT | flags);
}

/* A message is the concatenation of the rows of up to MAX_SEGS segments: message i holds bytes
 * base + i * stride .. + width of each segment in turn (a leaf's header, then its arrays' rows,
 * read where they lie instead of copied into one buffer first). */
#define MAX_SEGS 8
struct seg {
    const uint8_t *base;
    int64_t stride, width;
};

/* Bytes off .. off + n of the message of each of the nl <= LANES lanes (n <= 64): the pieces of
 * the segments that the block covers are the same for every lane, so they are found once. Returns 1 with at[j] the
 * address of lane j's 64 bytes when the block is one segment's whole 64 bytes (most blocks);
 * else 0 with each lane's pieces copied into raw[j] (zero filled after n). */
INLINE int block_at(const struct seg *segs, int nseg, const int64_t *rows, int nl, int64_t off,
                    int64_t n, const uint8_t *at[LANES], uint32_t raw[LANES][16]) {
    int64_t src[MAX_SEGS], dst[MAX_SEGS], len[MAX_SEGS];
    int which[MAX_SEGS], pieces = 0;
    for (int64_t s = 0, a = 0; s < nseg && a < off + n; a += segs[s++].width) {
        const int64_t lo = off > a ? off : a;
        const int64_t hi = off + n < a + segs[s].width ? off + n : a + segs[s].width;
        if (lo < hi) which[pieces] = (int)s, src[pieces] = lo - a, dst[pieces] = lo - off,
                     len[pieces++] = hi - lo;
    }
    if (pieces == 1 && n == BLOCK_LEN) {
        const struct seg *g = segs + which[0];
        for (int j = 0; j < nl; j++) at[j] = g->base + rows[j] * g->stride + src[0];
        return 1;
    }
    if (n < BLOCK_LEN) memset(raw, 0, sizeof(uint32_t) * 16 * (size_t)nl);
    for (int j = 0; j < nl; j++)
        for (int k = 0; k < pieces; k++) {
            const struct seg *g = segs + which[k];
            memcpy((uint8_t *)raw[j] + dst[k], g->base + rows[j] * g->stride + src[k],
                   (size_t)len[k]);
        }
    return 0;
}

/* The block as message words, transposed (words to rows): m[w][j] is lane j's word w. */
INLINE void load_blocks(lanes_t m[16], const struct seg *segs, int nseg,
                        const int64_t rows[LANES], int64_t off, int64_t n) {
    uint32_t raw[LANES][16];
    const uint8_t *at[LANES];
    if (block_at(segs, nseg, rows, LANES, off, n, at, raw))
        for (int j = 0; j < LANES; j++) memcpy(raw[j], at[j], BLOCK_LEN);
    for (int w = 0; w < 16; w++)
        for (int j = 0; j < LANES; j++) m[w][j] = raw[j][w];
}

/* The digests of the messages rows[0..LANES) (len bytes each) into out[j] (32 bytes each;
 * NULL: a spare lane); stack holds at least 1 + log2(chunks) chaining values. The chunk
 * chaining values enter the stack as BLAKE3's incremental hasher pushes them: after chunk c
 * (not the last), merged with the top while c + 1 (the chunks so far) is even, halving it each
 * time; the last chunk is then merged with every stacked value from the top, the final merge
 * being the ROOT compression. A message of one chunk ends with its own ROOT block. */
CLONES static void hash_lanes(const struct seg *segs, int nseg, const int64_t rows[LANES],
                              int64_t len, uint8_t *const out[LANES], lanes_t (*stack)[8]) {
    const int64_t chunks = len == 0 ? 1 : (len + CHUNK_LEN - 1) / CHUNK_LEN;
    lanes_t cv[8], m[16];
    int depth = 0;
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t start = c * CHUNK_LEN;
        const int64_t clen = len - start < CHUNK_LEN ? len - start : CHUNK_LEN;
        const int64_t blocks = clen == 0 ? 1 : (clen + BLOCK_LEN - 1) / BLOCK_LEN;
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < LANES; j++) cv[i][j] = IV[i];
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t off = b * BLOCK_LEN;
            const int64_t n = clen - off < BLOCK_LEN ? clen - off : BLOCK_LEN;
            load_blocks(m, segs, nseg, rows, start + off, n);
            const int last = b == blocks - 1;
            const uint32_t flags = (b == 0 ? CHUNK_START : 0) | (last ? CHUNK_END : 0)
                                 | (last && chunks == 1 ? ROOT : 0);
            compress(cv, m, (uint64_t)c, (uint32_t)n, flags);
        }
        if (c < chunks - 1) {
            for (uint64_t total = (uint64_t)c + 1; (total & 1) == 0; total >>= 1)
                parent(stack[--depth], cv, 0);
            memcpy(stack[depth++], cv, sizeof cv);
        } else {
            while (depth > 0) {
                depth--;
                parent(stack[depth], cv, depth == 0 ? ROOT : 0);
            }
        }
    }
    for (int j = 0; j < LANES; j++)
        if (out[j])
            for (int i = 0; i < 8; i++) store32(out[j] + 4 * i, cv[i][j]);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define B3V __attribute__((target("avx512f")))

/* The same compression with each lanes_t row one 512-bit register: 16 lanes of 32-bit words,
 * rotations by vprord. Every step is the scalar route's add, xor or rotation, lane for lane. */
B3V static inline void g16(__m512i v[16], int a, int b, int c, int d, __m512i x, __m512i y) {
    v[a] = _mm512_add_epi32(_mm512_add_epi32(v[a], v[b]), x);
    v[d] = _mm512_ror_epi32(_mm512_xor_si512(v[d], v[a]), 16);
    v[c] = _mm512_add_epi32(v[c], v[d]);
    v[b] = _mm512_ror_epi32(_mm512_xor_si512(v[b], v[c]), 12);
    v[a] = _mm512_add_epi32(_mm512_add_epi32(v[a], v[b]), y);
    v[d] = _mm512_ror_epi32(_mm512_xor_si512(v[d], v[a]), 8);
    v[c] = _mm512_add_epi32(v[c], v[d]);
    v[b] = _mm512_ror_epi32(_mm512_xor_si512(v[b], v[c]), 7);
}

B3V static inline void compress16(__m512i cv[8], const __m512i m[16], uint64_t counter,
                                  uint32_t block_len, uint32_t flags) {
    __m512i v[16];
    for (int i = 0; i < 8; i++) v[i] = cv[i];
    for (int i = 0; i < 4; i++) v[8 + i] = _mm512_set1_epi32((int)IV[i]);
    v[12] = _mm512_set1_epi32((int)(uint32_t)counter);
    v[13] = _mm512_set1_epi32((int)(uint32_t)(counter >> 32));
    v[14] = _mm512_set1_epi32((int)block_len);
    v[15] = _mm512_set1_epi32((int)flags);
#pragma GCC unroll 7
    for (int r = 0; r < 7; r++) {
        const uint8_t *s = SCHEDULE[r];
        g16(v, 0, 4, 8, 12, m[s[0]], m[s[1]]);
        g16(v, 1, 5, 9, 13, m[s[2]], m[s[3]]);
        g16(v, 2, 6, 10, 14, m[s[4]], m[s[5]]);
        g16(v, 3, 7, 11, 15, m[s[6]], m[s[7]]);
        g16(v, 0, 5, 10, 15, m[s[8]], m[s[9]]);
        g16(v, 1, 6, 11, 12, m[s[10]], m[s[11]]);
        g16(v, 2, 7, 8, 13, m[s[12]], m[s[13]]);
        g16(v, 3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) cv[i] = _mm512_xor_si512(v[i], v[i + 8]);
}

B3V static inline void parent16(const __m512i left[8], __m512i right[8], uint32_t flags) {
    __m512i m[16];
    for (int i = 0; i < 8; i++) m[i] = left[i], m[8 + i] = right[i];
    for (int i = 0; i < 8; i++) right[i] = _mm512_set1_epi32((int)IV[i]);
    compress16(right, m, 0, BLOCK_LEN, PARENT | flags);
}

/* m[w] = word w of the 16 lanes' 64-byte blocks at[j]: a 16 x 16 transpose of 32-bit words
 * (32-bit, then 64-bit interleaves, then two rounds of 128-bit lane shuffles), pure data
 * movement, the words landing where load_blocks puts them. */
B3V static inline void load16(__m512i m[16], const uint8_t *const at[LANES]) {
    __m512i r[16], a[16], b[16];
    for (int j = 0; j < 16; j++) r[j] = _mm512_loadu_si512((const void *)at[j]);
    for (int i = 0; i < 8; i++) {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* b[4i + c], 128-bit lane k: lanes 4i..4i+3 of word 4k + c */
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        const __m512i e0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44);
        const __m512i e1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
        const __m512i e2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
        const __m512i e3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
        m[c] = _mm512_shuffle_i32x4(e0, e2, 0x88);
        m[4 + c] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
        m[8 + c] = _mm512_shuffle_i32x4(e1, e3, 0x88);
        m[12 + c] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
    }
}

/* hash_lanes with the state, the message words and the stack in 512-bit registers. */
B3V static void hash_lanes16(const struct seg *segs, int nseg, const int64_t rows[LANES],
                             int64_t len, uint8_t *const out[LANES], lanes_t (*stack)[8]) {
    const int64_t chunks = len == 0 ? 1 : (len + CHUNK_LEN - 1) / CHUNK_LEN;
    __m512i cv[8], m[16];
    uint32_t raw[LANES][16];
    const uint8_t *at[LANES];
    int depth = 0;
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t start = c * CHUNK_LEN;
        const int64_t clen = len - start < CHUNK_LEN ? len - start : CHUNK_LEN;
        const int64_t blocks = clen == 0 ? 1 : (clen + BLOCK_LEN - 1) / BLOCK_LEN;
        for (int i = 0; i < 8; i++) cv[i] = _mm512_set1_epi32((int)IV[i]);
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t off = b * BLOCK_LEN;
            const int64_t n = clen - off < BLOCK_LEN ? clen - off : BLOCK_LEN;
            if (!block_at(segs, nseg, rows, LANES, start + off, n, at, raw))
                for (int j = 0; j < LANES; j++) at[j] = (const uint8_t *)raw[j];
            load16(m, at);
            const int last = b == blocks - 1;
            const uint32_t flags = (b == 0 ? CHUNK_START : 0) | (last ? CHUNK_END : 0)
                                 | (last && chunks == 1 ? ROOT : 0);
            compress16(cv, m, (uint64_t)c, (uint32_t)n, flags);
        }
        if (c < chunks - 1) {
            for (uint64_t total = (uint64_t)c + 1; (total & 1) == 0; total >>= 1) {
                __m512i left[8];
                depth--;
                for (int i = 0; i < 8; i++) left[i] = _mm512_loadu_si512(stack[depth][i]);
                parent16(left, cv, 0);
            }
            for (int i = 0; i < 8; i++) _mm512_storeu_si512(stack[depth][i], cv[i]);
            depth++;
        } else {
            while (depth > 0) {
                __m512i left[8];
                depth--;
                for (int i = 0; i < 8; i++) left[i] = _mm512_loadu_si512(stack[depth][i]);
                parent16(left, cv, depth == 0 ? ROOT : 0);
            }
        }
    }
    lanes_t words[8];
    for (int i = 0; i < 8; i++) _mm512_storeu_si512(words[i], cv[i]);
    for (int j = 0; j < LANES; j++)
        if (out[j])
            for (int i = 0; i < 8; i++) store32(out[j] + 4 * i, words[i][j]);
}

/* The AVX2 route: eight messages at a time, each lanes_t row one 256-bit register (the sixteen
 * state rows fill the sixteen registers; message words are read from memory), rotations by 16
 * and 8 as byte shuffles, by 12 and 7 as two shifts and an or. On AVX2 the portable 16-lane
 * code keeps two registers per row and spills (1.0 GB/s against 3.2 for the blake3 package on
 * one long message, an AVX2-only AMD EPYC); every step is the scalar route's, lane for lane. */
#define B3A __attribute__((target("avx2")))
#define ROTR8(x, n) _mm256_or_si256(_mm256_srli_epi32((x), (n)), _mm256_slli_epi32((x), 32 - (n)))

/* G on four named state registers; the rotation masks r16 and r8 in scope */
#define G8(a, b, c, d, x, y)                                                                  \
    a = _mm256_add_epi32(_mm256_add_epi32(a, b), x);                                          \
    d = _mm256_shuffle_epi8(_mm256_xor_si256(d, a), r16);                                     \
    c = _mm256_add_epi32(c, d);                                                               \
    b = ROTR8(_mm256_xor_si256(b, c), 12);                                                    \
    a = _mm256_add_epi32(_mm256_add_epi32(a, b), y);                                          \
    d = _mm256_shuffle_epi8(_mm256_xor_si256(d, a), r8);                                      \
    c = _mm256_add_epi32(c, d);                                                               \
    b = ROTR8(_mm256_xor_si256(b, c), 7)

/* one round: the message words of round r (SCHEDULE[r], a constant) read from memory */
#define W8(r, i) _mm256_loadu_si256(m + SCHEDULE[r][i])
#define ROUND8(r)                                                                             \
    G8(v0, v4, v8, v12, W8(r, 0), W8(r, 1));                                                  \
    G8(v1, v5, v9, v13, W8(r, 2), W8(r, 3));                                                  \
    G8(v2, v6, v10, v14, W8(r, 4), W8(r, 5));                                                 \
    G8(v3, v7, v11, v15, W8(r, 6), W8(r, 7));                                                 \
    G8(v0, v5, v10, v15, W8(r, 8), W8(r, 9));                                                 \
    G8(v1, v6, v11, v12, W8(r, 10), W8(r, 11));                                               \
    G8(v2, v7, v8, v13, W8(r, 12), W8(r, 13));                                                \
    G8(v3, v4, v9, v14, W8(r, 14), W8(r, 15))

/* the sixteen state rows as named registers (an array indexed through inlined helpers kept
 * spilling them), the message words m[16] in memory */
B3A static inline __attribute__((always_inline)) void compress8(
        __m256i cv[8], const __m256i *m, uint64_t counter, uint32_t block_len, uint32_t flags) {
    /* byte k of each 32-bit word from byte (k + 2) % 4 (a rotation by 16), (k + 1) % 4 (by 8) */
    const __m256i r16 = _mm256_setr_epi8(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13,
                                         2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    const __m256i r8 = _mm256_setr_epi8(1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12,
                                        1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12);
    __m256i v0 = cv[0], v1 = cv[1], v2 = cv[2], v3 = cv[3], v4 = cv[4], v5 = cv[5], v6 = cv[6],
            v7 = cv[7];
    __m256i v8 = _mm256_set1_epi32((int)IV[0]), v9 = _mm256_set1_epi32((int)IV[1]);
    __m256i v10 = _mm256_set1_epi32((int)IV[2]), v11 = _mm256_set1_epi32((int)IV[3]);
    __m256i v12 = _mm256_set1_epi32((int)(uint32_t)counter);
    __m256i v13 = _mm256_set1_epi32((int)(uint32_t)(counter >> 32));
    __m256i v14 = _mm256_set1_epi32((int)block_len), v15 = _mm256_set1_epi32((int)flags);
    ROUND8(0);
    ROUND8(1);
    ROUND8(2);
    ROUND8(3);
    ROUND8(4);
    ROUND8(5);
    ROUND8(6);
    cv[0] = _mm256_xor_si256(v0, v8), cv[1] = _mm256_xor_si256(v1, v9);
    cv[2] = _mm256_xor_si256(v2, v10), cv[3] = _mm256_xor_si256(v3, v11);
    cv[4] = _mm256_xor_si256(v4, v12), cv[5] = _mm256_xor_si256(v5, v13);
    cv[6] = _mm256_xor_si256(v6, v14), cv[7] = _mm256_xor_si256(v7, v15);
}

B3A static inline void parent8(const __m256i left[8], __m256i right[8], uint32_t flags) {
    __m256i m[16];
    for (int i = 0; i < 8; i++) m[i] = left[i], m[8 + i] = right[i];
    for (int i = 0; i < 8; i++) right[i] = _mm256_set1_epi32((int)IV[i]);
    compress8(right, m, 0, BLOCK_LEN, PARENT | flags);
}

/* out[w] = word w of the eight rows r[j] (eight 32-bit words each): an 8 x 8 transpose (32-bit,
 * then 64-bit interleaves, then the 128-bit halves), pure data movement. */
B3A static inline void transpose8(const __m256i r[8], __m256i out[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);     /* words 0 1 | 4 5 */
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]); /* words 2 3 | 6 7 */
    }
    for (int i = 0; i < 2; i++) { /* rows 4i .. 4i + 3 of words c | c + 4, c = 0 .. 3 */
        u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        out[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
        out[4 + c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
    }
}

B3A static inline void load8(__m256i m[16], const uint8_t *const at[8]) {
    __m256i lo[8], hi[8];
    for (int j = 0; j < 8; j++) {
        lo[j] = _mm256_loadu_si256((const __m256i *)at[j]);
        hi[j] = _mm256_loadu_si256((const __m256i *)(at[j] + 32));
    }
    transpose8(lo, m);
    transpose8(hi, m + 8);
}

/* hash_lanes for the eight messages rows[0..8) (out[0..8)), the state in 256-bit registers and
 * the first eight lanes of each stack row. */
B3A static void hash_lanes8(const struct seg *segs, int nseg, const int64_t rows[8], int64_t len,
                            uint8_t *const out[8], lanes_t (*stack)[8]) {
    const int64_t chunks = len == 0 ? 1 : (len + CHUNK_LEN - 1) / CHUNK_LEN;
    __m256i cv[8], m[16];
    uint32_t raw[LANES][16];
    const uint8_t *at[LANES];
    int depth = 0;
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t start = c * CHUNK_LEN;
        const int64_t clen = len - start < CHUNK_LEN ? len - start : CHUNK_LEN;
        const int64_t blocks = clen == 0 ? 1 : (clen + BLOCK_LEN - 1) / BLOCK_LEN;
        for (int i = 0; i < 8; i++) cv[i] = _mm256_set1_epi32((int)IV[i]);
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t off = b * BLOCK_LEN;
            const int64_t n = clen - off < BLOCK_LEN ? clen - off : BLOCK_LEN;
            if (!block_at(segs, nseg, rows, 8, start + off, n, at, raw))
                for (int j = 0; j < 8; j++) at[j] = (const uint8_t *)raw[j];
            load8(m, at);
            const int last = b == blocks - 1;
            const uint32_t flags = (b == 0 ? CHUNK_START : 0) | (last ? CHUNK_END : 0)
                                 | (last && chunks == 1 ? ROOT : 0);
            compress8(cv, m, (uint64_t)c, (uint32_t)n, flags);
        }
        if (c < chunks - 1) {
            for (uint64_t total = (uint64_t)c + 1; (total & 1) == 0; total >>= 1) {
                __m256i left[8];
                depth--;
                for (int i = 0; i < 8; i++)
                    left[i] = _mm256_loadu_si256((const __m256i *)stack[depth][i]);
                parent8(left, cv, 0);
            }
            for (int i = 0; i < 8; i++) _mm256_storeu_si256((__m256i *)stack[depth][i], cv[i]);
            depth++;
        } else {
            while (depth > 0) {
                __m256i left[8];
                depth--;
                for (int i = 0; i < 8; i++)
                    left[i] = _mm256_loadu_si256((const __m256i *)stack[depth][i]);
                parent8(left, cv, depth == 0 ? ROOT : 0);
            }
        }
    }
    uint32_t words[8][8];
    for (int i = 0; i < 8; i++) _mm256_storeu_si256((__m256i *)words[i], cv[i]);
    for (int j = 0; j < 8; j++)
        if (out[j])
            for (int i = 0; i < 8; i++) store32(out[j] + 4 * i, words[i][j]);
}
#endif

int64_t attn_active_route(void);

/* The vector route of the compiled core's route (attn_route; tests run each): 2 AVX-512
 * registers, 1 AVX2 registers, 0 the portable lanes. */
static int hash_vector(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    const int64_t r = attn_active_route();
    if (r == 2 && __builtin_cpu_supports("avx512f")) return 2;
    if (r >= 1 && __builtin_cpu_supports("avx2")) return 1;
#endif
    return 0;
}

/* hash_lanes on the route in use (vec: hash_vector()). */
static void hash_route(const struct seg *segs, int nseg, const int64_t rows[LANES], int64_t len,
                       uint8_t *const out[LANES], lanes_t (*stack)[8], int vec) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (vec == 2) {
        hash_lanes16(segs, nseg, rows, len, out, stack);
        return;
    }
    if (vec == 1) { /* two groups of eight; the second only when it has a message of its own */
        hash_lanes8(segs, nseg, rows, len, out, stack);
        int more = 0;
        for (int j = 8; j < LANES; j++) more |= out[j] != NULL;
        if (more) hash_lanes8(segs, nseg, rows + 8, len, out + 8, stack);
        return;
    }
#endif
    (void)vec;
    hash_lanes(segs, nseg, rows, len, out, stack);
}

int64_t br_minmax(const void *x, int64_t n, int64_t esize, int64_t *lo_hi); /* bridge.c */

/* Rows r0 .. r1 of the messages segs describe (len bytes each) hashed LANES at a time, digest of
 * row i into out + 32 i. With esize (else NULL): segment s's rows read as int8 (esize[s] 1) or
 * int16 (2) values checked against [lo[s], hi[s]] just before their LANES rows are hashed, so
 * they come from memory once (b3_proof's range check; 0 skips a segment). 0; 1: a value out of
 * its range (the rest left unhashed); -3: out of memory. */
static int64_t hash_rows(const struct seg *segs, int nseg, int64_t len, const int64_t *esize,
                         const int64_t *lo, const int64_t *hi, int64_t r0, int64_t r1,
                         uint8_t *out) {
    if (r1 <= r0) return 0;
    int depth = 1;
    for (int64_t chunks = (len + CHUNK_LEN - 1) / CHUNK_LEN; chunks > 1; chunks >>= 1) depth++;
    lanes_t (*stack)[8] = malloc(sizeof(lanes_t) * 8 * (size_t)depth);
    if (!stack) return -3;
    const int vec = hash_vector();
    int64_t bad = 0;
    for (int64_t i0 = r0; i0 < r1 && !bad; i0 += LANES) {
        const int64_t i1 = i0 + LANES < r1 ? i0 + LANES : r1;
        for (int s = 0; esize && s < nseg && !bad; s++) {
            if (!esize[s] || !segs[s].width) continue;
            for (int64_t i = i0; i < i1; i++) {
                int64_t lh[2];
                br_minmax(segs[s].base + i * segs[s].stride, segs[s].width / esize[s], esize[s],
                          lh);
                if (lh[0] < lo[s] || lh[1] > hi[s]) bad = 1;
            }
        }
        int64_t rows[LANES];
        uint8_t *o[LANES];
        for (int j = 0; j < LANES; j++) {
            rows[j] = i0 + j < i1 ? i0 + j : i0; /* spare lanes repeat a message */
            o[j] = i0 + j < i1 ? out + 32 * (i0 + j) : NULL;
        }
        hash_route(segs, nseg, rows, len, o, stack, vec);
    }
    free(stack);
    return bad;
}

/* The BLAKE3 digests of n messages into out + 32 i, message i the concatenation of row i of
 * each segment (bases[s] + i * strides[s], widths[s] bytes; widths >= 0, at most MAX_SEGS
 * segments). Returns 0; -2 for bad arguments; -3 when out of memory. */
int64_t b3_rows(int64_t nseg, const uint8_t *const *bases, const int64_t *strides,
                const int64_t *widths, int64_t n, uint8_t *out) {
    if (nseg < 0 || nseg > MAX_SEGS || n < 0) return -2;
    struct seg segs[MAX_SEGS];
    int64_t len = 0;
    for (int s = 0; s < nseg; s++) {
        if (widths[s] < 0) return -2;
        segs[s] = (struct seg){bases[s], strides[s], widths[s]};
        len += widths[s];
    }
    return hash_rows(segs, (int)nseg, len, NULL, NULL, NULL, 0, n, out);
}

/* One message of at most 64 bytes, one lane: the single block of its only chunk, a ROOT
 * compression, in plain 32-bit words (the chain below, whose links cannot run side by side). */
#define G1(a, b, c, d, x, y)                                                                \
    a = a + b + (x), d = rotr(d ^ a, 16), c = c + d, b = rotr(b ^ c, 12),                   \
    a = a + b + (y), d = rotr(d ^ a, 8), c = c + d, b = rotr(b ^ c, 7)

static void hash_block1(const uint8_t *msg, int64_t len, uint8_t out[32]) {
    uint32_t m[16];
    uint8_t block[BLOCK_LEN] = {0};
    memcpy(block, msg, (size_t)len);
    memcpy(m, block, BLOCK_LEN);
    uint32_t v0 = IV[0], v1 = IV[1], v2 = IV[2], v3 = IV[3], v4 = IV[4], v5 = IV[5], v6 = IV[6],
             v7 = IV[7], v8 = IV[0], v9 = IV[1], v10 = IV[2], v11 = IV[3], v12 = 0, v13 = 0,
             v14 = (uint32_t)len, v15 = CHUNK_START | CHUNK_END | ROOT;
    for (int r = 0; r < 7; r++) {
        const uint8_t *s = SCHEDULE[r];
        G1(v0, v4, v8, v12, m[s[0]], m[s[1]]);
        G1(v1, v5, v9, v13, m[s[2]], m[s[3]]);
        G1(v2, v6, v10, v14, m[s[4]], m[s[5]]);
        G1(v3, v7, v11, v15, m[s[6]], m[s[7]]);
        G1(v0, v5, v10, v15, m[s[8]], m[s[9]]);
        G1(v1, v6, v11, v12, m[s[10]], m[s[11]]);
        G1(v2, v7, v8, v13, m[s[12]], m[s[13]]);
        G1(v3, v4, v9, v14, m[s[14]], m[s[15]]);
    }
    const uint32_t h[8] = {v0 ^ v8, v1 ^ v9, v2 ^ v10, v3 ^ v11, v4 ^ v12, v5 ^ v13, v6 ^ v14,
                           v7 ^ v15};
    for (int i = 0; i < 8; i++) store32(out + 4 * i, h[i]);
}

/* The receipt's IO chain after its first link (verifier/receipt.py io_chain): for each token,
 * cur <- BLAKE3(dom || cur || tags[i] || ids[i] as 4 little-endian bytes), dlen <= 27 (one
 * block). Each link depends on the one before: one message at a time. Returns 0; -2 for bad
 * arguments. */
int64_t b3_chain(const uint8_t *dom, int64_t dlen, const uint8_t *tags, const uint32_t *ids,
                 int64_t n, uint8_t *cur) {
    if (dlen < 0 || dlen + 37 > BLOCK_LEN || n < 0) return -2;
    uint8_t msg[BLOCK_LEN];
    memcpy(msg, dom, (size_t)dlen);
    for (int64_t i = 0; i < n; i++) {
        memcpy(msg + dlen, cur, 32);
        msg[dlen + 32] = tags[i];
        store32(msg + dlen + 33, ids[i]);
        hash_block1(msg, dlen + 37, cur);
    }
    return 0;
}

/* b3_rows of one segment: n messages of len bytes, message i at msgs + i * stride. */
int64_t b3_many(const uint8_t *msgs, int64_t n, int64_t len, int64_t stride, uint8_t *out) {
    return b3_rows(1, &msgs, &stride, &len, n, out);
}

/* merkle.verify_multiproof's walk: the root that the known leaves (sorted distinct indices idx,
 * below n_leaves, with their hashes) and the proof hashes rebuild, level by level in index order:
 * a node pairs with its known right sibling, is carried up when it has no sibling (the last of
 * an odd level), or takes the next proof hash as its sibling; each level's node hashes
 * H(prefix || left || right) run as one b3_many. Returns 0 with the root in root_out, 1 when
 * the indices are not sorted, distinct and below n_leaves or the proof has too few or too many
 * hashes, -3 when out of memory. */
int64_t b3_multiproof(const int64_t *idx, const uint8_t *leaves, int64_t m, uint64_t n_leaves,
                      const uint8_t *proof, int64_t n_proof, const uint8_t *prefix, int64_t plen,
                      uint8_t *root_out) {
    for (int64_t k = 0; k < m; k++) /* the walk's precondition: else no root of it */
        if (idx[k] < 0 || (uint64_t)idx[k] >= n_leaves || (k && idx[k] <= idx[k - 1])) return 1;
    const int64_t w = plen + 64;
    int64_t *ia = malloc(sizeof(int64_t) * (size_t)m), *ib = malloc(sizeof(int64_t) * (size_t)m);
    int64_t *dest = malloc(sizeof(int64_t) * (size_t)m);
    uint8_t *ha = malloc(32 * (size_t)m), *hb = malloc(32 * (size_t)m);
    uint8_t *msg = malloc((size_t)(w * m)), *dig = malloc(32 * (size_t)m);
    int64_t code = -3;
    if (!ia || !ib || !dest || !ha || !hb || !msg || !dig) goto done;
    memcpy(ia, idx, sizeof(int64_t) * (size_t)m);
    memcpy(ha, leaves, 32 * (size_t)m);
    int64_t count = m, used = 0;
    code = 1;
    for (uint64_t width = n_leaves; width > 1; width = (width + 1) / 2) {
        int64_t next = 0, jobs = 0;
        for (int64_t k = 0; k < count;) {
            const uint64_t i = (uint64_t)ia[k];
            const uint8_t *left, *right;
            if (i % 2 == 0 && k + 1 < count && (uint64_t)ia[k + 1] == i + 1) {
                left = ha + 32 * k, right = ha + 32 * (k + 1);
                k += 2;
            } else {
                k++;
                if ((i ^ 1) >= width) { /* carried up unchanged */
                    ib[next] = (int64_t)(i / 2);
                    memcpy(hb + 32 * next++, ha + 32 * (k - 1), 32);
                    continue;
                }
                if (used >= n_proof) goto done;
                const uint8_t *other = proof + 32 * used++, *mine = ha + 32 * (k - 1);
                left = i % 2 == 0 ? mine : other, right = i % 2 == 0 ? other : mine;
            }
            uint8_t *q = msg + w * jobs;
            memcpy(q, prefix, (size_t)plen);
            memcpy(q + plen, left, 32);
            memcpy(q + plen + 32, right, 32);
            dest[jobs++] = next;
            ib[next++] = (int64_t)(i / 2);
        }
        if (b3_many(msg, jobs, w, w, dig)) {
            code = -3;
            goto done;
        }
        for (int64_t t = 0; t < jobs; t++) memcpy(hb + 32 * dest[t], dig + 32 * t, 32);
        int64_t *ti = ia;
        uint8_t *th = ha;
        ia = ib, ib = ti, ha = hb, hb = th, count = next;
    }
    if (used == n_proof && count == 1) {
        memcpy(root_out, ha, 32);
        code = 0;
    }
done:
    free(ia), free(ib), free(dest), free(ha), free(hb), free(msg), free(dig);
    return code;
}

/* One Merkle proof group of an opening checked in one call (verifier/commitment.py
 * prepare_proof): the leaf digests of n rows (message i the concatenation of row i of each
 * segment, as b3_rows), the segments whose esize is 1 or 2 read as int8 / int16 values that must
 * lie in [lo[s], hi[s]] (an opening's K/V range check, done on each group of LANES rows just
 * before they are hashed, so the values come from memory once), then the multiproof walk of
 * b3_multiproof and the rebuilt root compared with the expected one in constant time.
 * Decides nothing: the caller takes only "passed" from it (anything else is decided by the
 * canonical checks, in their order, with their reasons). */
typedef struct {
    int64_t nseg;
    const uint8_t *base[MAX_SEGS];
    int64_t stride[MAX_SEGS], width[MAX_SEGS], esize[MAX_SEGS], lo[MAX_SEGS], hi[MAX_SEGS];
    int64_t n;             /* rows (leaves) */
    uint8_t *leaves;       /* [n][32]: the digests, written here */
    const int64_t *idx;    /* [n] their leaf indices, strictly increasing, below n_leaves */
    uint64_t n_leaves;
    const uint8_t *proof;  /* [n_proof][32] */
    int64_t n_proof;
    const uint8_t *prefix; /* the node hashes' prefix */
    int64_t plen;
    const uint8_t *root;   /* [32] the expected root */
} b3_proof_args;

/* Rows r0 .. r1 of the group: ranges checked, digests
 * into leaves; then, when finish, the walk and the root. 0: every checked value in its range
 * (and, with finish, the root equal); 1: a value out of range, a proof of the wrong length or
 * another root; -2: bad arguments; -3: out of memory. Splitting the rows over threads and
 * finishing once gives what one call over all rows gives. */
int64_t b3_proof(const b3_proof_args *a, int64_t r0, int64_t r1, int64_t finish) {
    if (a->nseg < 1 || a->nseg > MAX_SEGS || a->n < 1 || r0 < 0 || r1 < r0 || r1 > a->n
        || a->plen < 0 || a->plen > BLOCK_LEN)
        return -2;
    struct seg segs[MAX_SEGS];
    int64_t len = 0;
    for (int s = 0; s < a->nseg; s++) {
        const int64_t e = a->esize[s];
        if (a->width[s] < 0 || (e != 0 && e != 1 && e != 2) || (e && a->width[s] % e))
            return -2;
        segs[s] = (struct seg){a->base[s], a->stride[s], a->width[s]};
        len += a->width[s];
    }
    const int64_t code = hash_rows(segs, (int)a->nseg, len, a->esize, a->lo, a->hi, r0, r1,
                                   a->leaves);
    if (code || !finish) return code;
    uint8_t got[32];
    const int64_t walk = b3_multiproof(a->idx, a->leaves, a->n, a->n_leaves, a->proof,
                                       a->n_proof, a->prefix, a->plen, got);
    if (walk) return walk;
    uint8_t diff = 0;
    for (int i = 0; i < 32; i++) diff |= (uint8_t)(got[i] ^ a->root[i]);
    return diff != 0;
}
