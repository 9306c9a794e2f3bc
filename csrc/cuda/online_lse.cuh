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

// Running statistics kept beside an OnlineLse (m, s) by linear_logprobs' fused statistics, all
// relative to the same reference point ref = lse_reference(m):
//   xd = sum exp(z - ref) * (z - ref)  (mean of z - ref under softmax: xd / s; kept relative to
//                                      ref, since sum p z rounded near |z| loses the entropy)
//   sq = sum exp(2 (z - ref))          (log sum p^2 = log sq - 2 log s)
//   zsum = sum z over the columns      (the mean logit: zsum / vocab)
//   best = the first column attaining m
// Moving the reference from ref to ref' rescales s by alpha = exp(ref - ref'), sq by alpha^2 and
// turns xd into alpha (xd + (ref - ref') s).
struct OnlineStats {
  float xd;
  float sq;
  float zsum;
  int best;  // (the caller checks that every column id fits)
};

// Merges two (lse, stats) accumulators over disjoint column sets, each best the first column of
// its own set attaining its max: the larger max wins, an equal one goes to the smaller column.
// The LSE part is computed exactly as lse_merge does.
__device__ __forceinline__ void stats_merge(OnlineLse a, OnlineStats sa, OnlineLse b,
                                            OnlineStats sb, OnlineLse& lse, OnlineStats& st) {
  const float m = fmaxf(a.m, b.m);
  const float ref = lse_reference(m);
  // s == 0: nothing summed (xs == sq == 0 too); the factor could be inf.
  const float ca = a.s == 0.0f ? 0.0f : __expf(lse_reference(a.m) - ref);
  const float cb = b.s == 0.0f ? 0.0f : __expf(lse_reference(b.m) - ref);
  lse = {m, a.s * ca + b.s * cb};
  st.xd = (sa.xd + (lse_reference(a.m) - ref) * a.s) * ca +
          (sb.xd + (lse_reference(b.m) - ref) * b.s) * cb;
  st.sq = sa.sq * (ca * ca) + sb.sq * (cb * cb);
  st.zsum = sa.zsum + sb.zsum;
  st.best = a.m > b.m ? sa.best : b.m > a.m ? sb.best : (sa.best < sb.best ? sa.best : sb.best);
}

}  // namespace cuda_detail
}  // namespace alignkern
