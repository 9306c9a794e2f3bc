// token_logprobs on the CPU: one OpenMP task per row, one pass over the row in L1-sized chunks with
// an online log-sum-exp, then K gathers. The backward recomputes softmax from the saved row maximum
// and log-sum and writes its dense part in the logits' dtype; no [N, V] float temporary is ever
// allocated.
//
// The log-sum-exp is kept as two numbers, the row maximum m and log s, s = sum exp(z - m), and a
// log-probability is (z_t - m) - log s: m + log s rounded to one float loses every bit of log s
// below the spacing of |m| (tied top logits at T = 1e-6 gave -0.5 for -0.693).
//
// z = x * inv_t must round the same way in the maximum, the sum and the gathers, so that
// z_t <= max z <= lse and no log-probability is positive: every product goes through scaled(),
// which keeps the compiler from fusing it with the subtraction that follows (a fused multiply-add
// skips the rounding in some places only, and at |z| ~ 1e9 that is tens of nats). The exp
// polynomial keeps its multiply-adds.
//
// The float chunk loops are compiled for AVX-512, AVX2 and baseline x86-64 (picked at load time)
// and use a polynomial exp that the compiler can vectorise; libm's expf cannot be vectorised
// without -ffast-math, which would break NaN propagation.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.h"
#include "token_logprobs.h"

namespace alignkern {
namespace {

constexpr int64_t kChunk = 2048;

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

ALIGNKERN_MULTIVERSION
float chunk_max(const float* x, int64_t n) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  floats m = splat(neg_inf);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const floats v = load(x + i);
    m = v > m ? v : m;  // NaN is caught later by the sum
  }
  const floats tail = load_partial(x + i, n - i, neg_inf);
  m = tail > m ? tail : m;
  float result = m[0];
  for (int j = 1; j < kLanes; ++j) result = m[j] > result ? m[j] : result;
  return result;
}

// sum_i exp(x_i * inv_t - shift), every term at most 1 (shift >= the chunk's max of x * inv_t)
template <bool kUnscaled>
ALIGNKERN_INLINE float sum_exp(const float* x, int64_t n, float inv_t, float shift) {
  floats s = splat(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    // The next chunk's line, so that memory is read while this chunk (in L1 after chunk_max) is
    // in the exp: one line per vector of 16 floats.
    __builtin_prefetch(x + i + 2 * kChunk);
    s += exp_nonpositive(shifted<kUnscaled>(load(x + i), inv_t, shift));
  }
  if (i < n) {  // padding adds exp(-inf) = 0
    const floats tail = load_partial(x + i, n - i, -std::numeric_limits<float>::infinity());
    s += exp_nonpositive(shifted<kUnscaled>(tail, inv_t, shift));
  }
  return lane_sum(s);
}

ALIGNKERN_MULTIVERSION
float chunk_sum_exp(const float* x, int64_t n, float inv_t, float shift) {
  return inv_t == 1.0f ? sum_exp<true>(x, n, inv_t, shift) : sum_exp<false>(x, n, inv_t, shift);
}

// out_i = coef * exp((x_i * inv_t - shift) - log_sum) = (coef / s) * exp(x_i * inv_t - shift)
template <bool kUnscaled>
ALIGNKERN_INLINE void scaled_softmax(const float* x, int64_t n, float inv_t, float shift,
                                     float factor, float* out) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const floats v = factor * exp_nonpositive(shifted<kUnscaled>(load(x + i), inv_t, shift));
    std::memcpy(out + i, &v, sizeof(v));
  }
  if (i < n) {
    const floats tail = load_partial(x + i, n - i, -std::numeric_limits<float>::infinity());
    const floats v = factor * exp_nonpositive(shifted<kUnscaled>(tail, inv_t, shift));
    for (int64_t j = 0; i + j < n; ++j) out[i + j] = v[j];
  }
}

