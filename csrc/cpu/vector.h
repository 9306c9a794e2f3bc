// Sixteen-float vectors and a vectorisable exp for the C++ CPU kernels (token_logprobs.cpp,
// logit_stats.cpp). Functions marked ALIGNKERN_MULTIVERSION are compiled for AVX-512, AVX2 and
// baseline x86-64 and picked at load time; the helpers here are inlined into each clone, so that
// they are compiled for its instruction set.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

namespace alignkern {
namespace vec {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ALIGNKERN_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ALIGNKERN_MULTIVERSION
#endif
// Helpers must be inlined into each clone to be compiled for its instruction set.
#define ALIGNKERN_INLINE inline __attribute__((always_inline))

// Sixteen floats: one AVX-512 register, two AVX2 ones or four SSE ones, depending on the clone
// (explicit vectors: the auto-vectoriser would not take the polynomial loop reliably).
typedef float floats __attribute__((vector_size(64)));
typedef uint32_t uints __attribute__((vector_size(64)));
constexpr int kLanes = 16;

ALIGNKERN_INLINE floats splat(float v) { return floats{} + v; }

ALIGNKERN_INLINE floats load(const float* p) {
  floats v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// n < kLanes values, the rest filled with `pad`.
ALIGNKERN_INLINE floats load_partial(const float* p, int64_t n, float pad) {
  floats v = splat(pad);
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}

ALIGNKERN_INLINE float lane_sum(floats v) {
  float result = 0.0f;
  for (int j = 0; j < kLanes; ++j) result += v[j];
  return result;
}

// exp(x) for x <= 0 to ~2 ulp: n = round(x / ln 2) by the 1.5 * 2^23 rounding trick, r = x - n ln 2
// in [-ln 2 / 2, ln 2 / 2], e^r by a degree-5 polynomial 1 + r + c2 r^2 + ... + c5 r^5 fitted for
// relative error (1.1e-7; 1.8e-7 evaluated in float32; exp(0) is exactly 1), and 2^n added to the
// result's exponent bits (k's low mantissa bits hold n). Exactly 0 below
// -87.3, where exp leaves float's normal range (-inf included); NaN stays NaN. Positive x is the
// callers' to avoid: a row whose maximum is +inf takes the scalar path.
ALIGNKERN_INLINE floats exp_nonpositive(floats x) {
  const floats magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const floats k = x * splat(1.44269504088896341f) + magic;
  const floats n = k - magic;
  const floats r = x - n * splat(0.693147180559945309f);
  floats p = splat(8.3127e-3f);
  p = p * r + splat(4.189008e-2f);
  p = p * r + splat(1.6667113e-1f);
  p = p * r + splat(4.9999232e-1f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  const floats y = (floats)((uints)p + ((uints)k << 23));  // vector casts reinterpret the bits
  return x < splat(-87.3f) ? splat(0.0f) : y;
}

inline float exp_nonpositive(float x) { return exp_nonpositive(splat(x))[0]; }

#if defined(__has_builtin)
#if __has_builtin(__builtin_assoc_barrier)
#define ALIGNKERN_HAS_ASSOC_BARRIER 1
#endif
#endif

// x * inv_t, rounded before anything is added to it (never contracted into a multiply-add).
template <typename V, typename S>
ALIGNKERN_INLINE V scaled(V x, S inv_t) {
#ifdef ALIGNKERN_HAS_ASSOC_BARRIER
  return __builtin_assoc_barrier(x * inv_t);
#else
  V z = x * inv_t;
  asm("" : "+m"(z));  // through memory: rounded, and opaque to the multiply-add fusion
  return z;
#endif
}

// x * inv_t - shift; at the usual T = 1 the product is skipped (it is exact then).
template <bool kUnscaled>
ALIGNKERN_INLINE floats shifted(floats x, float inv_t, float shift) {
  if constexpr (kUnscaled) {
    return x - shift;
  } else {
    return scaled(x, inv_t) - shift;
  }
}

// The largest element of x[0, n): -inf when n = 0; a NaN may be skipped, so callers catch NaN in
// their sums. Defined once, in token_logprobs.cpp.
float chunk_max(const float* x, int64_t n);  // multiversioned where defined
double chunk_max(const double* x, int64_t n);

}  // namespace vec
}  // namespace alignkern
