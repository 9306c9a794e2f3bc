// reward_attention forward on CUDA, FlashAttention-2 style: softmax attention with a per-key bias,
// a causal mask and a reward-ordering mask, without writing the (Lq, Lk) scores to global memory.
//
//   S_ij = scale * <q_i, k_j> + key_bias_j,   key j visible to query i iff
//          (causal => j <= i + Lk - Lq) and (ranks given => key_rank_j <= query_rank_i),
//   out_i = sum_{visible j} softmax_j(S_i) v_j,   lse_i = log sum_{visible j} exp(S_ij);
//   a row with no visible key gives out_i = 0 and lse_i = -inf.
//
// One thread block (4 warps) owns kBM = 64 query rows of one (batch, query head); warp w owns rows
// 16 w .. 16 w + 15 of the tile for the whole kernel, so after the block-wide staging of each key
// tile a warp only synchronises with itself. The Q tile is staged in shared memory once; then for
// each tile of kBN = 64 keys (tiles that causality hides from every row of the block are skipped):
//   1. the block stages K and V (zero-filled past Lk), the key bias and the key ranks;
//   2. each warp computes its 16 x 64 slice of Q K^T in fp32: on the tensor cores with
//      nvcuda::wmma for float16/bfloat16, with plain fp32 FMAs for float32 (no TF32), and stores it
//      to shared memory;
//   3. two lanes per row apply scale, bias and the masks, update the row's running max m and sum l
//      (online softmax; the reference point is m, or 0 while m is -inf, so (-inf) - (-inf) never
//      happens), and overwrite the scores in place with P = exp(S - ref) in the input dtype, and
//      the per-row correction exp(ref_old - ref_new) that rescales the running output;
//   4. the warp rescales its fp32 output accumulator O (16 x D) by the correction and adds P V.
// At the end O is divided by l (rows with l == 0 stay 0), written in the input dtype, and lse is
// ref + log(l) (-inf when l == 0).
//
// The float16/bfloat16 accumulator lives in wmma fragments, whose element-to-(row, column) mapping
// is unspecified; each lane finds the row of each of its elements once, by loading a fragment from
// a 16 x 16 matrix whose entries are their row numbers, and uses that map for the per-row scaling.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

// Only compiled into CUDA builds, where CMake defines this too; defined here so that the file also
// compiles on its own.
#ifndef ALIGNKERN_WITH_CUDA
#define ALIGNKERN_WITH_CUDA 1
#endif

#include "common.h"
#include "online_lse.cuh"
#include "reward_attention.h"

