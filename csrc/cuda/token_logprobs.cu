// token_logprobs on CUDA: one thread block per row. Forward: each thread keeps an online
// log-sum-exp (max, sum) over its 16-byte vectors of the row, the block merges them, then K threads
// gather the target logits; the row's (shift, log_sum) = (max, log sum exp(z - max)) are written
// apart and a log-probability is (z_t - shift) - log_sum (token_logprobs.h says why). Backward:
// recompute softmax as exp((z - shift) - log_sum) and write its dense part
// -coef * softmax / T in the logits' dtype with 16-byte stores; the caller writes the target
// columns afterwards (alignkern/ops/_targets.py), so the cost is O(V + K) per row.
// float64 logits are not handled here (the Python layer refuses them for this backend).
//
// z = x * inv_t is formed with __fmul_rn, which the compiler never contracts into a multiply-add:
// the maximum, the sum and the gathers must round z the same way, or at |z| ~ 1e9 a log-probability
// could come out tens of nats positive.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "online_lse.cuh"
#include "token_logprobs.h"
#include "tuning.cuh"

namespace alignkern {
namespace {

using namespace cuda_detail;

// Threads per block: a tuning choice (tuning.cuh, token_threads); every value is instantiated.
constexpr int kThreadChoices[] = {256, 512, 1024};
constexpr int kDefaultThreads = 256;


template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <int kThreads>
__device__ OnlineLse block_lse_reduce(OnlineLse v) {
  static_assert(kThreads % 32 == 0 && kThreads / 32 <= 32, "one partial per warp, one warp merges");
  __shared__ OnlineLse partial[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) {
    OnlineLse other{__shfl_xor_sync(0xffffffffu, v.m, offset),
                    __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = lse_merge(v, other);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? partial[lane] : OnlineLse{-INFINITY, 0.0f};
    for (int offset = 16; offset > 0; offset >>= 1) {
      OnlineLse other{__shfl_xor_sync(0xffffffffu, v.m, offset),
                      __shfl_xor_sync(0xffffffffu, v.s, offset)};
      v = lse_merge(v, other);
    }
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  return partial[0];
}

// VEC elements of T loaded with one 16-byte (or narrower for VEC == 1) transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void update_lse(OnlineLse& acc, const float (&x)[VEC]) {
  float chunk_max = x[0];
#pragma unroll
  for (int i = 1; i < VEC; ++i) chunk_max = fmaxf(chunk_max, x[i]);
  const float m_new = fmaxf(acc.m, chunk_max);
  const float ref = lse_reference(m_new);
  if (m_new != acc.m && acc.s != 0.0f) acc.s *= __expf(lse_reference(acc.m) - ref);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < VEC; ++i) sum += __expf(x[i] - ref);  // NaN in x reaches the sum here
  acc.s += sum;
  acc.m = m_new;
}

template <typename T, int VEC, int kThreads>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_fwd_kernel(const T* __restrict__ logits, int64_t vocab, const int64_t* __restrict__ row_offsets,
                              const int64_t* __restrict__ targets, int64_t k,
                              float* __restrict__ out, float* __restrict__ shift,
                              float* __restrict__ log_sum, float inv_t, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const T* row_ptr = logits + row_offsets[row];
  OnlineLse acc{-INFINITY, 0.0f};
  const int64_t n_vec = vocab / VEC;
  const auto* vec_ptr = reinterpret_cast<const Vec<T, VEC>*>(row_ptr);
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    const Vec<T, VEC> loaded = vec_ptr[i];
    float x[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) x[j] = __fmul_rn(to_f32(loaded.v[j]), inv_t);
    update_lse<T, VEC>(acc, x);
  }
  for (int64_t col = n_vec * VEC + threadIdx.x; col < vocab; col += kThreads) {
    const float x[1] = {__fmul_rn(to_f32(row_ptr[col]), inv_t)};
    update_lse<T, 1>(acc, x);
  }
  const OnlineLse total = block_lse_reduce<kThreads>(acc);
  const float row_shift = lse_reference(total.m);
  const float row_log_sum = logf(total.s);
  if (threadIdx.x == 0) {
    shift[row] = row_shift;
    log_sum[row] = row_log_sum;
  }
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const int64_t t = targets[row * k + j];
    float value;
    if (t == ignore_index) {
      value = 0.0f;
    } else if (t < 0 || t >= vocab) {
      value = NAN;
    } else {
      value = (__fmul_rn(to_f32(row_ptr[t]), inv_t) - row_shift) - row_log_sum;
    }
    out[row * k + j] = value;
  }
}

template <typename T, int VEC, int kThreads>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_bwd_kernel(const float* __restrict__ coef, const T* __restrict__ logits,
                              int64_t vocab, const int64_t* __restrict__ row_offsets,
                              const float* __restrict__ shift, const float* __restrict__ log_sum,
                              T* __restrict__ grad_logits, float inv_t) {
  const int64_t row = blockIdx.x;
  const float scale = -coef[row] * inv_t;
  const float row_shift = shift[row];
  const float row_log_sum = log_sum[row];
  const T* row_ptr = logits + row_offsets[row];
  T* grad_row = grad_logits + row * vocab;
  auto grad_at = [&](T x) {
    return from_f32<T>(scale * __expf((__fmul_rn(to_f32(x), inv_t) - row_shift) - row_log_sum));
  };

  const int64_t n_vec = vocab / VEC;
  const auto* in_vec = reinterpret_cast<const Vec<T, VEC>*>(row_ptr);
  auto* out_vec = reinterpret_cast<Vec<T, VEC>*>(grad_row);
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    const Vec<T, VEC> loaded = in_vec[i];
    Vec<T, VEC> result;
#pragma unroll
    for (int j = 0; j < VEC; ++j) result.v[j] = grad_at(loaded.v[j]);
    out_vec[i] = result;
  }
  for (int64_t col = n_vec * VEC + threadIdx.x; col < vocab; col += kThreads) {
    grad_row[col] = grad_at(row_ptr[col]);
  }
}

