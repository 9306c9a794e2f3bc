// linear_logprobs forward on CUDA: the log-sum-exp of every row of the scaled logits, from hidden
// states and the LM head, without ever writing the (n_rows, vocab) logits to global memory. (The
// logits at the target ids are one dot product each, computed by the caller, so this kernel's cost
// does not grow with the number of targets.)
//
// One thread block owns kBM rows of hidden and walks the whole vocabulary in tiles of kBN columns.
// For each vocabulary tile:
//   1. the kBM x kBN tile of hidden . weight^T is accumulated over the hidden dimension in KBK
//      chunks staged through shared memory (zero-filled past every edge): on the tensor cores with
//      nvcuda::wmma for float16/bfloat16 (fp32 accumulators), with plain fp32 FMAs for float32 (no
//      TF32, so float32 keeps PyTorch's fp32 matmul precision);
//   2. the fp32 tile is stored to shared memory, where two threads per row add the bias, apply the
//      logit scale, the softcap and the temperature (z = x * inv_t with __fmul_rn, never
//      contracted into a multiply-add, so z rounds the same way in the maximum and the sum), and
//      fold their half of the columns into an online log-sum-exp (max m, sum s).
// After the last tile the two halves of each row merge their (m, s) and the row's log-sum-exp is
// written in two parts, shift = m (0 where m is infinite) and log_sum = log s (linear_logprobs.h).
//
// Fused statistics (the kStats instantiations, launched when any statistic pointer is given): in
// the same epilogue each thread also keeps, relative to the same reference point ref as s, the
// sums xd = sum exp(z - ref) (z - ref) and sq = sum exp(2 (z - ref)) (see OnlineStats for how they
// follow a change of ref), the plain sum of z, and the first column attaining the running max (a
// strictly greater z replaces it; columns are visited in increasing order); the halves merge with
// cuda_detail::stats_merge (an equal max goes to the smaller column) and each requested statistic
// is written: mean_dz = xd / s, log_sum_sq = log sq - 2 log s, sum_z, max_z = m, argmax. Without
// statistics the kernel is the plain LSE kernel (the statistic code is compiled out).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "online_lse.cuh"
#include "linear_logprobs.h"
#include "tuning.cuh"

namespace alignkern {
namespace {

using namespace cuda_detail;

namespace wmma = nvcuda::wmma;

constexpr int kBM = 64;                // rows of hidden per block
constexpr int kBN = 64;                // vocabulary columns per tile
constexpr int kThreads = 128;          // 4 warps; 2 threads per row in the epilogue
// At least 2 blocks per SM: without a minimum, ptxas 13 picks register counts that spill for some
// instantiations (16-28 bytes); with it every instantiation uses 119-242 registers, no spills.
constexpr int kMinBlocks = 2;
constexpr int kCPitch = kBN + 4;       // fp32 tile pitch; wmma stores need a multiple of 4
static_assert(kThreads == 2 * kBM, "the epilogue gives each row two threads");

// KBK, the hidden elements per shared-memory stage, is a tuning choice (tuning.cuh, linear_kbk):
// 32 or 64 for float16/bfloat16, 32 for float32. The products accumulate over k in the same order
// either way, so the choice changes the speed, never the result.
constexpr int kKbkChoices[] = {32, 64};
constexpr int kDefaultKbk = 32;

// Pitch of the staged hidden/weight tiles: 16 bytes of padding keeps every row 16-byte aligned
// (vector stores, wmma's ldm) while shifting consecutive rows by 4 banks.
template <typename T, int KBK>
constexpr int kPitch = KBK + 16 / static_cast<int>(sizeof(T));

// Static shared memory of one block: the two staged tiles and the fp32 logits tile (at most 48 KB).
template <typename T, int KBK>
constexpr int kSmemBytes = (kBM + kBN) * kPitch<T, KBK> * static_cast<int>(sizeof(T)) +
                           kBM * kCPitch * static_cast<int>(sizeof(float));


// One global load / shared store moves VEC elements as a single word of this type.
template <int BYTES>
struct Word;
template <>
struct Word<2> { using type = uint16_t; };
template <>
struct Word<4> { using type = uint32_t; };
template <>
struct Word<16> { using type = uint4; };

// Stages rows [0, ROWS) x columns [k0, k0 + KBK) of a row-major matrix (src points at the tile's
// first row; rows_left rows exist) into dst, zero-filling past the edges. VEC > 1 is only used
// when rows are 16-byte aligned and hidden_size % VEC == 0, so a word is wholly in or out.
template <typename T, int VEC, int ROWS, int KBK>
__device__ __forceinline__ void stage_tile(T* __restrict__ dst, const T* __restrict__ src,
                                           int64_t stride, int64_t rows_left, int64_t k0,
                                           int64_t hidden_size) {
  using W = typename Word<VEC * static_cast<int>(sizeof(T))>::type;
  constexpr int kWordsPerRow = KBK / VEC;
  static_assert((ROWS * kWordsPerRow) % kThreads == 0, "whole passes only");
#pragma unroll
  for (int pass = 0; pass < ROWS * kWordsPerRow / kThreads; ++pass) {
    const int idx = static_cast<int>(threadIdx.x) + pass * kThreads;
    const int r = idx / kWordsPerRow;
    const int c = (idx % kWordsPerRow) * VEC;
    W word{};
    if (r < rows_left && k0 + c < hidden_size) {
      word = *reinterpret_cast<const W*>(src + r * stride + k0 + c);
    }
    *reinterpret_cast<W*>(dst + r * kPitch<T, KBK> + c) = word;
  }
}

// float16/bfloat16 tile product on the tensor cores: warp w owns the 32 x 32 quarter at rows
// 32 * (w / 2), columns 32 * (w % 2), as 2 x 2 fragments of 16 x 16.
template <typename T, int KBK>
struct MmaTile {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];

