// token_logprobs on the CPU: one OpenMP task per row, one pass over the row in L1-sized chunks with
// an online log-sum-exp, then K gathers. The backward recomputes softmax from the saved LSE and
// writes the gradient in the logits' dtype; no [N, V] float temporary is ever allocated.
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
#define ALIGNKERN_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ALIGNKERN_MULTIVERSION
#endif

// exp(x) for x <= 0 to ~1 ulp (Cephes' expf polynomial); 0 below -87.3, where exp underflows the
// normal range and every caller adds the result to a sum that is at least 1. NaN stays NaN.
// Positive x only reaches here when the row maximum is +inf; it returns +inf above 88.
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float poly = p * r * r + r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(scale));
  float y = poly * scale;
  y = x < -87.3f ? 0.0f : y;
  y = x > 88.0f ? std::numeric_limits<float>::infinity() : y;
  return y;
}

ALIGNKERN_MULTIVERSION
float chunk_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;  // NaN is caught later by the sum
  return m;
}

// sum_i exp(x_i * inv_t - shift)
ALIGNKERN_MULTIVERSION
float chunk_sum_exp(const float* x, int64_t n, float inv_t, float shift) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += exp_nonpositive(x[i] * inv_t - shift);
  return s;
}

// out_i = coef * exp(x_i * inv_t - lse)
ALIGNKERN_MULTIVERSION
void chunk_scaled_softmax(const float* x, int64_t n, float inv_t, float lse, float coef, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = coef * exp_nonpositive(x[i] * inv_t - lse);
}

inline double exp_nonpositive(double x) { return std::exp(x); }

double chunk_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

double chunk_sum_exp(const double* x, int64_t n, double inv_t, double shift) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] * inv_t - shift);
  return s;
}

void chunk_scaled_softmax(const double* x, int64_t n, double inv_t, double lse, double coef,
                          double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = coef * std::exp(x[i] * inv_t - lse);
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

// The online log-sum-exp of z = x * inv_t over one row. Infinite maxima follow torch.logsumexp:
// the running sum is then kept relative to 0 instead of the maximum, so a row holding +inf gives
// +inf, a row of -inf gives -inf, and NaN anywhere gives NaN.
template <typename T, typename Acc = typename Storage<T>::Acc>
Acc row_logsumexp(const T* row, int64_t vocab, Acc inv_t) {
  Acc buffer[kChunk];
  Acc m = -std::numeric_limits<Acc>::infinity();  // running max of z
  Acc s = 0;                                      // sum of exp(z - reference(m))
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const Acc* x = load_chunk<T>(row + start, n, buffer);
    const Acc chunk_m = chunk_max(x, n) * inv_t;
    const Acc m_new = chunk_m > m ? chunk_m : m;
    const Acc reference = std::isinf(m_new) ? Acc(0) : m_new;
    const Acc old_reference = std::isinf(m) ? Acc(0) : m;
    // s == 0 means nothing was counted yet; rescaling it could compute 0 * inf.
    if (m_new != m && s != Acc(0)) s *= exp_nonpositive(old_reference - reference);
    s += chunk_sum_exp(x, n, inv_t, reference);
    m = m_new;
  }
  return (std::isinf(m) ? Acc(0) : m) + std::log(s);
}

template <typename T>
void forward_rows(const T* logits, int64_t n_rows, int64_t vocab, const int64_t* row_offsets,
                  const int64_t* targets, int64_t k, typename Storage<T>::Acc* out,
                  typename Storage<T>::Acc* lse, double temperature, int64_t ignore_index) {
  using Acc = typename Storage<T>::Acc;
  const Acc inv_t = Acc(1) / static_cast<Acc>(temperature);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n_rows; ++r) {
    const T* row = logits + row_offsets[r];
    const Acc row_lse = row_logsumexp<T>(row, vocab, inv_t);
    lse[r] = row_lse;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t t = targets[r * k + j];
      Acc value;
      if (t == ignore_index) {
        value = 0;
      } else if (t < 0 || t >= vocab) {
        value = std::numeric_limits<Acc>::quiet_NaN();
      } else {
        value = Storage<T>::load(row[t]) * inv_t - row_lse;
      }
      out[r * k + j] = value;
    }
  }
}

