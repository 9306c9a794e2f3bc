// Device helpers shared by the CUDA kernels: conversions to fp32 and a running log-sum-exp that
// follows torch.logsumexp's conventions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace alignkern {
namespace cuda_detail {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// A running log-sum-exp: s = sum exp(z - ref(m)), ref(m) = m unless m is infinite, then 0
// (torch.logsumexp's convention: +inf rows give +inf, all -inf rows give -inf, NaN gives NaN).
struct OnlineLse {
  float m;
  float s;
};

__device__ __forceinline__ float lse_reference(float m) { return isinf(m) ? 0.0f : m; }

__device__ __forceinline__ OnlineLse lse_merge(OnlineLse a, OnlineLse b) {
  const float m = fmaxf(a.m, b.m);
  const float ref = lse_reference(m);
  const float sa = a.s == 0.0f ? 0.0f : a.s * __expf(lse_reference(a.m) - ref);
  const float sb = b.s == 0.0f ? 0.0f : b.s * __expf(lse_reference(b.m) - ref);
  return {m, sa + sb};
}

}  // namespace cuda_detail
}  // namespace alignkern
