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
// and use the polynomial exp of vector.h; libm's expf cannot be vectorised without -ffast-math,
// which would break NaN propagation.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.h"
#include "token_logprobs.h"
#include "vector.h"

namespace alignkern {

using namespace vec;

// vector.h's chunk_max, defined once here (logit_stats.cpp calls it too).
ALIGNKERN_MULTIVERSION
float vec::chunk_max(const float* x, int64_t n) {
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

double vec::chunk_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

namespace {


constexpr int64_t kChunk = 2048;

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

// out_i = (coef + slope * d_i) * exp(d_i - log_sum), d_i = x_i * inv_t - shift: the dense part of
// a log-probability gradient (slope = 0), with an entropy gradient's term proportional to d_i
// (kSlope). exp(d - log_sum) is computed as exp(d) * exp(-log_sum): one multiply per element
// instead of a subtraction in the exponent (the product rounds once more: an ulp of p).
template <bool kUnscaled, bool kSlope>
ALIGNKERN_INLINE floats softmax_term(floats x, float inv_t, float shift, float factor, float coef,
                                     float slope) {
  const floats d = shifted<kUnscaled>(x, inv_t, shift);
  const floats e = exp_nonpositive(d);
  if constexpr (kSlope) {  // e == 0 where d = -inf: 0, not 0 * inf
    return (factor * e) * (e == splat(0.0f) ? splat(0.0f) : coef + slope * d);
  } else {
    return (coef * factor) * e;
  }
}

template <bool kUnscaled, bool kSlope>
ALIGNKERN_INLINE void scaled_softmax(const float* x, int64_t n, float inv_t, float shift,
                                     float factor, float coef, float slope, float* out) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const floats v = softmax_term<kUnscaled, kSlope>(load(x + i), inv_t, shift, factor, coef,
                                                     slope);
    std::memcpy(out + i, &v, sizeof(v));
  }
  if (i < n) {
    const floats tail = load_partial(x + i, n - i, -std::numeric_limits<float>::infinity());
    const floats v = softmax_term<kUnscaled, kSlope>(tail, inv_t, shift, factor, coef, slope);
    for (int64_t j = 0; i + j < n; ++j) out[i + j] = v[j];
  }
}

ALIGNKERN_MULTIVERSION
void chunk_scaled_softmax(const float* x, int64_t n, float inv_t, float shift, float log_sum,
                          float coef, float slope, float* out) {
  const float factor = std::exp(-log_sum);
  const bool unscaled = inv_t == 1.0f;
  if (slope != 0.0f) {
    if (unscaled) {
      scaled_softmax<true, true>(x, n, inv_t, shift, factor, coef, slope, out);
    } else {
      scaled_softmax<false, true>(x, n, inv_t, shift, factor, coef, slope, out);
    }
  } else if (unscaled) {
    scaled_softmax<true, false>(x, n, inv_t, shift, factor, coef, slope, out);
  } else {
    scaled_softmax<false, false>(x, n, inv_t, shift, factor, coef, slope, out);
  }
}

inline double exp_nonpositive(double x) { return std::exp(x); }

double chunk_sum_exp(const double* x, int64_t n, double inv_t, double shift) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(scaled(x[i], inv_t) - shift);
  return s;
}

// (the kernels of the two-pass scalar path: double rows, and rows whose maximum is +inf)
template <typename Acc>
void scalar_scaled_softmax(const Acc* x, int64_t n, Acc inv_t, Acc shift, Acc log_sum, Acc coef,
                           Acc slope, Acc* out) {
  for (int64_t i = 0; i < n; ++i) {
    const Acc d = scaled(x[i], inv_t) - shift;
    const Acc p = std::exp(d - log_sum);
    out[i] = p == Acc(0) ? Acc(0) : (coef + slope * d) * p;
  }
}

void chunk_scaled_softmax(const double* x, int64_t n, double inv_t, double shift, double log_sum,
                          double coef, double slope, double* out) {
  scalar_scaled_softmax(x, n, inv_t, shift, log_sum, coef, slope, out);
}

// The slow, exact path for a row whose maximum is +inf (its sum is kept relative to 0, so terms
// can be positive) or whose log-sum is not finite: libm's exp, element by element.
template <typename Acc>
Acc scalar_sum_exp(const Acc* x, int64_t n, Acc inv_t, Acc shift) {
  Acc s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(scaled(x[i], inv_t) - shift);
  return s;
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

// The dense part of the gradient, grad_logits_v = -(coef + entropy_grad (z_v - shift)) *
// softmax(z)_v / temperature with softmax(z)_v = exp((z_v - shift) - log_sum) (entropy_grad may be
// null: 0); the caller then writes the target columns (alignkern/ops/_targets.py), once each.
template <typename T>
void dense_backward_rows(const typename Storage<T>::Acc* coef, const T* logits, int64_t n_rows,
                         int64_t vocab, const int64_t* row_offsets,
                         const typename Storage<T>::Acc* shift,
                         const typename Storage<T>::Acc* log_sum,
                         const typename Storage<T>::Acc* entropy_grad, T* grad_logits,
                         double temperature) {
  using Acc = typename Storage<T>::Acc;
  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n_rows; ++r) {
    const T* row = logits + row_offsets[r];
    T* grad_row = grad_logits + r * vocab;
    const bool finite = std::isfinite(log_sum[r]);  // else the row's maximum was +inf, or NaN
    const Acc row_coef = -coef[r] * inv_t;
    const Acc slope = entropy_grad == nullptr ? Acc(0) : -entropy_grad[r] * inv_t;
    Acc in_buffer[kChunk];
    Acc out_buffer[kChunk];
    for (int64_t start = 0; start < vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, vocab - start);
      const Acc* x = load_chunk<T>(row + start, n, in_buffer);
      if (finite) {
        chunk_scaled_softmax(x, n, inv_t, shift[r], log_sum[r], row_coef, slope, out_buffer);
      } else {
        scalar_scaled_softmax(x, n, inv_t, shift[r], log_sum[r], row_coef, slope, out_buffer);
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
                            uintptr_t log_sum, uintptr_t grad_logits, double temperature,
                            uintptr_t entropy_grad) {
  check_token_logprobs_args(vocab, temperature);
  dispatch_dtype(to_dtype(dtype), [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Storage<T>::Acc;
    dense_backward_rows<T>(as_ptr<const Acc>(coef), as_ptr<const T>(logits), n_rows, vocab,
                           as_ptr<const int64_t>(row_offsets), as_ptr<const Acc>(shift),
                           as_ptr<const Acc>(log_sum),
                           entropy_grad == 0 ? nullptr : as_ptr<const Acc>(entropy_grad),
                           as_ptr<T>(grad_logits), temperature);
  });
}

}  // namespace alignkern