ALIGNKERN_MULTIVERSION
void chunk_scaled_softmax(const float* x, int64_t n, float inv_t, float shift, float log_sum,
                          float coef, float* out) {
  // coef * exp(-log_sum) = coef / s: one multiply per element instead of a subtraction in the
  // exponent; the product rounds once more (at most an ulp of p).
  const float factor = coef * std::exp(-log_sum);
  if (inv_t == 1.0f) {
    scaled_softmax<true>(x, n, inv_t, shift, factor, out);
  } else {
    scaled_softmax<false>(x, n, inv_t, shift, factor, out);
  }
}

inline double exp_nonpositive(double x) { return std::exp(x); }

double chunk_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

double chunk_sum_exp(const double* x, int64_t n, double inv_t, double shift) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(scaled(x[i], inv_t) - shift);
  return s;
}

void chunk_scaled_softmax(const double* x, int64_t n, double inv_t, double shift, double log_sum,
                          double coef, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = coef * std::exp((scaled(x[i], inv_t) - shift) - log_sum);
}

// The slow, exact path for a row whose maximum is +inf (its sum is kept relative to 0, so terms
// can be positive) or whose log-sum is not finite: libm's exp, element by element.
template <typename Acc>
Acc scalar_sum_exp(const Acc* x, int64_t n, Acc inv_t, Acc shift) {
  Acc s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(scaled(x[i], inv_t) - shift);
  return s;
}

template <typename Acc>
void scalar_scaled_softmax(const Acc* x, int64_t n, Acc inv_t, Acc shift, Acc log_sum, Acc coef,
                           Acc* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = coef * std::exp((scaled(x[i], inv_t) - shift) - log_sum);
}

// Returns a pointer to the chunk as Acc values: the row itself for float/double storage, else the
// chunk converted into `buffer`.
template <typename T, typename Acc = typename Storage<T>::Acc>
const Acc* load_chunk(const T* src, int64_t n, Acc* buffer) {
  if constexpr (std::is_same_v<T, Acc>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = Storage<T>::load(src[i]);
    return buffer;
  }
}

// A row's log-sum-exp kept in two parts, lse = shift + log_sum: shift is the row maximum of z (0
// where that maximum is infinite) and log_sum = log sum exp(z - shift).
template <typename Acc>
struct ShiftedLse {
  Acc shift;
  Acc log_sum;
};

// The online log-sum-exp of z = x * inv_t over one row. Infinite maxima follow torch.logsumexp:
// the running sum is then kept relative to 0 instead of the maximum, so a row holding +inf gives
// +inf, a row of -inf gives -inf, and NaN anywhere gives NaN.
template <typename T, typename Acc = typename Storage<T>::Acc>
ShiftedLse<Acc> row_logsumexp(const T* row, int64_t vocab, Acc inv_t) {
  Acc buffer[kChunk];
  Acc m = -std::numeric_limits<Acc>::infinity();  // running max of z
  Acc s = 0;                                      // sum of exp(z - reference(m))
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const Acc* x = load_chunk<T>(row + start, n, buffer);
    const Acc chunk_m = scaled(chunk_max(x, n), inv_t);
    const Acc m_new = chunk_m > m ? chunk_m : m;
    const Acc reference = std::isinf(m_new) ? Acc(0) : m_new;
    const Acc old_reference = std::isinf(m) ? Acc(0) : m;
    // s == 0 means nothing was counted yet; rescaling it could compute 0 * inf.
    if (m_new != m && s != Acc(0)) s *= exp_nonpositive(old_reference - reference);
    s += m_new == std::numeric_limits<Acc>::infinity() ? scalar_sum_exp(x, n, inv_t, reference)
                                                       : chunk_sum_exp(x, n, inv_t, reference);
    m = m_new;
  }
  return {std::isinf(m) ? Acc(0) : m, std::log(s)};
}