namespace alignkern {
namespace {

using namespace cuda_detail;

namespace wmma = nvcuda::wmma;

constexpr int kBM = 64;                  // query rows per block
constexpr int kBN = 64;                  // keys per tile
constexpr int kThreads = 128;            // 4 warps
constexpr int kWarpRows = 16;            // query rows per warp
constexpr int kSPitch = kBN + 4;         // fp32 score tile pitch; wmma stores need a multiple of 4
static_assert(kThreads / 32 * kWarpRows == kBM, "each warp owns 16 query rows");
static_assert(kThreads == 2 * kBN, "half the block stages the key bias, half the key ranks");
static_assert(kBN == 64, "the softmax gives each of a row's two lanes 16 pairs of columns");

using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Pitch (elements) of the staged Q, K and V tiles: 16 bytes of padding keeps every row 16-byte
// aligned (vector stores, wmma's ldm) while shifting consecutive rows by 4 banks.
template <typename T, int D>
constexpr int kPitch = D + 16 / static_cast<int>(sizeof(T));

// Pitch (elements of T) of P, which overwrites the fp32 scores of its row in place.
template <typename T>
constexpr int kPPitch = kSPitch * static_cast<int>(sizeof(float) / sizeof(T));

constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Byte offsets into the dynamic shared memory.
template <typename T, int D>
struct SmemLayout {
  static constexpr size_t kStage = align128(sizeof(T) * kBM * kPitch<T, D>);  // kBM == kBN
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + kStage;
  static constexpr size_t kV = kK + kStage;
  static constexpr size_t kS = kV + kStage;                                    // scores, then P
  static constexpr size_t kBias = kS + align128(sizeof(float) * kBM * kSPitch);
  static constexpr size_t kCorr = kBias + align128(sizeof(float) * kBN);       // per-row factor
  static constexpr size_t kKeyRank = kCorr + align128(sizeof(float) * kBM);
  static constexpr size_t kQueryRank = kKeyRank + align128(sizeof(double) * kBN);
  static constexpr size_t kBytes = kQueryRank + align128(sizeof(double) * kBM);
};

template <typename T>
struct Params {
  const T* q;
  const T* k;
  const T* v;
  const float* key_bias;     // (B, bias_heads, Lk) or nullptr
  const double* key_rank;    // (B, Lk) or nullptr
  const double* query_rank;  // (B, Lq) or nullptr (exactly when key_rank is)
  T* out;
  float* lse;
  int64_t heads_q;
  int64_t heads_kv;
  int64_t group;  // heads_q / heads_kv
  int64_t len_q;
  int64_t len_k;
  int64_t bias_heads;
  int64_t n_qtiles;
  float scale;
  int causal;
  int vec16;  // q, k and v are 16-byte aligned: stage with 16-byte loads
};

// float32 output is written by FmaEngine directly.
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Stores two neighbouring elements (dst is 2-element aligned).
__device__ __forceinline__ void store_pair(float* dst, float a, float b) {
  *reinterpret_cast<float2*>(dst) = make_float2(a, b);
}
__device__ __forceinline__ void store_pair(__half* dst, float a, float b) {
  *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* dst, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
}

// exp for the probabilities: the fast intrinsic is plenty for 16-bit outputs; float32 keeps expf.
template <typename T>
__device__ __forceinline__ float softmax_exp(float x) { return __expf(x); }
template <>
__device__ __forceinline__ float softmax_exp<float>(float x) { return expf(x); }

// Raw storage words of one element, so that staging never needs T's constructors.
template <int BYTES>
struct Word;
template <>
struct Word<2> { using type = uint16_t; };
template <>
struct Word<4> { using type = uint32_t; };

// Stages ROWS x D elements of a contiguous (rows, D) matrix (src points at the tile's first row,
// rows_left rows exist) into dst with pitch kPitch, zero-filling the rows past the end. With vec16
// every row (D * sizeof(T) is a multiple of 32 bytes) moves as 16-byte words.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void stage_rows(T* __restrict__ dst, const T* __restrict__ src,
                                           int64_t rows_left, bool vec16) {
  constexpr int kP = kPitch<T, D>;
  if (vec16) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    constexpr int kWords = ROWS * D / kVec;
    static_assert(kWords % kThreads == 0, "whole passes only");
#pragma unroll
    for (int pass = 0; pass < kWords / kThreads; ++pass) {
      const int idx = static_cast<int>(threadIdx.x) + pass * kThreads;
      const int r = idx / (D / kVec);
      const int c = idx % (D / kVec) * kVec;
      uint4 word = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows_left) word = *reinterpret_cast<const uint4*>(src + r * D + c);
      *reinterpret_cast<uint4*>(dst + r * kP + c) = word;
    }
  } else {
    using W = typename Word<static_cast<int>(sizeof(T))>::type;
    const W* src_w = reinterpret_cast<const W*>(src);
    W* dst_w = reinterpret_cast<W*>(dst);
    for (int idx = static_cast<int>(threadIdx.x); idx < ROWS * D; idx += kThreads) {
      const int r = idx / D;
      const int c = idx % D;
      dst_w[r * kP + c] = r < rows_left ? src_w[r * D + c] : W{0};
    }
  }
}

// ---- Tile products: warp-level S = Q K^T and O = O * corr + P V for the warp's 16 rows. ----

// float16/bfloat16 on the tensor cores. O is D / 16 accumulator fragments of 16 x 16.
template <typename T, int D>
struct WmmaEngine {
  static constexpr int kFrags = D / 16;
  static constexpr int kElems = Accumulator::num_elements;
  Accumulator o[kFrags];
  int row_of[kElems];  // warp-local row of each accumulator element of this lane

  // s_w: the warp's 16 rows of the score tile, used as scratch.
  __device__ void init(float* s_w, int lane) {
    for (int idx = lane; idx < 16 * 16; idx += 32) {
      s_w[(idx / 16) * kSPitch + idx % 16] = static_cast<float>(idx / 16);
    }
    __syncwarp();
    Accumulator rows;
    wmma::load_matrix_sync(rows, s_w, kSPitch, wmma::mem_row_major);
#pragma unroll
    for (int i = 0; i < kElems; ++i) row_of[i] = static_cast<int>(rows.x[i]);
#pragma unroll
    for (int f = 0; f < kFrags; ++f) wmma::fill_fragment(o[f], 0.0f);
    __syncwarp();  // s_w is overwritten next
  }