  __device__ void zero() {
#pragma unroll
    for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f / 2][f % 2], 0.0f);
  }

  __device__ void add(const T* a_tile, const T* b_tile) {
    const int warp = threadIdx.x / 32;
    constexpr int kP = kPitch<T, KBK>;
    const T* a_base = a_tile + (warp / 2) * 32 * kP;
    const T* b_base = b_tile + (warp % 2) * 32 * kP;
#pragma unroll
    for (int kk = 0; kk < KBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      // The staged weight tile is (columns, k) row-major, i.e. weight^T column-major.
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], a_base + i * 16 * kP + kk, kP);
        wmma::load_matrix_sync(b[i], b_base + i * 16 * kP + kk, kP);
      }
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        wmma::mma_sync(acc[f / 2][f % 2], a[f / 2], b[f % 2], acc[f / 2][f % 2]);
      }
    }
  }

  __device__ void store(float* c_tile) const {
    const int warp = threadIdx.x / 32;
    float* base = c_tile + (warp / 2) * 32 * kCPitch + (warp % 2) * 32;
#pragma unroll
    for (int f = 0; f < 4; ++f) {
      wmma::store_matrix_sync(base + (f / 2) * 16 * kCPitch + (f % 2) * 16, acc[f / 2][f % 2],
                              kCPitch, wmma::mem_row_major);
    }
  }
};

// float32 tile product with fp32 FMAs: thread (ty, tx) = (tid / 8, tid % 8) owns rows ty + 16 i and
// columns tx + 8 j, so a warp reads 4 hidden rows and 8 weight rows of distinct banks per step.
template <int KBK>
struct FmaTile {
  static_assert(kThreads == 128 && kBM == 64 && kBN == 64, "thread layout assumes a 64 x 64 tile");
  static constexpr int kP = kPitch<float, KBK>;
  float acc[4][8];

  __device__ void zero() {
#pragma unroll
    for (int f = 0; f < 32; ++f) acc[f / 8][f % 8] = 0.0f;
  }

  __device__ void add(const float* a_tile, const float* b_tile) {
    const int tx = threadIdx.x % 8;
    const int ty = threadIdx.x / 8;
#pragma unroll
    for (int kk = 0; kk < KBK; ++kk) {
      float a[4];
      float b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = a_tile[(ty + 16 * i) * kP + kk];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = b_tile[(tx + 8 * j) * kP + kk];
#pragma unroll
      for (int f = 0; f < 32; ++f) acc[f / 8][f % 8] = fmaf(a[f / 8], b[f % 8], acc[f / 8][f % 8]);
    }
  }

  __device__ void store(float* c_tile) const {
    const int tx = threadIdx.x % 8;
    const int ty = threadIdx.x / 8;
#pragma unroll
    for (int f = 0; f < 32; ++f) {
      c_tile[(ty + 16 * (f / 8)) * kCPitch + tx + 8 * (f % 8)] = acc[f / 8][f % 8];
    }
  }
};

