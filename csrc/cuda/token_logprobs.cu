// token_logprobs on CUDA: one thread block per row. Forward: each thread keeps an online
// log-sum-exp (max, sum) over its 16-byte vectors of the row, the block merges them, then K threads
// gather the target logits. Backward: recompute softmax from the saved LSE, add the upstream
// gradient at target columns, write the gradient in the logits' dtype with 16-byte stores.
// float64 logits are not handled here (the Python layer refuses them for this backend).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common.h"
#include "online_lse.cuh"
#include "token_logprobs.h"

namespace alignkern {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;


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

__device__ OnlineLse block_lse_reduce(OnlineLse v) {
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

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_fwd_kernel(const T* __restrict__ logits, int64_t vocab, const int64_t* __restrict__ row_offsets,
                              const int64_t* __restrict__ targets, int64_t k,
                              float* __restrict__ out, float* __restrict__ lse, float inv_t,
                              int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const T* row_ptr = logits + row_offsets[row];
  OnlineLse acc{-INFINITY, 0.0f};
  const int64_t n_vec = vocab / VEC;
  const auto* vec_ptr = reinterpret_cast<const Vec<T, VEC>*>(row_ptr);
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    const Vec<T, VEC> loaded = vec_ptr[i];
    float x[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) x[j] = to_f32(loaded.v[j]) * inv_t;
    update_lse<T, VEC>(acc, x);
  }
  for (int64_t col = n_vec * VEC + threadIdx.x; col < vocab; col += kThreads) {
    const float x[1] = {to_f32(row_ptr[col]) * inv_t};
    update_lse<T, 1>(acc, x);
  }
  const OnlineLse total = block_lse_reduce(acc);
  const float row_lse = lse_reference(total.m) + logf(total.s);
  if (threadIdx.x == 0) lse[row] = row_lse;
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const int64_t t = targets[row * k + j];
    float value;
    if (t == ignore_index) {
      value = 0.0f;
    } else if (t < 0 || t >= vocab) {
      value = NAN;
    } else {
      value = to_f32(row_ptr[t]) * inv_t - row_lse;
    }
    out[row * k + j] = value;
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_bwd_kernel(const float* __restrict__ grad_out, int64_t g_row_stride,
                              int64_t g_col_stride, const float* __restrict__ grad_lse,
                              int64_t glse_stride, const T* __restrict__ logits, int64_t vocab,
                              const int64_t* __restrict__ row_offsets,
                              const int64_t* __restrict__ targets, int64_t k,
                              const float* __restrict__ lse, T* __restrict__ grad_logits,
                              float inv_t, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  const int64_t* row_targets = targets + row * k;
  const float* g = grad_out + row * g_row_stride;
  // coef = sum of valid g_k minus g_lse; every thread computes it (K is small and cached).
  float coef = grad_lse == nullptr ? 0.0f : -grad_lse[row * glse_stride];
  for (int64_t j = 0; j < k; ++j) {
    const int64_t t = row_targets[j];
    if (t == ignore_index) continue;
    coef += (t < 0 || t >= vocab) ? NAN : g[j * g_col_stride];
  }
  const float row_lse = lse[row];
  const T* row_ptr = logits + row_offsets[row];
  T* grad_row = grad_logits + row * vocab;

  auto grad_at = [&](float z, int64_t col) {
    float picked = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      if (row_targets[j] == col) picked += g[j * g_col_stride];
    }
    return (picked - coef * __expf(z - row_lse)) * inv_t;
  };

  const int64_t n_vec = vocab / VEC;
  const auto* in_vec = reinterpret_cast<const Vec<T, VEC>*>(row_ptr);
  auto* out_vec = reinterpret_cast<Vec<T, VEC>*>(grad_row);
  for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
    const Vec<T, VEC> loaded = in_vec[i];
    Vec<T, VEC> result;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      result.v[j] = from_f32<T>(grad_at(to_f32(loaded.v[j]) * inv_t, i * VEC + j));
    }
    out_vec[i] = result;
  }
  for (int64_t col = n_vec * VEC + threadIdx.x; col < vocab; col += kThreads) {
    grad_row[col] = from_f32<T>(grad_at(to_f32(row_ptr[col]) * inv_t, col));
  }
}