  // s_w[r][c] = <q_(r0 + r), k_c> for the warp's rows r < 16 and the tile's keys c < kBN.
  __device__ void scores(const T* q_w, const T* k_s, float* s_w, int) const {
    constexpr int kP = kPitch<T, D>;
    Accumulator s[kBN / 16];
#pragma unroll
    for (int n = 0; n < kBN / 16; ++n) wmma::fill_fragment(s[n], 0.0f);
#pragma unroll 1  // fully unrolled, ptxas hoists every fragment load and spills
    for (int kk = 0; kk < D; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, q_w + kk, kP);
#pragma unroll
      for (int n = 0; n < kBN / 16; ++n) {
        // The staged K tile is (key, d) row-major, i.e. K^T column-major.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, k_s + n * 16 * kP + kk, kP);
        wmma::mma_sync(s[n], a, b, s[n]);
      }
    }
#pragma unroll
    for (int n = 0; n < kBN / 16; ++n) {
      wmma::store_matrix_sync(s_w + n * 16, s[n], kSPitch, wmma::mem_row_major);
    }
  }

  // Multiplies row r of O by factor_w[r].
  __device__ void rescale(const float* factor_w, int) {
    float f[kElems];
#pragma unroll
    for (int i = 0; i < kElems; ++i) f[i] = factor_w[row_of[i]];
#pragma unroll
    for (int c = 0; c < kFrags; ++c) {
#pragma unroll
      for (int i = 0; i < kElems; ++i) o[c].x[i] *= f[i];
    }
  }

  // O += P V, P the warp's 16 x kBN probabilities (pitch kPPitch), V the staged (key, d) tile.
  __device__ void accumulate(const T* p_w, const T* v_s, int) {
    constexpr int kP = kPitch<T, D>;
#pragma unroll 1  // as in scores()
    for (int kk = 0; kk < kBN; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, p_w + kk, kPPitch<T>);
#pragma unroll
      for (int c = 0; c < kFrags; ++c) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, v_s + kk * kP + c * 16, kP);
        wmma::mma_sync(o[c], a, b, o[c]);
      }
    }
  }

  // Writes the warp's rows r < rows_left of O to out_w (row pitch D), through s_w in chunks of up
  // to 4 fragments (16 x 64 floats, which fit in the 16 x kSPitch scratch).
  __device__ void store(T* out_w, float* s_w, int64_t rows_left, int lane) const {
    constexpr int kChunk = kFrags < 4 ? kFrags : 4;
    constexpr int kCols = 16 * kChunk;
#pragma unroll
    for (int f0 = 0; f0 < kFrags; f0 += kChunk) {
#pragma unroll
      for (int f = 0; f < kChunk; ++f) {
        wmma::store_matrix_sync(s_w + f * 16, o[f0 + f], kSPitch, wmma::mem_row_major);
      }
      __syncwarp();
      for (int idx = lane; idx < 16 * kCols; idx += 32) {
        const int r = idx / kCols;
        const int c = idx % kCols;
        if (r < rows_left) out_w[r * D + f0 * 16 + c] = from_f32<T>(s_w[r * kSPitch + c]);
      }
      __syncwarp();  // s_w is overwritten by the next chunk
    }
  }
};

// float32 with fp32 FMAs. Lane (tr, tc) = (lane / 8, lane % 8) owns rows tr + 4 a (a < 4) of the
// warp and, for S, keys tc + 8 b (b < 8); for O, columns tc + 8 b (b < D / 8).
template <int D>
struct FmaEngine {
  static constexpr int kCols = D / 8;
  float o[4][kCols];

  __device__ void init(float*, int) {
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < kCols; ++b) o[a][b] = 0.0f;
    }
  }

  __device__ void scores(const float* q_w, const float* k_s, float* s_w, int lane) const {
    constexpr int kP = kPitch<float, D>;
    const int tr = lane / 8;
    const int tc = lane % 8;
    float s[4][8];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 8; ++b) s[a][b] = 0.0f;
    }