// grad_z_v = sum_k g_k [t_k = v] - coef * softmax_v, coef = sum_{k valid} g_k - g_lse;
// grad_logits = grad_z / temperature. An out-of-range id makes its whole row NaN.
template <typename T>
void backward_rows(const typename Storage<T>::Acc* grad_out, int64_t g_row_stride,
                   int64_t g_col_stride, const typename Storage<T>::Acc* grad_lse,
                   int64_t glse_stride, const T* logits, int64_t n_rows, int64_t vocab,
                   const int64_t* row_offsets, const int64_t* targets, int64_t k,
                   const typename Storage<T>::Acc* lse, T* grad_logits, double temperature,
                   int64_t ignore_index) {
  using Acc = typename Storage<T>::Acc;
  const Acc inv_t = Acc(1) / static_cast<Acc>(temperature);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t* row_targets = targets + r * k;
    const Acc* g = grad_out + r * g_row_stride;
    Acc coef = grad_lse == nullptr ? Acc(0) : -grad_lse[r * glse_stride];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t t = row_targets[j];
      if (t == ignore_index) continue;
      coef += (t < 0 || t >= vocab) ? std::numeric_limits<Acc>::quiet_NaN() : g[j * g_col_stride];
    }
    const T* row = logits + row_offsets[r];
    T* grad_row = grad_logits + r * vocab;
    const Acc row_lse = lse[r];
    Acc in_buffer[kChunk];
    Acc out_buffer[kChunk];
    for (int64_t start = 0; start < vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, vocab - start);
      const Acc* x = load_chunk<T>(row + start, n, in_buffer);
      chunk_scaled_softmax(x, n, inv_t, row_lse, -coef * inv_t, out_buffer);
      for (int64_t i = 0; i < n; ++i) grad_row[start + i] = Storage<T>::store(out_buffer[i]);
    }
    // The target columns: add every g_k that points at the column, in Acc before rounding once.
    for (int64_t j = 0; j < k; ++j) {
      const int64_t t = row_targets[j];
      if (t == ignore_index || t < 0 || t >= vocab) continue;
      Acc picked = 0;
      for (int64_t i = 0; i < k; ++i) {
        if (row_targets[i] == t) picked += g[i * g_col_stride];
      }
      const Acc p = exp_nonpositive(Storage<T>::load(row[t]) * inv_t - row_lse);
      grad_row[t] = Storage<T>::store((picked - coef * p) * inv_t);
    }
  }
}

}  // namespace

void token_logprobs_fwd_cpu(uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab,
                            uintptr_t row_offsets, uintptr_t targets, int64_t k, uintptr_t out,
                            uintptr_t lse, double temperature, int64_t ignore_index) {
  check_arg(vocab > 0, "token_logprobs: vocabulary size must be positive");
  check_arg(temperature > 0, "token_logprobs: temperature must be positive");
  dispatch_dtype(to_dtype(dtype), [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Storage<T>::Acc;
    forward_rows<T>(as_ptr<const T>(logits), n_rows, vocab, as_ptr<const int64_t>(row_offsets),
                    as_ptr<const int64_t>(targets), k, as_ptr<Acc>(out), as_ptr<Acc>(lse),
                    temperature, ignore_index);
  });
}

void token_logprobs_bwd_cpu(uintptr_t grad_out, int64_t g_row_stride, int64_t g_col_stride,
                            uintptr_t grad_lse, int64_t glse_stride, uintptr_t logits, int dtype,
                            int64_t n_rows, int64_t vocab, uintptr_t row_offsets, uintptr_t targets,
                            int64_t k, uintptr_t lse, uintptr_t grad_logits, double temperature,
                            int64_t ignore_index) {
  check_arg(vocab > 0, "token_logprobs: vocabulary size must be positive");
  check_arg(temperature > 0, "token_logprobs: temperature must be positive");
  dispatch_dtype(to_dtype(dtype), [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Storage<T>::Acc;
    backward_rows<T>(as_ptr<const Acc>(grad_out), g_row_stride, g_col_stride,
                     grad_lse == 0 ? nullptr : as_ptr<const Acc>(grad_lse), glse_stride,
                     as_ptr<const T>(logits), n_rows, vocab, as_ptr<const int64_t>(row_offsets),
                     as_ptr<const int64_t>(targets), k, as_ptr<const Acc>(lse),
                     as_ptr<T>(grad_logits), temperature, ignore_index);
  });
}

}  // namespace alignkern