template <typename T, int KBK>
struct TileProduct {
  using type = MmaTile<T, KBK>;
};
template <int KBK>
struct TileProduct<float, KBK> {
  using type = FmaTile<KBK>;
};

// The scaled logit z from a dot product: + bias, * logit_scale, softcap, / temperature. (The
// caller folds logit_scale into inv_t when there is no softcap; a multiply by 1 is exact.)
template <typename T>
__device__ __forceinline__ float finish_logit(float dot, const T* bias, int64_t col, float softcap,
                                              float logit_scale, float inv_t) {
  float x = bias == nullptr ? dot : dot + to_f32(bias[col]);
  x = __fmul_rn(x, logit_scale);
  if (softcap > 0.0f) x = softcap * tanhf(x / softcap);
  return __fmul_rn(x, inv_t);
}

// The statistic outputs, (n_rows,) each; nullptr where not requested.
struct StatsOut {
  float* mean_dz;
  float* log_sum_sq;
  float* sum_z;
  float* max_z;
  int64_t* argmax;

  bool any() const {
    return mean_dz != nullptr || log_sum_sq != nullptr || sum_z != nullptr || max_z != nullptr ||
           argmax != nullptr;
  }
};

// Folds columns half, half + 2, ... (< n_cols) of one row of the logits tile into acc (and, with
// kStats, into st).
template <bool kStats, typename T>
__device__ __forceinline__ void fold_row(OnlineLse& acc, OnlineStats& st, const float* c_row,
                                         int half, int n_cols, const T* bias, int64_t v0,
                                         float softcap, float logit_scale, float inv_t) {
  float z[kBN / 2];
  float tile_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) {
    const int c = half + 2 * i;
    z[i] = c < n_cols ? finish_logit(c_row[c], bias, v0 + c, softcap, logit_scale, inv_t)
                      : -INFINITY;
    tile_max = fmaxf(tile_max, z[i]);  // fmaxf skips NaN; the sum below catches it
  }
  if constexpr (kStats) {
    // The first of this thread's columns above the running max (increasing column order).
    float best_z = acc.m;
#pragma unroll
    for (int i = 0; i < kBN / 2; ++i) {
      if (z[i] > best_z) {
        best_z = z[i];
        st.best = static_cast<int>(v0) + half + 2 * i;
      }
    }
  }
  const float m_new = fmaxf(acc.m, tile_max);
  const float ref = lse_reference(m_new);
  if (m_new != acc.m && acc.s != 0.0f) {
    const float old_ref = lse_reference(acc.m);
    const float alpha = __expf(old_ref - ref);
    if constexpr (kStats) {
      st.xd = alpha * (st.xd + (old_ref - ref) * acc.s);  // with the sum before its rescale
      st.sq *= alpha * alpha;
    }
    acc.s *= alpha;
  }
  float sum = 0.0f;
  if constexpr (kStats) {
    float xd = 0.0f;
    float sq = 0.0f;
    float zsum = 0.0f;
#pragma unroll
    for (int i = 0; i < kBN / 2; ++i) {
      const float dz = z[i] - ref;
      const float e = __expf(dz);
      sum += e;
      xd += e == 0.0f ? 0.0f : e * dz;  // z = -inf past the vocabulary: 0, not 0 * -inf
      sq += e * e;
      zsum += half + 2 * i < n_cols ? z[i] : 0.0f;
    }
    st.xd += xd;
    st.sq += sq;
    st.zsum += zsum;
  } else {
#pragma unroll
    for (int i = 0; i < kBN / 2; ++i) sum += __expf(z[i] - ref);
  }
  acc.s += sum;
  acc.m = m_new;
}