#pragma unroll 2
    for (int d = 0; d < D; d += 4) {
      float4 qa[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) qa[a] = *reinterpret_cast<const float4*>(q_w + (tr + 4 * a) * kP + d);
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const float4 kb = *reinterpret_cast<const float4*>(k_s + (tc + 8 * b) * kP + d);
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          s[a][b] = fmaf(qa[a].x, kb.x, s[a][b]);
          s[a][b] = fmaf(qa[a].y, kb.y, s[a][b]);
          s[a][b] = fmaf(qa[a].z, kb.z, s[a][b]);
          s[a][b] = fmaf(qa[a].w, kb.w, s[a][b]);
        }
      }
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 8; ++b) s_w[(tr + 4 * a) * kSPitch + tc + 8 * b] = s[a][b];
    }
  }

  __device__ void rescale(const float* factor_w, int lane) {
    const int tr = lane / 8;
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const float f = factor_w[tr + 4 * a];
#pragma unroll
      for (int b = 0; b < kCols; ++b) o[a][b] *= f;
    }
  }

  __device__ void accumulate(const float* p_w, const float* v_s, int lane) {
    constexpr int kP = kPitch<float, D>;
    const int tr = lane / 8;
    const int tc = lane % 8;
#pragma unroll 1
    for (int kk = 0; kk < kBN; kk += 4) {
      float4 pa[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        pa[a] = *reinterpret_cast<const float4*>(p_w + (tr + 4 * a) * kPPitch<float> + kk);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float* v_row = v_s + (kk + e) * kP + tc;
#pragma unroll
        for (int b = 0; b < kCols; ++b) {
          const float vb = v_row[8 * b];
#pragma unroll
          for (int a = 0; a < 4; ++a) {
            const float pe = e == 0 ? pa[a].x : e == 1 ? pa[a].y : e == 2 ? pa[a].z : pa[a].w;
            o[a][b] = fmaf(pe, vb, o[a][b]);
          }
        }
      }
    }
  }

  __device__ void store(float* out_w, float*, int64_t rows_left, int lane) const {
    const int tr = lane / 8;
    const int tc = lane % 8;
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int r = tr + 4 * a;
      if (r >= rows_left) continue;
#pragma unroll
      for (int b = 0; b < kCols; ++b) out_w[r * D + tc + 8 * b] = o[a][b];
    }
  }
};

template <typename T, int D>
struct EngineFor {
  using type = WmmaEngine<T, D>;
};
template <int D>
struct EngineFor<float, D> {
  using type = FmaEngine<D>;
};

// ---- Online softmax, one row per pair of lanes. ----

struct RowState {
  float m;  // running max of the visible scores (-inf while none)
  float l;  // running sum of exp(S - lse_reference(m))
};

