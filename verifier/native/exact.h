/* What every file of the compiled core shares: the float rules and the exact helpers. */
#ifndef COMMITLLM_EXACT_H
#define COMMITLLM_EXACT_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "float expressions must be evaluated in binary32 (FLT_EVAL_METHOD == 0)"
#endif

#define TWO23 8388608.0f

/* c ? a : b on the bits (c is 0 or 1): a select the vectorizer keeps as a blend, where the
 * conditional form of a clamp before further float steps stays a branch under -ftrapping-math
 * (rint_even's note); the same value for every a, b and c, NaNs included. */
static inline float pick_f32(int c, float a, float b) {
    uint32_t ab, bb;
    memcpy(&ab, &a, 4);
    memcpy(&bb, &b, 4);
    const uint32_t m = -(uint32_t)c, o = (ab & m) | (bb & ~m);
    float r;
    memcpy(&r, &o, 4);
    return r;
}

/* (double)v, exactly, for v in [-2^51, 2^51): v + (2^52 + 2^51) as the bits of a double is
 * 2^52 + 2^51 + v (its exponent field that of 2^52, the mantissa 2^51 + v), less 2^52 + 2^51.
 * Integer adds and a float subtraction, which AVX2 has (it has no int64 -> double convert, so
 * (double)v ran one value at a time there); callers check the range and convert a row with a
 * value outside it the plain way. */
#define F64_SMALL_LIMIT 2251799813685248LL /* 2^51 */
static inline double f64_of_small(int64_t v) {
    const int64_t b = v + 0x4338000000000000LL;
    double d;
    memcpy(&d, &b, 8);
    return d - 6755399441055744.0;
}

/* rint in round-to-nearest-even for binary32 without a libm call: below 2^23 in magnitude,
 * (|x| + 2^23) - 2^23 rounds |x| to an integer in the default rounding mode (exact steps
 * otherwise, since no FMA contraction or reassociation is allowed); from 2^23 up x is already
 * an integer. The sign is put back with copysign so -0.4 gives -0, as rintf does. The choice
 * is pick_f32's select on the bits, not `a < TWO23 ? r : a`: under the default
 * -ftrapping-math GCC keeps the conditional add as a branch, and a loop with one is not
 * vectorized where the target has no masked stores (AVX2: the x86-64-v3 clones of
 * quantize, SwiGLU and the softmax pass ran scalar, some 9 ns a value for SwiGLU). The same
 * bits as the conditional form for all 2^32 inputs (checked exhaustively, NaN payloads too). */
static inline float rint_even(float x) {
    const float a = fabsf(x);
    const float r = (a + TWO23) - TWO23;
    return copysignf(pick_f32(a < TWO23, r, a), x);
}


/* Elementwise loops written for the vectorizer, cloned per instruction set (every lane does the
 * same IEEE binary32 operations as the scalar code; integer steps are exact). */
/* (COMMITLLM_ONE_TARGET: no clones, the instruction set the flags give; the tests build each.) */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(__clang__) \
    && !defined(COMMITLLM_ONE_TARGET)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#endif