template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

// 16-byte vectors need every row start aligned to 16 bytes.
// 16-byte vectors need every row start aligned to 16 bytes; the caller knows from the strides.
inline bool is_aligned16(uintptr_t address) { return address % 16 == 0; }

template <typename T>
void launch_forward(uintptr_t logits, int64_t n_rows, int64_t vocab, uintptr_t row_offsets,
                    bool rows_aligned,
                    uintptr_t targets, int64_t k, uintptr_t out, uintptr_t lse, float inv_t,
                    int64_t ignore_index, cudaStream_t stream) {
  if (n_rows == 0) return;
  const dim3 grid(static_cast<unsigned>(n_rows));
  auto args = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(as_ptr<const T>(logits), vocab,
                                          as_ptr<const int64_t>(row_offsets),
                                          as_ptr<const int64_t>(targets), k, as_ptr<float>(out),
                                          as_ptr<float>(lse), inv_t, ignore_index);
  };
  if (rows_aligned && is_aligned16(logits)) {
    args(token_logprobs_fwd_kernel<T, vec_width<T>()>);
  } else {
    args(token_logprobs_fwd_kernel<T, 1>);
  }
  ALIGNKERN_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_backward(uintptr_t grad_out, int64_t g_row_stride, int64_t g_col_stride,
                     uintptr_t grad_lse, int64_t glse_stride, uintptr_t logits, int64_t n_rows,
                     int64_t vocab, uintptr_t row_offsets, bool rows_aligned, uintptr_t targets,
                     int64_t k, uintptr_t lse, uintptr_t grad_logits, float inv_t, int64_t ignore_index,
                     cudaStream_t stream) {
  if (n_rows == 0) return;
  const dim3 grid(static_cast<unsigned>(n_rows));
  auto args = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(
        as_ptr<const float>(grad_out), g_row_stride, g_col_stride,
        grad_lse == 0 ? nullptr : as_ptr<const float>(grad_lse), glse_stride,
        as_ptr<const T>(logits), vocab, as_ptr<const int64_t>(row_offsets),
        as_ptr<const int64_t>(targets), k,
        as_ptr<const float>(lse), as_ptr<T>(grad_logits), inv_t, ignore_index);
  };
  if (rows_aligned && is_aligned16(logits) && is_aligned16(grad_logits) &&
      (vocab * static_cast<int64_t>(sizeof(T))) % 16 == 0) {
    args(token_logprobs_bwd_kernel<T, vec_width<T>()>);
  } else {
    args(token_logprobs_bwd_kernel<T, 1>);
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
                             uintptr_t out, uintptr_t lse, double temperature, int64_t ignore_index,
                             uintptr_t stream) {
  const float inv_t = checked_inverse_temperature(n_rows, vocab, temperature);
  dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_forward<T>(logits, n_rows, vocab, row_offsets, rows_aligned != 0, targets, k, out,
                      lse, inv_t, ignore_index, reinterpret_cast<cudaStream_t>(stream));
  });
}

void token_logprobs_bwd_cuda(uintptr_t grad_out, int64_t g_row_stride, int64_t g_col_stride,
                             uintptr_t grad_lse, int64_t glse_stride, uintptr_t logits, int dtype,
                             int64_t n_rows, int64_t vocab, uintptr_t row_offsets, int rows_aligned,
                             uintptr_t targets, int64_t k, uintptr_t lse, uintptr_t grad_logits,
                             double temperature, int64_t ignore_index, uintptr_t stream) {
  const float inv_t = checked_inverse_temperature(n_rows, vocab, temperature);
  dispatch_cuda_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_backward<T>(grad_out, g_row_stride, g_col_stride, grad_lse, glse_stride, logits,
                       n_rows, vocab, row_offsets, rows_aligned != 0, targets, k, lse, grad_logits,
                       inv_t, ignore_index, reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // namespace alignkern