// Folds one key tile into row `row` of the block. The row's two lanes (side = 0, 1) read columns
// 4 i + 2 side + {0, 1}; keys c > c_max (past Lk or hidden by causality) and keys the ranks hide
// are masked. Overwrites the row's scores with P (pitch kPPitch<T>) and, from lane side == 0,
// writes the factor that rescales the row's running output. Every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ void softmax_tile(RowState& st, float* s_row, const float* bias_s,
                                             const double* key_rank_s, bool use_rank,
                                             double query_rank, int c_max, float scale,
                                             float* corr_row, int side) {
  float z[kBN / 2];
  float tile_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kBN / 4; ++i) {
    const int c = 4 * i + 2 * side;
    const float2 s2 = *reinterpret_cast<const float2*>(s_row + c);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const bool visible = c + e <= c_max && (!use_rank || key_rank_s[c + e] <= query_rank);
      const float dot = e == 0 ? s2.x : s2.y;
      z[2 * i + e] = visible ? fmaf(scale, dot, bias_s[c + e]) : -INFINITY;
      tile_max = fmaxf(tile_max, z[2 * i + e]);  // fmaxf skips NaN; the sum below carries it
    }
  }
  tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
  const float m_new = fmaxf(st.m, tile_max);
  const float ref = lse_reference(m_new);
  // While m is -inf, l and the row's output are 0: any finite factor works, 0 avoids overflow.
  const float corr = st.m == m_new ? 1.0f
                     : st.m == -INFINITY ? 0.0f
                                         : softmax_exp<T>(lse_reference(st.m) - ref);
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) {
    z[i] = softmax_exp<T>(z[i] - ref);  // ref is finite: exp(-inf) = 0 for masked keys
    sum += z[i];
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  st.l = st.l * corr + sum;
  st.m = m_new;
  __syncwarp();  // every lane has read its scores before P overwrites them
  T* p_row = reinterpret_cast<T*>(s_row);
#pragma unroll
  for (int i = 0; i < kBN / 4; ++i) store_pair(p_row + 4 * i + 2 * side, z[2 * i], z[2 * i + 1]);
  if (side == 0) *corr_row = corr;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) reward_attention_fwd_kernel(const Params<T> p) {
  using L = SmemLayout<T, D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem + L::kQ);
  T* k_s = reinterpret_cast<T*>(smem + L::kK);
  T* v_s = reinterpret_cast<T*>(smem + L::kV);
  float* s_s = reinterpret_cast<float*>(smem + L::kS);
  float* bias_s = reinterpret_cast<float*>(smem + L::kBias);
  float* corr_s = reinterpret_cast<float*>(smem + L::kCorr);
  double* key_rank_s = reinterpret_cast<double*>(smem + L::kKeyRank);
  double* query_rank_s = reinterpret_cast<double*>(smem + L::kQueryRank);

  // Query tiles run last to first, so that under causality the longest blocks start first.
  const int64_t block = static_cast<int64_t>(blockIdx.x);
  const int64_t q0 = (p.n_qtiles - 1 - block % p.n_qtiles) * kBM;
  const int64_t bh = block / p.n_qtiles;
  const int64_t b = bh / p.heads_q;
  const int64_t h = bh % p.heads_q;
  const int64_t kv_head = b * p.heads_kv + h / p.group;
  const int64_t len_q = p.len_q;
  const int64_t len_k = p.len_k;
  const T* k_head = p.k + kv_head * len_k * D;
  const T* v_head = p.v + kv_head * len_k * D;
  const float* bias_row =
      p.key_bias == nullptr ? nullptr
                            : p.key_bias + (b * p.bias_heads + (p.bias_heads == 1 ? 0 : h)) * len_k;
  const bool use_rank = p.key_rank != nullptr;
  const double* key_rank_row = use_rank ? p.key_rank + b * len_k : nullptr;
  const bool vec16 = p.vec16 != 0;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int r0 = tid / 32 * kWarpRows;  // the warp's first row in the tile
  const int row = r0 + lane / 2;        // softmax role: this lane's row and half of the columns
  const int side = lane % 2;
  const int64_t q_row = q0 + row;
  float* s_w = s_s + r0 * kSPitch;
  const T* p_w = reinterpret_cast<const T*>(s_w);

  stage_rows<T, D, kBM>(q_s, p.q + (bh * len_q + q0) * D, len_q - q0, vec16);
  if (tid < kBM) {
    query_rank_s[tid] = use_rank && q0 + tid < len_q ? p.query_rank[b * len_q + q0 + tid] : 0.0;
  }

  // The last key causality shows to this row, and the end of the keys shown to any row of the
  // block (a row past len_q never raises it: it is not written).
  const int64_t shift = len_k - len_q;
  const int64_t row_last_key = p.causal && q_row + shift < len_k ? q_row + shift : len_k - 1;
  const int64_t block_last_row = (q0 + kBM < len_q ? q0 + kBM : len_q) - 1;
  const int64_t k_end =
      p.causal && block_last_row + shift + 1 < len_k ? block_last_row + shift + 1 : len_k;

  typename EngineFor<T, D>::type engine;
  engine.init(s_w, lane);
  RowState st{-INFINITY, 0.0f};

  for (int64_t k0 = 0; k0 < k_end; k0 += kBN) {
    __syncthreads();  // every warp is done with the previous K, V, bias and ranks
    stage_rows<T, D, kBN>(k_s, k_head + k0 * D, len_k - k0, vec16);
    stage_rows<T, D, kBN>(v_s, v_head + k0 * D, len_k - k0, vec16);
    if (tid < kBN) {
      bias_s[tid] = bias_row != nullptr && k0 + tid < len_k ? bias_row[k0 + tid] : 0.0f;
    } else {
      const int j = tid - kBN;
      key_rank_s[j] = use_rank && k0 + j < len_k ? key_rank_row[k0 + j] : 0.0;
    }
    __syncthreads();

    engine.scores(q_s + r0 * kPitch<T, D>, k_s, s_w, lane);
    __syncwarp();
    const int64_t last = row_last_key - k0;
    const int c_max = static_cast<int>(last < -1 ? -1 : last > kBN - 1 ? kBN - 1 : last);
    softmax_tile<T>(st, s_s + row * kSPitch, bias_s, key_rank_s, use_rank, query_rank_s[row], c_max,
                    p.scale, corr_s + row, side);
    __syncwarp();
    engine.rescale(corr_s + r0, lane);
    engine.accumulate(p_w, v_s, lane);
  }

  __syncwarp();  // the warp is done reading corr_s and its rows of s_s
  if (side == 0) {
    corr_s[row] = st.l == 0.0f ? 0.0f : 1.0f / st.l;
    if (q_row < len_q) {
      p.lse[bh * len_q + q_row] = st.l == 0.0f ? -INFINITY : lse_reference(st.m) + logf(st.l);
    }
  }
  __syncwarp();
  engine.rescale(corr_s + r0, lane);
  engine.store(p.out + (bh * len_q + q0 + r0) * D, s_w, len_q - q0 - r0, lane);
}