template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

// 16-byte vectors need every row start aligned to 16 bytes; the caller knows from the strides.
inline bool is_aligned16(uintptr_t address) { return address % 16 == 0; }

// Calls fn(std::integral_constant<int, threads>{}) for the block size ALIGNKERN_CUDA_CONFIG asks for.
template <typename Fn>
void dispatch_threads(Fn&& fn) {
  const int threads = tuning_choice("token_threads", kDefaultThreads, kThreadChoices,
                                    static_cast<int>(sizeof(kThreadChoices) / sizeof(int)));
  switch (threads) {
    case 512: fn(std::integral_constant<int, 512>{}); break;
    case 1024: fn(std::integral_constant<int, 1024>{}); break;
    default: fn(std::integral_constant<int, 256>{}); break;
  }
}

template <typename T, int kThreads>
void launch_forward(uintptr_t logits, int64_t n_rows, int64_t vocab, uintptr_t row_offsets,
                    bool rows_aligned,
                    uintptr_t targets, int64_t k, uintptr_t out, uintptr_t shift,
                    uintptr_t log_sum, float inv_t, int64_t ignore_index, cudaStream_t stream) {
  if (n_rows == 0) return;
  const dim3 grid(static_cast<unsigned>(n_rows));
  auto args = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(as_ptr<const T>(logits), vocab,
                                          as_ptr<const int64_t>(row_offsets),
                                          as_ptr<const int64_t>(targets), k, as_ptr<float>(out),
                                          as_ptr<float>(shift), as_ptr<float>(log_sum), inv_t,
                                          ignore_index);
  };
  if (rows_aligned && is_aligned16(logits)) {
    args(token_logprobs_fwd_kernel<T, vec_width<T>(), kThreads>);
  } else {
    args(token_logprobs_fwd_kernel<T, 1, kThreads>);
  }
  ALIGNKERN_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int kThreads>
void launch_backward(uintptr_t coef, uintptr_t logits, int64_t n_rows, int64_t vocab,
                     uintptr_t row_offsets, bool rows_aligned, uintptr_t shift,
                     uintptr_t log_sum, uintptr_t grad_logits, float inv_t, cudaStream_t stream) {
  if (n_rows == 0) return;
  const dim3 grid(static_cast<unsigned>(n_rows));
  auto args = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(as_ptr<const float>(coef), as_ptr<const T>(logits),
                                          vocab, as_ptr<const int64_t>(row_offsets),
                                          as_ptr<const float>(shift), as_ptr<const float>(log_sum),
                                          as_ptr<T>(grad_logits), inv_t);
  };
  if (rows_aligned && is_aligned16(logits) && is_aligned16(grad_logits) &&
      (vocab * static_cast<int64_t>(sizeof(T))) % 16 == 0) {
    args(token_logprobs_bwd_kernel<T, vec_width<T>(), kThreads>);
  } else {
    args(token_logprobs_bwd_kernel<T, 1, kThreads>);
  }
  ALIGNKERN_CUDA_CHECK(cudaGetLastError());
}

template <typename Fn>
void dispatch_cuda_dtype(int dtype, Fn&& fn) {
  switch (to_dtype(dtype)) {
    case DType::Float32: fn(float{}); break;
    case DType::Float16: fn(__half{}); break;
    case DType::BFloat16: fn(__nv_bfloat16{}); break;
    case DType::Float64:
      throw std::invalid_argument("alignkern._C: the cuda backend takes float32/float16/bfloat16 logits, got float64");
  }
}

// Checks the arguments every entry point shares and returns 1 / temperature.
float checked_inverse_temperature(int64_t n_rows, int64_t vocab, double temperature) {
  check_token_logprobs_args(vocab, temperature);
  check_arg(n_rows <= 2147483647, "token_logprobs: too many rows for one CUDA grid");
  return static_cast<float>(1.0 / temperature);
}

}  // namespace

void token_logprobs_fwd_cuda(uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab,
                             uintptr_t row_offsets, int rows_aligned, uintptr_t targets, int64_t k,
                             uintptr_t out, uintptr_t shift, uintptr_t log_sum, double temperature,
                             int64_t ignore_index, uintptr_t stream) {
  const float inv_t = checked_inverse_temperature(n_rows, vocab, temperature);
  dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_threads([&](auto threads) {
      launch_forward<T, decltype(threads)::value>(
          logits, n_rows, vocab, row_offsets, rows_aligned != 0, targets, k, out, shift, log_sum,
          inv_t, ignore_index, reinterpret_cast<cudaStream_t>(stream));
    });
  });
}

void token_logprobs_bwd_cuda(uintptr_t coef, uintptr_t logits, int dtype, int64_t n_rows,
                             int64_t vocab, uintptr_t row_offsets, int rows_aligned,
                             uintptr_t shift, uintptr_t log_sum, uintptr_t grad_logits,
                             double temperature, uintptr_t stream) {
  const float inv_t = checked_inverse_temperature(n_rows, vocab, temperature);
  dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_threads([&](auto threads) {
      launch_backward<T, decltype(threads)::value>(coef, logits, n_rows, vocab, row_offsets,
                                                   rows_aligned != 0, shift, log_sum, grad_logits,
                                                   inv_t, reinterpret_cast<cudaStream_t>(stream));
    });
  });
}

}  // namespace alignkern