template <typename T, int VEC, int KBK, bool kStats>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    linear_logprobs_lse_kernel(const T* __restrict__ hidden, int64_t hidden_stride,
                               const T* __restrict__ weight, int64_t weight_stride,
                               const T* __restrict__ bias, int64_t n_rows, int64_t vocab,
                               int64_t hidden_size, float* __restrict__ shift,
                               float* __restrict__ log_sum, float inv_t, float softcap,
                               float logit_scale, StatsOut stats) {
  static_assert(kSmemBytes<T, KBK> <= 48 * 1024, "static shared memory is limited to 48 KB");
  __shared__ __align__(128) T a_tile[kBM * kPitch<T, KBK>];
  __shared__ __align__(128) T b_tile[kBN * kPitch<T, KBK>];
  __shared__ __align__(128) float c_tile[kBM * kCPitch];

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t rows_left = n_rows - row0;
  const T* hidden_block = hidden + row0 * hidden_stride;

  // Epilogue role: row local_row of the block, columns of parity `half`.
  const int local_row = threadIdx.x / 2;
  const int half = threadIdx.x % 2;
  const bool row_valid = local_row < rows_left;
  const int64_t row = row0 + local_row;

  OnlineLse acc{-INFINITY, 0.0f};
  // The first column of this thread's share until a z above -inf is seen.
  OnlineStats st{0.0f, 0.0f, 0.0f, half};
  typename TileProduct<T, KBK>::type tile;
  for (int64_t v0 = 0; v0 < vocab; v0 += kBN) {
    const int n_cols = static_cast<int>(vocab - v0 < kBN ? vocab - v0 : kBN);
    const T* weight_block = weight + v0 * weight_stride;
    tile.zero();
    for (int64_t k0 = 0; k0 < hidden_size; k0 += KBK) {
      stage_tile<T, VEC, kBM, KBK>(a_tile, hidden_block, hidden_stride, rows_left, k0,
                                   hidden_size);
      stage_tile<T, VEC, kBN, KBK>(b_tile, weight_block, weight_stride, n_cols, k0, hidden_size);
      __syncthreads();
      tile.add(a_tile, b_tile);
      __syncthreads();  // the next stage overwrites the tiles
    }
    tile.store(c_tile);
    __syncthreads();
    // c_tile is next written after the next tile's first k-loop barrier, which every thread
    // reaches only once done with this epilogue, so no barrier is needed after it.
    if (row_valid) {
      fold_row<kStats>(acc, st, c_tile + local_row * kCPitch, half, n_cols, bias, v0, softcap,
                       logit_scale, inv_t);
    }
  }

  // The two threads of a row are neighbouring lanes; every lane takes part in the shuffle.
  const OnlineLse other{__shfl_xor_sync(0xffffffffu, acc.m, 1),
                        __shfl_xor_sync(0xffffffffu, acc.s, 1)};
  if constexpr (kStats) {
    const OnlineStats other_st{__shfl_xor_sync(0xffffffffu, st.xd, 1),
                               __shfl_xor_sync(0xffffffffu, st.sq, 1),
                               __shfl_xor_sync(0xffffffffu, st.zsum, 1),
                               __shfl_xor_sync(0xffffffffu, st.best, 1)};
    if (!row_valid || half != 0) return;
    OnlineLse total;
    OnlineStats st_total;
    stats_merge(acc, st, other, other_st, total, st_total);
    const float log_s = logf(total.s);
    shift[row] = lse_reference(total.m);
    log_sum[row] = log_s;
    if (stats.mean_dz != nullptr) stats.mean_dz[row] = st_total.xd / total.s;
    if (stats.log_sum_sq != nullptr) stats.log_sum_sq[row] = logf(st_total.sq) - 2.0f * log_s;
    if (stats.sum_z != nullptr) stats.sum_z[row] = st_total.zsum;
    if (stats.max_z != nullptr) stats.max_z[row] = total.m;
    if (stats.argmax != nullptr) stats.argmax[row] = static_cast<int64_t>(st_total.best);
  } else {
    if (!row_valid || half != 0) return;
    const OnlineLse total = lse_merge(acc, other);
    shift[row] = lse_reference(total.m);
    log_sum[row] = logf(total.s);
  }
}

inline bool is_aligned16(uintptr_t address) { return address % 16 == 0; }