inline bool is_aligned16(uintptr_t address) { return address % 16 == 0; }

template <typename T, int D>
void launch_forward(const Params<T>& params, int64_t n_blocks, cudaStream_t stream) {
  auto kernel = reward_attention_fwd_kernel<T, D>;
  constexpr size_t smem = SmemLayout<T, D>::kBytes;
  if (smem > 48 * 1024) {
    ALIGNKERN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(n_blocks), kThreads, smem, stream>>>(params);
  ALIGNKERN_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void launch_for_head_dim(const Params<T>& params, int64_t head_dim, int64_t n_blocks,
                         cudaStream_t stream) {
  switch (head_dim) {
    case 16: launch_forward<T, 16>(params, n_blocks, stream); break;
    case 32: launch_forward<T, 32>(params, n_blocks, stream); break;
    case 64: launch_forward<T, 64>(params, n_blocks, stream); break;
    case 128: launch_forward<T, 128>(params, n_blocks, stream); break;
    default: break;  // refused by the caller
  }
}

}  // namespace

void reward_attention_fwd_cuda(uintptr_t q, uintptr_t k, uintptr_t v, int dtype, int64_t batch,
                               int64_t heads_q, int64_t heads_kv, int64_t len_q, int64_t len_k,
                               int64_t head_dim, uintptr_t key_bias, int64_t bias_heads,
                               uintptr_t key_rank, uintptr_t query_rank, int causal, double scale,
                               uintptr_t out, uintptr_t lse, uintptr_t stream) {
  check_reward_attention_args(dtype, batch, heads_q, heads_kv, len_q, len_k, head_dim, key_bias,
                              bias_heads, key_rank, query_rank);
  const DType type = to_dtype(dtype);
  check_arg(type != DType::Float64,
            "reward_attention: the cuda kernel takes float32, float16 or bfloat16 (dtype codes "
            "0-2), got dtype code " + std::to_string(dtype));
  check_arg(head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128,
            "reward_attention: the cuda kernel supports head_dim 16, 32, 64 or 128, got " +
                std::to_string(head_dim));
  // Nothing to write. (len_k == 0 with len_q > 0 still launches: every row is empty, out = 0 and
  // lse = -inf must be written.)
  if (batch == 0 || len_q == 0) return;

  const int64_t n_qtiles = (len_q + kBM - 1) / kBM;
  check_arg(batch * heads_q <= 2147483647 / n_qtiles,
            "reward_attention: too many (batch, head, query tile) blocks for one CUDA grid");
  const int64_t n_blocks = n_qtiles * batch * heads_q;
  const bool vec16 = is_aligned16(q) && is_aligned16(k) && is_aligned16(v);
  const cudaStream_t cuda_stream = reinterpret_cast<cudaStream_t>(stream);

  auto launch = [&](auto tag) {
    using T = decltype(tag);
    Params<T> params;
    params.q = as_ptr<const T>(q);
    params.k = as_ptr<const T>(k);
    params.v = as_ptr<const T>(v);
    params.key_bias = key_bias == 0 ? nullptr : as_ptr<const float>(key_bias);
    params.key_rank = key_rank == 0 ? nullptr : as_ptr<const double>(key_rank);
    params.query_rank = query_rank == 0 ? nullptr : as_ptr<const double>(query_rank);
    params.out = as_ptr<T>(out);
    params.lse = as_ptr<float>(lse);
    params.heads_q = heads_q;
    params.heads_kv = heads_kv;
    params.group = heads_q / heads_kv;
    params.len_q = len_q;
    params.len_k = len_k;
    params.bias_heads = key_bias == 0 ? 1 : bias_heads;
    params.n_qtiles = n_qtiles;
    params.scale = static_cast<float>(scale);
    params.causal = causal != 0 ? 1 : 0;
    params.vec16 = vec16 ? 1 : 0;
    launch_for_head_dim<T>(params, head_dim, n_blocks, cuda_stream);
  };
  switch (type) {
    case DType::Float32: launch(float{}); break;
    case DType::Float16: launch(__half{}); break;
    case DType::BFloat16: launch(__nv_bfloat16{}); break;
    case DType::Float64: break;  // refused above
  }
}

}  // namespace alignkern
