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

/* rint in round-to-nearest-even for binary32 without a libm call: below 2^23 in magnitude,
 * (|x| + 2^23) - 2^23 rounds |x| to an integer in the default rounding mode (exact steps
 * otherwise, since no FMA contraction or reassociation is allowed); from 2^23 up x is already
 * an integer. The sign is put back with copysign so -0.4 gives -0, as rintf does. */
static inline float rint_even(float x) {
    const float a = fabsf(x);
    const float r = (a + TWO23) - TWO23;
    return copysignf(a < TWO23 ? r : a, x);
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