template <typename T, int KBK>
void launch_lse(uintptr_t hidden, int64_t hidden_stride, uintptr_t weight, int64_t weight_stride,
                uintptr_t bias, int64_t n_rows, int64_t vocab, int64_t hidden_size,
                uintptr_t shift, uintptr_t log_sum, float inv_t, float softcap, float logit_scale,
                cudaStream_t stream, StatsOut stats) {
  if (n_rows == 0) return;
  const int64_t n_blocks = (n_rows + kBM - 1) / kBM;
  check_arg(n_blocks <= 2147483647, "linear_logprobs: too many rows for one CUDA grid");
  constexpr int vec = 16 / static_cast<int>(sizeof(T));
  // The stride of a single row is never used, so it need not be aligned.
  auto stride_ok = [](int64_t rows, int64_t stride) {
    return rows == 1 || (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  };
  const bool vectorised = is_aligned16(hidden) && is_aligned16(weight) && hidden_size % vec == 0 &&
                          stride_ok(n_rows, hidden_stride) && stride_ok(vocab, weight_stride);
  auto run = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(n_blocks), kThreads, 0, stream>>>(
        as_ptr<const T>(hidden), hidden_stride, as_ptr<const T>(weight), weight_stride,
        bias == 0 ? nullptr : as_ptr<const T>(bias), n_rows, vocab, hidden_size,
        as_ptr<float>(shift), as_ptr<float>(log_sum), inv_t, softcap, logit_scale, stats);
  };
  if (stats.any()) {
    if (vectorised) {
      run(linear_logprobs_lse_kernel<T, vec, KBK, true>);
    } else {
      // KBK = 64 with scalar staging and the statistics spills on sm_80 (ptxas 13); 32 gives the
      // same result (the same k order), so the unaligned fallback with statistics always takes it.
      run(linear_logprobs_lse_kernel<T, 1, 32, true>);
    }
  } else if (vectorised) {
    run(linear_logprobs_lse_kernel<T, vec, KBK, false>);
  } else {
    run(linear_logprobs_lse_kernel<T, 1, KBK, false>);
  }
  ALIGNKERN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void linear_logprobs_lse_cuda(uintptr_t hidden, int64_t hidden_row_stride, uintptr_t weight,
                              int64_t weight_row_stride, uintptr_t bias, int dtype, int64_t n_rows,
                              int64_t vocab, int64_t hidden_size, uintptr_t shift,
                              uintptr_t log_sum, double temperature, double softcap,
                              double logit_scale, uintptr_t stream, uintptr_t mean_dz,
                              uintptr_t log_sum_sq,
                              uintptr_t sum_z, uintptr_t max_z, uintptr_t argmax) {
  check_linear_logprobs_args(n_rows, vocab, hidden_size, temperature);
  check_arg(logit_scale > 0 && std::isfinite(logit_scale),
            "linear_logprobs: logit_scale must be positive and finite");
  check_arg(dtype >= 0 && dtype <= 2,
            "linear_logprobs: the cuda kernel takes float32, float16 or bfloat16 (dtype codes "
            "0-2), got dtype code " + std::to_string(dtype));
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float cap = softcap > 0 ? static_cast<float>(softcap) : 0.0f;
  const int kbk = tuning_choice("linear_kbk", kDefaultKbk, kKbkChoices,
                                static_cast<int>(sizeof(kKbkChoices) / sizeof(int)));
  check_arg(argmax == 0 || vocab <= 2147483647,
            "linear_logprobs: the cuda argmax takes a vocabulary of at most 2^31 - 1 ids");
  const StatsOut stats{mean_dz == 0 ? nullptr : as_ptr<float>(mean_dz),
                       log_sum_sq == 0 ? nullptr : as_ptr<float>(log_sum_sq),
                       sum_z == 0 ? nullptr : as_ptr<float>(sum_z),
                       max_z == 0 ? nullptr : as_ptr<float>(max_z),
                       argmax == 0 ? nullptr : as_ptr<int64_t>(argmax)};
  auto launch = [&](auto tag, auto kbk_tag) {
    launch_lse<decltype(tag), decltype(kbk_tag)::value>(
        hidden, hidden_row_stride, weight, weight_row_stride, bias, n_rows, vocab, hidden_size,
        shift, log_sum, inv_t, cap, static_cast<float>(logit_scale), reinterpret_cast<cudaStream_t>(stream),
        stats);
  };
  using Kbk32 = std::integral_constant<int, 32>;
  using Kbk64 = std::integral_constant<int, 64>;
  switch (to_dtype(dtype)) {
    case DType::Float32: launch(float{}, Kbk32{}); break;  // 64 would exceed 48 KB of shared memory
    case DType::Float16:
      if (kbk == 64) launch(__half{}, Kbk64{}); else launch(__half{}, Kbk32{});
      break;
    case DType::BFloat16:
      if (kbk == 64) launch(__nv_bfloat16{}, Kbk64{}); else launch(__nv_bfloat16{}, Kbk32{});
      break;
    case DType::Float64: break;  // refused above
  }
}

}  // namespace alignkern