template <typename T>
void forward_rows(const T* logits, int64_t n_rows, int64_t vocab, const int64_t* row_offsets,
                  const int64_t* targets, int64_t k, typename Storage<T>::Acc* out,
                  typename Storage<T>::Acc* shift, typename Storage<T>::Acc* log_sum,
                  double temperature, int64_t ignore_index) {
  using Acc = typename Storage<T>::Acc;
  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n_rows; ++r) {
    const T* row = logits + row_offsets[r];
    const ShiftedLse<Acc> row_lse = row_logsumexp<T>(row, vocab, inv_t);
    shift[r] = row_lse.shift;
    log_sum[r] = row_lse.log_sum;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t t = targets[r * k + j];
      Acc value;
      if (t == ignore_index) {
        value = 0;
      } else if (t < 0 || t >= vocab) {
        value = std::numeric_limits<Acc>::quiet_NaN();
      } else {
        value = (scaled(Storage<T>::load(row[t]), inv_t) - row_lse.shift) - row_lse.log_sum;
      }
      out[r * k + j] = value;
    }
  }
}

// The dense part of the gradient, grad_logits_v = -coef * softmax(z)_v / temperature with
// softmax(z)_v = exp((z_v - shift) - log_sum); the caller then writes the target columns
// (alignkern/ops/_targets.py), once each.
template <typename T>
void dense_backward_rows(const typename Storage<T>::Acc* coef, const T* logits, int64_t n_rows,
                         int64_t vocab, const int64_t* row_offsets,
                         const typename Storage<T>::Acc* shift,
                         const typename Storage<T>::Acc* log_sum, T* grad_logits,
                         double temperature) {
  using Acc = typename Storage<T>::Acc;
  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n_rows; ++r) {
    const T* row = logits + row_offsets[r];
    T* grad_row = grad_logits + r * vocab;
    const bool finite = std::isfinite(log_sum[r]);  // else the row's maximum was +inf, or NaN
    Acc in_buffer[kChunk];
    Acc out_buffer[kChunk];
    for (int64_t start = 0; start < vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, vocab - start);
      const Acc* x = load_chunk<T>(row + start, n, in_buffer);
      if (finite) {
        chunk_scaled_softmax(x, n, inv_t, shift[r], log_sum[r], -coef[r] * inv_t, out_buffer);
      } else {
        scalar_scaled_softmax(x, n, inv_t, shift[r], log_sum[r], -coef[r] * inv_t, out_buffer);
      }
      for (int64_t i = 0; i < n; ++i) grad_row[start + i] = Storage<T>::store(out_buffer[i]);
    }
  }
}

}  // namespace

void token_logprobs_fwd_cpu(uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab,
                            uintptr_t row_offsets, uintptr_t targets, int64_t k, uintptr_t out,
                            uintptr_t shift, uintptr_t log_sum, double temperature,
                            int64_t ignore_index) {
  check_token_logprobs_args(vocab, temperature);
  dispatch_dtype(to_dtype(dtype), [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Storage<T>::Acc;
    forward_rows<T>(as_ptr<const T>(logits), n_rows, vocab, as_ptr<const int64_t>(row_offsets),
                    as_ptr<const int64_t>(targets), k, as_ptr<Acc>(out), as_ptr<Acc>(shift),
                    as_ptr<Acc>(log_sum), temperature, ignore_index);
  });
}

void token_logprobs_bwd_cpu(uintptr_t coef, uintptr_t logits, int dtype, int64_t n_rows,
                            int64_t vocab, uintptr_t row_offsets, uintptr_t shift,
                            uintptr_t log_sum, uintptr_t grad_logits, double temperature) {
  check_token_logprobs_args(vocab, temperature);
  dispatch_dtype(to_dtype(dtype), [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Storage<T>::Acc;
    dense_backward_rows<T>(as_ptr<const Acc>(coef), as_ptr<const T>(logits), n_rows, vocab,
                           as_ptr<const int64_t>(row_offsets), as_ptr<const Acc>(shift),
                           as_ptr<const Acc>(log_sum), as_ptr<T>(grad_logits), temperature);
  });
}

}  // namespace alignkern
