// reward_attention on the CPU, FlashAttention-2 style: no (len_q, len_k) matrix is ever stored,
// only 64 x 64 tiles of scores per thread.
//
//   S_ij = scale * <q_i, k_j> + bias_j on the visible keys, P = softmax_j(S), out = P V,
//   lse_i = log sum_j exp(S_ij); a query with no visible key gets out = 0, lse = -inf.
//
// Forward: one task per (batch, query head, block of 64 queries). It walks the key blocks (blocks
// that causality or the ranks hide from the whole query block are skipped) and keeps an online
// softmax: running max m, sum l and output O (64 x D) per query. Scores are computed transposed,
// S^T = K_block Q_block^T (keys in rows, queries in columns), so the reductions over keys are
// vertical vector operations, Q^T is built once per task and K, V are only converted, never
// transposed (float32 rows with head_dim a multiple of 16 are used in place), in the inner loop.
//
// Backward (deterministic, and independent of the number of threads: every output element has
// one owner task and a fixed summation order):
//   delta_i = <dO_i, O_i> - grad_lse_i        (one pass over the rows, kept in a (B, Hq, Lq) buffer)
//   P_ij = exp(S_ij - lse_i), dS_ij = P_ij (<dO_i, v_j> - delta_i) on visible entries, 0 elsewhere
//   dq task per (batch, query head, query block): recomputes S^T and dP^T per key block and sums
//       dq += dS K over the key blocks;
//   dk/dv task per (batch, kv head, key block): for every query head of the group and every query
//       block, recomputes S and dP (queries in rows; K^T and V^T built once per task) and sums
//       dv += P^T dO, dk += dS^T Q and the bias gradient (column sums of dS, per query head).
// That computes the scores twice (7 tile products per pair of tiles instead of FlashAttention's
// 5) in exchange for no atomics and no per-thread copies of dk and dv.
//
// All tile products go through one register-blocked kernel C (+)= A B, with A read one element at
// a time through (row, k) strides (so a transposed tile is read in place) and B, C read in rows of
// SIMD vectors. Ranks are compared as integers: per batch row the float64 ranks are replaced by
// their index among the sorted distinct values, which keeps ties and order and lets the masks run
// in the same vector lanes as the scores.
//
// Instruction sets: the kernels (the second half of this file) are compiled once per x86 level
// (AVX-512, AVX2, baseline) by including this file into itself under `#pragma GCC target`, and the
// entry points pick one at run time. target_clones is not enough here: helpers that build or
// return vectors are compiled for the default target before they are inlined into a clone, and
// GCC then assembles each broadcast lane by lane.
#ifndef ALIGNKERN_RA_ISA

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "common.h"
#include "reward_attention.h"

namespace alignkern {
namespace reward_attention_cpu {

constexpr int64_t kBlock = 64;  // queries per query block and keys per key block

constexpr int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Integer lanes as wide as Acc, for masks and ranks.
template <typename Acc>
using RankOf = std::conditional_t<std::is_same_v<Acc, double>, int64_t, int32_t>;

template <typename T>
struct Problem {
  using Acc = typename Storage<T>::Acc;
  const T* q;
  const T* k;
  const T* v;
  const Acc* key_bias;      // nullptr: none
  const int32_t* key_rank;  // ranks as indices among the distinct values (map_ranks); nullptr: none
  const int32_t* query_rank;
  int64_t batch, heads_q, heads_kv, len_q, len_k, head_dim, bias_heads;
  bool causal;
  Acc scale;

  int64_t group() const { return heads_q / heads_kv; }
  // Row length of the tiles that hold head_dim columns: a whole number of 64-byte vectors.
  int64_t padded_dim() const { return round_up(head_dim, 64 / sizeof(Acc)); }
  // Keys j <= i + offset are causally visible to query i.
  int64_t offset() const { return len_k - len_q; }
  const Acc* bias_row(int64_t b, int64_t h) const {
    if (key_bias == nullptr) return nullptr;
    return key_bias + (b * bias_heads + (bias_heads == 1 ? 0 : h)) * len_k;
  }
};

template <typename T>
struct Gradients {
  using Acc = typename Storage<T>::Acc;
  const T* grad_out;
  const Acc* lse;
  const Acc* delta;  // <dO_i, O_i> - grad_lse_i
  T* grad_q;
  T* grad_k;
  T* grad_v;
  Acc* grad_bias;  // nullptr: not needed
};

// Buffers of one thread, carved from one 64-byte aligned allocation. Which tile lives where
// depends on the task; each task names them.
template <typename Acc>
struct Workspace {
  using Rank = RankOf<Acc>;
  Acc* transposed[2];  // head_dim x kBlock
  Acc* rows[2];        // kBlock x padded_dim
  Acc* tiles[2];       // kBlock x kBlock
  Acc* accum[2];       // kBlock x padded_dim
  Acc* lanes[3];       // kBlock
  Rank* ranks;         // kBlock

  Workspace(int64_t head_dim, int64_t padded_dim) {
    const int64_t bytes = sizeof(Acc);
    const int64_t transposed_bytes = round_up(head_dim * kBlock * bytes, 64);
    const int64_t rows_bytes = round_up(kBlock * padded_dim * bytes, 64);
    const int64_t tile_bytes = round_up(kBlock * kBlock * bytes, 64);
    const int64_t lane_bytes = round_up(kBlock * std::max<int64_t>(bytes, sizeof(Rank)), 64);
    const int64_t total = 2 * transposed_bytes + 4 * rows_bytes + 2 * tile_bytes + 4 * lane_bytes;
    memory_.reset(static_cast<unsigned char*>(std::aligned_alloc(64, total)));
    if (!memory_) throw std::bad_alloc();
    unsigned char* cursor = memory_.get();
    auto take = [&cursor](int64_t size) {
      unsigned char* p = cursor;
      cursor += size;
      return p;
    };
    for (Acc*& p : transposed) p = reinterpret_cast<Acc*>(take(transposed_bytes));
    for (Acc*& p : rows) p = reinterpret_cast<Acc*>(take(rows_bytes));
    for (Acc*& p : tiles) p = reinterpret_cast<Acc*>(take(tile_bytes));
    for (Acc*& p : accum) p = reinterpret_cast<Acc*>(take(rows_bytes));
    for (Acc*& p : lanes) p = reinterpret_cast<Acc*>(take(lane_bytes));
    ranks = reinterpret_cast<Rank*>(take(lane_bytes));
  }

 private:
  struct Free {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, Free> memory_;
};

enum class Visibility { kNone, kPartial, kAll };

struct RankRange {
  int32_t min = 0, max = 0;
};

inline RankRange rank_range(const int32_t* ranks, int64_t n) {
  RankRange range{ranks[0], ranks[0]};
  for (int64_t i = 1; i < n; ++i) {
    range.min = std::min(range.min, ranks[i]);
    range.max = std::max(range.max, ranks[i]);
  }
  return range;
}

// Which of the keys [j0, j0 + nk) the queries [i0, i0 + nq) see, as a whole.
template <typename T>
Visibility tile_visibility(const Problem<T>& p, int64_t i0, int64_t nq, int64_t j0, int64_t nk,
                           const RankRange& queries, const RankRange& keys) {
  bool all = true;
  if (p.causal) {
    if (j0 > i0 + nq - 1 + p.offset()) return Visibility::kNone;
    all = j0 + nk - 1 <= i0 + p.offset();
  }
  if (p.key_rank != nullptr) {
    if (keys.min > queries.max) return Visibility::kNone;
    all = all && keys.max <= queries.min;
  }
  return all ? Visibility::kAll : Visibility::kPartial;
}

}  // namespace reward_attention_cpu
}  // namespace alignkern

// The kernels, once per instruction set (see the top of the file).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ALIGNKERN_RA_X86_LEVELS 1

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define ALIGNKERN_RA_ISA avx512
#define ALIGNKERN_RA_FMA 1
#define ALIGNKERN_RA_VECTOR_BYTES 64
#define ALIGNKERN_RA_KERNEL_ROWS 4     // 4 x 4 accumulators of the 32 registers
#define ALIGNKERN_RA_KERNEL_VECTORS 4
#include "reward_attention.cpp"
#undef ALIGNKERN_RA_ISA
#undef ALIGNKERN_RA_FMA
#undef ALIGNKERN_RA_VECTOR_BYTES
#undef ALIGNKERN_RA_KERNEL_ROWS
#undef ALIGNKERN_RA_KERNEL_VECTORS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define ALIGNKERN_RA_ISA avx2
#define ALIGNKERN_RA_FMA 1
#define ALIGNKERN_RA_VECTOR_BYTES 32
#define ALIGNKERN_RA_KERNEL_ROWS 6     // 6 x 2 accumulators of the 16 registers
#define ALIGNKERN_RA_KERNEL_VECTORS 2
#include "reward_attention.cpp"
#undef ALIGNKERN_RA_ISA
#undef ALIGNKERN_RA_FMA
#undef ALIGNKERN_RA_VECTOR_BYTES
#undef ALIGNKERN_RA_KERNEL_ROWS
#undef ALIGNKERN_RA_KERNEL_VECTORS
#pragma GCC pop_options
#endif

#define ALIGNKERN_RA_ISA baseline
#define ALIGNKERN_RA_FMA 0
#define ALIGNKERN_RA_VECTOR_BYTES 16
#define ALIGNKERN_RA_KERNEL_ROWS 4
#define ALIGNKERN_RA_KERNEL_VECTORS 2
#include "reward_attention.cpp"
#undef ALIGNKERN_RA_ISA
#undef ALIGNKERN_RA_FMA
#undef ALIGNKERN_RA_VECTOR_BYTES
#undef ALIGNKERN_RA_KERNEL_ROWS
#undef ALIGNKERN_RA_KERNEL_VECTORS

namespace alignkern {
namespace reward_attention_cpu {
namespace {

// The kernels of the best instruction set this CPU has.
template <typename T>
struct Kernels {
  using Acc = typename Storage<T>::Acc;
  void (*forward_block)(const Problem<T>&, int64_t, int64_t, int64_t, Workspace<Acc>&, T*, Acc*);
  void (*backward_dq_block)(const Problem<T>&, const Gradients<T>&, int64_t, int64_t, int64_t,
                            Workspace<Acc>&);
  void (*backward_dkv_block)(const Problem<T>&, const Gradients<T>&, int64_t, int64_t, int64_t,
                             Workspace<Acc>&);
  void (*compute_delta)(const T*, const T*, const Acc*, int64_t, int64_t, int64_t, Acc*);
};

template <typename T>
Kernels<T> kernels() {
#ifdef ALIGNKERN_RA_X86_LEVELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) {
    return {avx512::forward_block<T>, avx512::backward_dq_block<T>, avx512::backward_dkv_block<T>,
            avx512::compute_delta<T>};
  }
  if (__builtin_cpu_supports("x86-64-v3")) {
    return {avx2::forward_block<T>, avx2::backward_dq_block<T>, avx2::backward_dkv_block<T>,
            avx2::compute_delta<T>};
  }
#endif
  return {baseline::forward_block<T>, baseline::backward_dq_block<T>,
          baseline::backward_dkv_block<T>, baseline::compute_delta<T>};
}

template <typename Acc>
std::vector<Workspace<Acc>> make_workspaces(int64_t head_dim, int64_t padded_dim) {
  std::vector<Workspace<Acc>> workspaces;
  const int threads = omp_get_max_threads();
  workspaces.reserve(threads);
  for (int t = 0; t < threads; ++t) workspaces.emplace_back(head_dim, padded_dim);
  return workspaces;
}

// Replaces every rank by its index among the sorted distinct values of its batch row (keys and
// queries together), so integer comparisons give the float64 ones. A NaN rank compares false with
// everything: a NaN key gets INT32_MAX (seen by nobody), a NaN query INT32_MIN (sees nothing).
void map_ranks(const double* key_rank, const double* query_rank, int64_t batch, int64_t len_q,
               int64_t len_k, int32_t* key_out, int32_t* query_out) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    const double* keys = key_rank + b * len_k;
    const double* queries = query_rank + b * len_q;
    std::vector<double> values;
    values.reserve(len_q + len_k);
    for (int64_t j = 0; j < len_k; ++j) {
      if (!std::isnan(keys[j])) values.push_back(keys[j]);
    }
    for (int64_t i = 0; i < len_q; ++i) {
      if (!std::isnan(queries[i])) values.push_back(queries[i]);
    }
    std::sort(values.begin(), values.end());
    values.erase(std::unique(values.begin(), values.end()), values.end());
    auto index = [&values](double x) {
      return static_cast<int32_t>(std::lower_bound(values.begin(), values.end(), x) -
                                  values.begin());
    };
    for (int64_t j = 0; j < len_k; ++j) {
      key_out[b * len_k + j] =
          std::isnan(keys[j]) ? std::numeric_limits<int32_t>::max() : index(keys[j]);
    }
    for (int64_t i = 0; i < len_q; ++i) {
      query_out[b * len_q + i] =
          std::isnan(queries[i]) ? std::numeric_limits<int32_t>::min() : index(queries[i]);
    }
  }
}

// The integer ranks of one call (empty without ranks).
struct MappedRanks {
  std::vector<int32_t> keys, queries;
  MappedRanks(uintptr_t key_rank, uintptr_t query_rank, int64_t batch, int64_t len_q,
              int64_t len_k) {
    if (key_rank == 0) return;
    check_arg(len_q + len_k < std::numeric_limits<int32_t>::max(),
              "reward_attention: sequences too long for rank masks");
    keys.resize(batch * len_k);
    queries.resize(batch * len_q);
    map_ranks(as_ptr<const double>(key_rank), as_ptr<const double>(query_rank), batch, len_q,
              len_k, keys.data(), queries.data());
  }
};

template <typename T>
Problem<T> make_problem(uintptr_t q, uintptr_t k, uintptr_t v, int64_t batch, int64_t heads_q,
                        int64_t heads_kv, int64_t len_q, int64_t len_k, int64_t head_dim,
                        uintptr_t key_bias, int64_t bias_heads, const MappedRanks* ranks,
                        int causal, double scale) {
  using Acc = typename Storage<T>::Acc;
  Problem<T> p;
  p.q = as_ptr<const T>(q);
  p.k = as_ptr<const T>(k);
  p.v = as_ptr<const T>(v);
  p.key_bias = key_bias == 0 ? nullptr : as_ptr<const Acc>(key_bias);
  p.key_rank = ranks == nullptr ? nullptr : ranks->keys.data();
  p.query_rank = ranks == nullptr ? nullptr : ranks->queries.data();
  p.batch = batch;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.len_q = len_q;
  p.len_k = len_k;
  p.head_dim = head_dim;
  p.bias_heads = bias_heads;
  p.causal = causal != 0;
  p.scale = static_cast<Acc>(scale);
  return p;
}

template <typename T>
void forward(const Problem<T>& p, T* out, typename Storage<T>::Acc* lse) {
  using Acc = typename Storage<T>::Acc;
  const Kernels<T> run = kernels<T>();
  const int64_t query_blocks = (p.len_q + kBlock - 1) / kBlock;
  const int64_t tasks = p.batch * p.heads_q * query_blocks;
  std::vector<Workspace<Acc>> workspaces = make_workspaces<Acc>(p.head_dim, p.padded_dim());
#pragma omp parallel
  {
    Workspace<Acc>& ws = workspaces[omp_get_thread_num()];
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t bh = t / query_blocks;
      run.forward_block(p, bh / p.heads_q, bh % p.heads_q, (t % query_blocks) * kBlock, ws, out,
                        lse);
    }
  }
}

template <typename T>
void backward(const Problem<T>& p, Gradients<T> g, const T* out,
              const typename Storage<T>::Acc* grad_lse) {
  using Acc = typename Storage<T>::Acc;
  const Kernels<T> run = kernels<T>();
  const int64_t rows = p.batch * p.heads_q * p.len_q;
  std::vector<Acc> delta(rows);
  constexpr int64_t kRowsPerTask = 256;
#pragma omp parallel for schedule(static)
  for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerTask) {
    run.compute_delta(g.grad_out, out, grad_lse, r0, std::min(rows, r0 + kRowsPerTask),
                      p.head_dim, delta.data());
  }
  g.delta = delta.data();

  const int64_t query_blocks = (p.len_q + kBlock - 1) / kBlock;
  const int64_t key_blocks = (p.len_k + kBlock - 1) / kBlock;
  const int64_t kv_tasks = p.batch * p.heads_kv * key_blocks;  // the larger tasks go first
  const int64_t tasks = kv_tasks + p.batch * p.heads_q * query_blocks;
  std::vector<Workspace<Acc>> workspaces = make_workspaces<Acc>(p.head_dim, p.padded_dim());
#pragma omp parallel
  {
    Workspace<Acc>& ws = workspaces[omp_get_thread_num()];
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) {
      if (t < kv_tasks) {
        const int64_t bh = t / key_blocks;
        run.backward_dkv_block(p, g, bh / p.heads_kv, bh % p.heads_kv, (t % key_blocks) * kBlock,
                               ws);
      } else {
        const int64_t u = t - kv_tasks;
        const int64_t bh = u / query_blocks;
        run.backward_dq_block(p, g, bh / p.heads_q, bh % p.heads_q, (u % query_blocks) * kBlock,
                              ws);
      }
    }
  }
}

}  // namespace
}  // namespace reward_attention_cpu

void reward_attention_fwd_cpu(uintptr_t q, uintptr_t k, uintptr_t v, int dtype, int64_t batch,
                              int64_t heads_q, int64_t heads_kv, int64_t len_q, int64_t len_k,
                              int64_t head_dim, uintptr_t key_bias, int64_t bias_heads,
                              uintptr_t key_rank, uintptr_t query_rank, int causal, double scale,
                              uintptr_t out, uintptr_t lse) {
  namespace ra = reward_attention_cpu;
  check_reward_attention_args(dtype, batch, heads_q, heads_kv, len_q, len_k, head_dim, key_bias,
                              bias_heads, key_rank, query_rank);
  if (batch == 0 || len_q == 0) return;
  const ra::MappedRanks ranks(key_rank, query_rank, batch, len_q, len_k);
  dispatch_dtype(to_dtype(dtype), [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Storage<T>::Acc;
    const ra::Problem<T> p =
        ra::make_problem<T>(q, k, v, batch, heads_q, heads_kv, len_q, len_k, head_dim, key_bias,
                            bias_heads, key_rank != 0 ? &ranks : nullptr, causal, scale);
    ra::forward<T>(p, as_ptr<T>(out), as_ptr<Acc>(lse));
  });
}

void reward_attention_bwd_cpu(uintptr_t grad_out, uintptr_t grad_lse, uintptr_t q, uintptr_t k,
                              uintptr_t v, int dtype, int64_t batch, int64_t heads_q,
                              int64_t heads_kv, int64_t len_q, int64_t len_k, int64_t head_dim,
                              uintptr_t key_bias, int64_t bias_heads, uintptr_t key_rank,
                              uintptr_t query_rank, int causal, double scale, uintptr_t out,
                              uintptr_t lse, uintptr_t grad_q, uintptr_t grad_k, uintptr_t grad_v,
                              uintptr_t grad_bias) {
  namespace ra = reward_attention_cpu;
  check_reward_attention_args(dtype, batch, heads_q, heads_kv, len_q, len_k, head_dim, key_bias,
                              bias_heads, key_rank, query_rank);
  // With len_q == 0 the key gradients are still written (zeros); with len_k == 0, dq is.
  if (batch == 0 || (len_q == 0 && len_k == 0)) return;
  const ra::MappedRanks ranks(key_rank, query_rank, batch, len_q, len_k);
  dispatch_dtype(to_dtype(dtype), [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Storage<T>::Acc;
    const ra::Problem<T> p =
        ra::make_problem<T>(q, k, v, batch, heads_q, heads_kv, len_q, len_k, head_dim, key_bias,
                            bias_heads, key_rank != 0 ? &ranks : nullptr, causal, scale);
    ra::Gradients<T> g;
    g.grad_out = as_ptr<const T>(grad_out);
    g.lse = as_ptr<const Acc>(lse);
    g.delta = nullptr;
    g.grad_q = as_ptr<T>(grad_q);
    g.grad_k = as_ptr<T>(grad_k);
    g.grad_v = as_ptr<T>(grad_v);
    g.grad_bias = grad_bias == 0 ? nullptr : as_ptr<Acc>(grad_bias);
    ra::backward<T>(p, g, as_ptr<const T>(out),
                    grad_lse == 0 ? nullptr : as_ptr<const Acc>(grad_lse));
  });
}

}  // namespace alignkern

#else  // ALIGNKERN_RA_ISA: the kernels for one instruction set ----------------------------------

namespace alignkern {
namespace reward_attention_cpu {
namespace ALIGNKERN_RA_ISA {

#define ALIGNKERN_INLINE inline __attribute__((always_inline))

constexpr bool kHasFma = ALIGNKERN_RA_FMA;  // a * b + c is one fused operation here
constexpr int kRowsPerKernel = ALIGNKERN_RA_KERNEL_ROWS;
constexpr int kVectorsPerKernel = ALIGNKERN_RA_KERNEL_VECTORS;

// One SIMD register of the accumulation type, and of integers as wide (masks, ranks).
template <typename Acc>
struct Simd {
  typedef Acc V __attribute__((vector_size(ALIGNKERN_RA_VECTOR_BYTES)));
  typedef RankOf<Acc> I __attribute__((vector_size(ALIGNKERN_RA_VECTOR_BYTES)));
  static constexpr int kLanes = ALIGNKERN_RA_VECTOR_BYTES / sizeof(Acc);
  static_assert(kBlock % kLanes == 0, "tiles must be whole vectors");
};

template <typename Acc>
using VecOf = typename Simd<Acc>::V;
template <typename Acc>
using MaskOf = typename Simd<Acc>::I;

template <typename Acc>
ALIGNKERN_INLINE VecOf<Acc> splat(Acc x) {
  return x - VecOf<Acc>{};  // x - 0 is x for every x (unlike x + 0 for -0): a plain broadcast
}

template <typename Acc>
ALIGNKERN_INLINE VecOf<Acc> load_vec(const Acc* p) {
  VecOf<Acc> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename Acc>
ALIGNKERN_INLINE void store_vec(Acc* p, VecOf<Acc> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename Acc>
ALIGNKERN_INLINE MaskOf<Acc> load_ranks(const RankOf<Acc>* p) {
  MaskOf<Acc> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename Acc>
ALIGNKERN_INLINE VecOf<Acc> select(MaskOf<Acc> mask, VecOf<Acc> yes, VecOf<Acc> no) {
  return mask ? yes : no;
}

template <typename Acc>
ALIGNKERN_INLINE VecOf<Acc> vmax(VecOf<Acc> a, VecOf<Acc> b) {
  return a > b ? a : b;  // NaN loses; callers catch it in the sums
}

// exp(x) to ~1 ulp (Cephes' expf polynomial), vectorised; libm's expf is not without -ffast-math,
// which would break NaN propagation. 0 below -87.3 (negligible next to the probabilities this
// feeds), +inf above 88, NaN stays NaN.
ALIGNKERN_INLINE VecOf<float> vexp(VecOf<float> x) {
  using V = VecOf<float>;
  using I = MaskOf<float>;
  V clamped = x < splat(-87.3f) ? splat(-87.3f) : x;
  clamped = clamped > splat(88.0f) ? splat(88.0f) : clamped;
  const V fx = clamped * splat(1.44269504088896341f) + splat(0.5f);
  const V truncated = __builtin_convertvector(__builtin_convertvector(fx, I), V);
  const V n = truncated > fx ? truncated - splat(1.0f) : truncated;  // floor(fx)
  const V r = clamped - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  V p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  const V poly = p * r * r + r + splat(1.0f);
  const I exponent_bits = (__builtin_convertvector(n, I) + 127) << 23;
  V y = poly * (V)exponent_bits;  // a vector cast reinterprets the bits
  y = x < splat(-87.3f) ? splat(0.0f) : y;
  y = x > splat(88.0f) ? splat(std::numeric_limits<float>::infinity()) : y;
  return y;
}

ALIGNKERN_INLINE VecOf<double> vexp(VecOf<double> x) {
  for (int lane = 0; lane < Simd<double>::kLanes; ++lane) x[lane] = std::exp(x[lane]);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Tile product C (+)= A B. A is M x K with element (r, k) at A[r * a_rs + k * a_ks]; B is K x N and
// C is M x N, row-major with leading dimensions ldb, ldc, and N = n_vecs SIMD vectors. Each step
// of the micro-kernel broadcasts R elements of A against C vectors of B into R x C accumulators.

template <typename Acc, int R, int C>
ALIGNKERN_INLINE void micro_kernel(int64_t K, const Acc* A, int64_t a_rs, int64_t a_ks,
                                   const Acc* B, int64_t ldb, Acc* Cm, int64_t ldc,
                                   bool accumulate) {
  using V = VecOf<Acc>;
  constexpr int W = Simd<Acc>::kLanes;
  V acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = accumulate ? load_vec(Cm + r * ldc + c * W) : V{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const Acc* b_row = B + k * ldb;
    const Acc* a_col = A + k * a_ks;
    V b[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) b[c] = load_vec(b_row + c * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V a = splat(a_col[r * a_rs]);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] += a * b[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) store_vec(Cm + r * ldc + c * W, acc[r][c]);
  }
}

// micro_kernel<Acc, R, C> for the run-time C = vecs (1 <= vecs <= kVectorsPerKernel).
template <typename Acc, int R, int C = kVectorsPerKernel>
ALIGNKERN_INLINE void micro_kernel_vecs(int vecs, int64_t K, const Acc* A, int64_t a_rs,
                                        int64_t a_ks, const Acc* B, int64_t ldb, Acc* Cm,
                                        int64_t ldc, bool accumulate) {
  if constexpr (C > 1) {
    if (vecs < C) {
      micro_kernel_vecs<Acc, R, C - 1>(vecs, K, A, a_rs, a_ks, B, ldb, Cm, ldc, accumulate);
      return;
    }
  }
  micro_kernel<Acc, R, C>(K, A, a_rs, a_ks, B, ldb, Cm, ldc, accumulate);
}

// micro_kernel for the run-time R = rows (1 <= rows <= kRowsPerKernel).
template <typename Acc, int R = kRowsPerKernel>
ALIGNKERN_INLINE void micro_kernel_rows(int rows, int vecs, int64_t K, const Acc* A,
                                        int64_t a_rs, int64_t a_ks, const Acc* B, int64_t ldb,
                                        Acc* Cm, int64_t ldc, bool accumulate) {
  if constexpr (R > 1) {
    if (rows < R) {
      micro_kernel_rows<Acc, R - 1>(rows, vecs, K, A, a_rs, a_ks, B, ldb, Cm, ldc, accumulate);
      return;
    }
  }
  micro_kernel_vecs<Acc, R>(vecs, K, A, a_rs, a_ks, B, ldb, Cm, ldc, accumulate);
}

template <typename Acc>
void tile_product(int64_t M, int64_t n_vecs, int64_t K, const Acc* A, int64_t a_rs, int64_t a_ks,
                  const Acc* B, int64_t ldb, Acc* Cm, int64_t ldc, bool accumulate) {
  constexpr int W = Simd<Acc>::kLanes;
  for (int64_t v0 = 0; v0 < n_vecs; v0 += kVectorsPerKernel) {
    const int vecs = static_cast<int>(std::min<int64_t>(kVectorsPerKernel, n_vecs - v0));
    for (int64_t m0 = 0; m0 < M; m0 += kRowsPerKernel) {
      const int rows = static_cast<int>(std::min<int64_t>(kRowsPerKernel, M - m0));
      micro_kernel_rows<Acc>(rows, vecs, K, A + m0 * a_rs, a_rs, a_ks, B + v0 * W, ldb,
                             Cm + m0 * ldc + v0 * W, ldc, accumulate);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tile loads and stores (converting between the storage type and Acc).

// dst[r * ld + d] = src[r * head_dim + d] for r < n, with columns head_dim..ld zero.
template <typename T, typename Acc>
ALIGNKERN_INLINE void load_rows(const T* src, int64_t n, int64_t head_dim, int64_t ld, Acc* dst) {
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t d = 0; d < head_dim; ++d) {
      dst[r * ld + d] = Storage<T>::load(src[r * head_dim + d]);
    }
    for (int64_t d = head_dim; d < ld; ++d) dst[r * ld + d] = Acc(0);
  }
}

// n rows of src as Acc rows of length ld: src itself when no conversion or padding is needed,
// else a copy in buffer (load_rows).
template <typename T, typename Acc>
ALIGNKERN_INLINE const Acc* rows_as_acc(const T* src, int64_t n, int64_t head_dim, int64_t ld,
                                        Acc* buffer) {
  if constexpr (std::is_same_v<T, Acc>) {
    if (head_dim == ld) return src;
  }
  load_rows(src, n, head_dim, ld, buffer);
  return buffer;
}

// dst[d * kBlock + r] = src[r * head_dim + d] for r < n, with columns n..kBlock zero. Reads the
// source in order; the scattered writes stay in the L1-resident tile.
template <typename T, typename Acc>
ALIGNKERN_INLINE void load_transposed(const T* src, int64_t n, int64_t head_dim, Acc* dst) {
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t d = 0; d < head_dim; ++d) {
      dst[d * kBlock + r] = Storage<T>::load(src[r * head_dim + d]);
    }
  }
  for (int64_t d = 0; d < head_dim; ++d) {
    for (int64_t r = n; r < kBlock; ++r) dst[d * kBlock + r] = Acc(0);
  }
}

// dst[r * head_dim + d] = factor * src[r * ld + d]
template <typename T, typename Acc>
ALIGNKERN_INLINE void store_rows(const Acc* src, int64_t n, int64_t head_dim, int64_t ld,
                                 Acc factor, T* dst) {
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t d = 0; d < head_dim; ++d) {
      dst[r * head_dim + d] = Storage<T>::store(factor * src[r * ld + d]);
    }
  }
}

template <typename Acc>
ALIGNKERN_INLINE void fill(Acc* dst, int64_t n, Acc value) {
  for (int64_t i = 0; i < n; ++i) dst[i] = value;
}

// Copies the ranks of n rows into lanes (the padding is never compared: the bounds mask it).
template <typename Acc>
ALIGNKERN_INLINE void load_rank_lanes(const int32_t* ranks, int64_t n, RankOf<Acc>* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = ranks[i];
  for (int64_t i = n; i < kBlock; ++i) dst[i] = 0;
}

// Visibility of the columns c*W .. c*W+W-1 of one tile row: lo <= column < hi and, with ranks,
// row_rank <= column_rank (the row is a key, the columns queries) or column_rank <= row_rank
// (the row is a query).
template <typename Acc, bool kKeyRows>
ALIGNKERN_INLINE MaskOf<Acc> visible_columns(int64_t c, int64_t lo, int64_t hi,
                                             const RankOf<Acc>* column_ranks,
                                             RankOf<Acc> row_rank) {
  using Rank = RankOf<Acc>;
  constexpr int W = Simd<Acc>::kLanes;
  MaskOf<Acc> lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
  // The bounds relative to the first lane, clamped to [0, W] (same answers, fits any lane type).
  const Rank lo_c = static_cast<Rank>(std::clamp<int64_t>(lo - c * W, 0, W));
  const Rank hi_c = static_cast<Rank>(std::clamp<int64_t>(hi - c * W, 0, W));
  MaskOf<Acc> visible = (lane >= lo_c) & (lane < hi_c);
  if (column_ranks != nullptr) {
    const MaskOf<Acc> ranks = load_ranks<Acc>(column_ranks + c * W);
    visible &= kKeyRows ? (ranks >= row_rank) : (ranks <= row_rank);
  }
  return visible;
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Online-softmax update of one key block for the query columns of the block. st holds
// S^T = K Q^T on entry (nk rows, n_vecs vectors of queries) and P^T = exp(S^T - ref) on exit;
// m, l are the running max and sum per query; alpha receives the factor that rescales O.
// full: every entry is visible, no mask.
template <typename T, typename Acc>
ALIGNKERN_INLINE void softmax_block(const Problem<T>& p, Acc* st, int64_t nk, int64_t n_vecs,
                                    int64_t nq, int64_t j0, int64_t i0, const Acc* bias,
                                    const int32_t* key_ranks, const RankOf<Acc>* query_ranks,
                                    bool full, Acc* m, Acc* l, Acc* alpha) {
  using V = VecOf<Acc>;
  constexpr int W = Simd<Acc>::kLanes;
  constexpr int kMaxVecs = kBlock / W;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  V block_max[kMaxVecs];
  for (int64_t c = 0; c < n_vecs; ++c) block_max[c] = splat(neg_inf);
  for (int64_t j = 0; j < nk; ++j) {
    const V bias_j = splat(bias == nullptr ? Acc(0) : bias[j]);
    const int64_t lo = p.causal ? j0 + j - p.offset() - i0 : 0;  // first query key j is seen by
    const RankOf<Acc> rank_j = key_ranks == nullptr ? 0 : key_ranks[j];
    Acc* row = st + j * kBlock;
    for (int64_t c = 0; c < n_vecs; ++c) {
      V x = splat(p.scale) * load_vec(row + c * W) + bias_j;
      if (!full) {
        x = select<Acc>(visible_columns<Acc, true>(c, lo, nq, query_ranks, rank_j), x,
                        splat(neg_inf));
      }
      store_vec(row + c * W, x);
      block_max[c] = vmax<Acc>(x, block_max[c]);
    }
  }
  V ref[kMaxVecs];
  for (int64_t c = 0; c < n_vecs; ++c) {
    const V m_old = load_vec(m + c * W);
    const V m_new = vmax<Acc>(block_max[c], m_old);
    // The reference point is the max, or 0 while nothing is visible: (-inf) - (-inf) never happens.
    ref[c] = m_new == splat(neg_inf) ? splat(Acc(0)) : m_new;
    store_vec(alpha + c * W, m_old == splat(neg_inf) ? splat(Acc(0)) : vexp(m_old - ref[c]));
    store_vec(m + c * W, m_new);
  }
  V sum[kMaxVecs];
  for (int64_t c = 0; c < n_vecs; ++c) sum[c] = splat(Acc(0));
  for (int64_t j = 0; j < nk; ++j) {
    Acc* row = st + j * kBlock;
    for (int64_t c = 0; c < n_vecs; ++c) {
      const V prob = vexp(load_vec(row + c * W) - ref[c]);
      store_vec(row + c * W, prob);
      sum[c] += prob;
    }
  }
  for (int64_t c = 0; c < n_vecs; ++c) {
    store_vec(l + c * W, load_vec(l + c * W) * load_vec(alpha + c * W) + sum[c]);
  }
}

template <typename T>
void forward_block(const Problem<T>& p, int64_t b, int64_t h, int64_t i0,
                   Workspace<typename Storage<T>::Acc>& ws, T* out,
                   typename Storage<T>::Acc* lse) {
  using Acc = typename Storage<T>::Acc;
  constexpr int W = Simd<Acc>::kLanes;
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const int64_t D = p.head_dim, Dp = p.padded_dim(), Lk = p.len_k;
  const int64_t nq = std::min(kBlock, p.len_q - i0);
  const int64_t n_vecs = (nq + W - 1) / W;
  const int64_t kvh = h / p.group();
  const int64_t row0 = (b * p.heads_q + h) * p.len_q + i0;  // first (b, h, i) row of the block
  const T* keys = p.k + (b * p.heads_kv + kvh) * Lk * D;
  const T* values = p.v + (b * p.heads_kv + kvh) * Lk * D;
  const Acc* bias = p.bias_row(b, h);
  const int32_t* key_ranks = p.key_rank == nullptr ? nullptr : p.key_rank + b * Lk;

  Acc* qt = ws.transposed[0];  // Q^T, D x kBlock
  Acc* k_rows = ws.rows[0];    // K block as Acc if it needs converting, kBlock x Dp
  Acc* v_rows = ws.rows[1];    // V block as Acc if it needs converting, kBlock x Dp
  Acc* st = ws.tiles[0];       // S^T, then P^T
  Acc* o = ws.accum[0];        // unnormalised output, kBlock x Dp
  Acc *m = ws.lanes[0], *l = ws.lanes[1], *alpha = ws.lanes[2];
  RankOf<Acc>* query_ranks = nullptr;
  RankRange query_range;

  load_transposed(p.q + row0 * D, nq, D, qt);
  if (p.query_rank != nullptr) {
    query_ranks = ws.ranks;
    load_rank_lanes<Acc>(p.query_rank + b * p.len_q + i0, nq, query_ranks);
    query_range = rank_range(p.query_rank + b * p.len_q + i0, nq);
  }
  fill(m, kBlock, neg_inf);
  fill(l, kBlock, Acc(0));
  fill(o, nq * Dp, Acc(0));

  const int64_t key_end = p.causal ? std::min(Lk, i0 + nq + p.offset()) : Lk;
  for (int64_t j0 = 0; j0 < key_end; j0 += kBlock) {
    const int64_t nk = std::min(kBlock, Lk - j0);
    const RankRange key_range =
        key_ranks == nullptr ? RankRange{} : rank_range(key_ranks + j0, nk);
    const Visibility seen = tile_visibility(p, i0, nq, j0, nk, query_range, key_range);
    if (seen == Visibility::kNone) continue;
    const Acc* k_tile = rows_as_acc(keys + j0 * D, nk, D, Dp, k_rows);
    const Acc* v_tile = rows_as_acc(values + j0 * D, nk, D, Dp, v_rows);
    tile_product<Acc>(nk, n_vecs, D, k_tile, Dp, 1, qt, kBlock, st, kBlock, false);
    const bool full = seen == Visibility::kAll && nq % W == 0;
    softmax_block(p, st, nk, n_vecs, nq, j0, i0, bias == nullptr ? nullptr : bias + j0,
                  key_ranks == nullptr ? nullptr : key_ranks + j0, query_ranks, full, m, l,
                  alpha);
    for (int64_t i = 0; i < nq; ++i) {
      if (alpha[i] == Acc(1)) continue;
      for (int64_t d = 0; d < Dp; ++d) o[i * Dp + d] *= alpha[i];
    }
    // O += P V, reading P = (P^T)^T in place.
    tile_product<Acc>(nq, Dp / W, nk, st, 1, kBlock, v_tile, Dp, o, Dp, true);
  }

  for (int64_t i = 0; i < nq; ++i) {
    const bool empty = l[i] == Acc(0);  // no visible key (a NaN sum is not empty)
    const Acc ref = m[i] == neg_inf ? Acc(0) : m[i];
    lse[row0 + i] = empty ? neg_inf : ref + std::log(l[i]);
    store_rows(o + i * Dp, 1, D, Dp, empty ? Acc(0) : Acc(1) / l[i], out + (row0 + i) * D);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.

// delta_r = <dO_r, O_r> - grad_lse_r for the (b, h, i) rows [begin, end). The dot product runs in
// the same order and instruction set as the tile products, so where P is one-hot (O = v_j) it
// equals dP_ij exactly and dS_ij = P_ij (dP_ij - delta_i) is exactly 0, not rounding noise.
template <typename T>
void compute_delta(const T* grad_out, const T* out, const typename Storage<T>::Acc* grad_lse,
                   int64_t begin, int64_t end, int64_t head_dim, typename Storage<T>::Acc* delta) {
  using Acc = typename Storage<T>::Acc;
  for (int64_t r = begin; r < end; ++r) {
    Acc sum = 0;
    for (int64_t d = 0; d < head_dim; ++d) {
      const Acc a = Storage<T>::load(grad_out[r * head_dim + d]);
      const Acc b = Storage<T>::load(out[r * head_dim + d]);
      // Spelled out: the vectoriser would otherwise split the multiply from the in-order sum.
      if constexpr (kHasFma) {
        sum = __builtin_fma(a, b, sum);
      } else {
        sum += a * b;
      }
    }
    delta[r] = grad_lse == nullptr ? sum : sum - grad_lse[r];
  }
}

// A row without visible keys has lse = -inf; +inf turns its exp(S - lse) into 0 instead of NaN.
template <typename Acc>
ALIGNKERN_INLINE Acc exponent_shift(Acc lse) {
  return lse == -std::numeric_limits<Acc>::infinity() ? std::numeric_limits<Acc>::infinity() : lse;
}

// dq for one (batch, query head, query block): dq = scale * sum over key blocks of dS K.
template <typename T>
void backward_dq_block(const Problem<T>& p, const Gradients<T>& g, int64_t b, int64_t h,
                       int64_t i0, Workspace<typename Storage<T>::Acc>& ws) {
  using Acc = typename Storage<T>::Acc;
  using V = VecOf<Acc>;
  constexpr int W = Simd<Acc>::kLanes;
  const int64_t D = p.head_dim, Dp = p.padded_dim(), Lk = p.len_k;
  const int64_t nq = std::min(kBlock, p.len_q - i0);
  const int64_t n_vecs = (nq + W - 1) / W;
  const int64_t kvh = h / p.group();
  const int64_t row0 = (b * p.heads_q + h) * p.len_q + i0;
  const T* keys = p.k + (b * p.heads_kv + kvh) * Lk * D;
  const T* values = p.v + (b * p.heads_kv + kvh) * Lk * D;
  const Acc* bias = p.bias_row(b, h);
  const int32_t* key_ranks = p.key_rank == nullptr ? nullptr : p.key_rank + b * Lk;

  Acc* qt = ws.transposed[0];   // Q^T, D x kBlock
  Acc* dot = ws.transposed[1];  // dO^T, D x kBlock
  Acc* k_rows = ws.rows[0];     // K block as Acc if it needs converting, kBlock x Dp
  Acc* v_rows = ws.rows[1];     // V block as Acc if it needs converting, kBlock x Dp
  Acc* st = ws.tiles[0];        // S^T, then dS^T
  Acc* dpt = ws.tiles[1];       // dP^T = V dO^T
  Acc* dq = ws.accum[0];        // kBlock x Dp
  Acc *shift = ws.lanes[0], *delta = ws.lanes[1];
  RankOf<Acc>* query_ranks = nullptr;
  RankRange query_range;

  load_transposed(p.q + row0 * D, nq, D, qt);
  load_transposed(g.grad_out + row0 * D, nq, D, dot);
  for (int64_t i = 0; i < kBlock; ++i) {
    shift[i] = i < nq ? exponent_shift(g.lse[row0 + i]) : Acc(0);
    delta[i] = i < nq ? g.delta[row0 + i] : Acc(0);
  }
  if (p.query_rank != nullptr) {
    query_ranks = ws.ranks;
    load_rank_lanes<Acc>(p.query_rank + b * p.len_q + i0, nq, query_ranks);
    query_range = rank_range(p.query_rank + b * p.len_q + i0, nq);
  }
  fill(dq, nq * Dp, Acc(0));

  const int64_t key_end = p.causal ? std::min(Lk, i0 + nq + p.offset()) : Lk;
  for (int64_t j0 = 0; j0 < key_end; j0 += kBlock) {
    const int64_t nk = std::min(kBlock, Lk - j0);
    const RankRange key_range =
        key_ranks == nullptr ? RankRange{} : rank_range(key_ranks + j0, nk);
    const Visibility seen = tile_visibility(p, i0, nq, j0, nk, query_range, key_range);
    if (seen == Visibility::kNone) continue;
    const bool full = seen == Visibility::kAll && nq % W == 0;
    const Acc* k_tile = rows_as_acc(keys + j0 * D, nk, D, Dp, k_rows);
    const Acc* v_tile = rows_as_acc(values + j0 * D, nk, D, Dp, v_rows);
    tile_product<Acc>(nk, n_vecs, D, k_tile, Dp, 1, qt, kBlock, st, kBlock, false);
    tile_product<Acc>(nk, n_vecs, D, v_tile, Dp, 1, dot, kBlock, dpt, kBlock, false);
    for (int64_t j = 0; j < nk; ++j) {
      const V bias_j = splat(bias == nullptr ? Acc(0) : bias[j0 + j]);
      const int64_t lo = p.causal ? j0 + j - p.offset() - i0 : 0;
      const RankOf<Acc> rank_j = key_ranks == nullptr ? 0 : key_ranks[j0 + j];
      for (int64_t c = 0; c < n_vecs; ++c) {
        const V x = splat(p.scale) * load_vec(st + j * kBlock + c * W) + bias_j;
        const V prob = vexp(x - load_vec(shift + c * W));
        V ds = prob * (load_vec(dpt + j * kBlock + c * W) - load_vec(delta + c * W));
        if (!full) {
          ds = select<Acc>(visible_columns<Acc, true>(c, lo, nq, query_ranks, rank_j), ds,
                           splat(Acc(0)));
        }
        store_vec(st + j * kBlock + c * W, ds);
      }
    }
    // dq += dS K, reading dS = (dS^T)^T in place.
    tile_product<Acc>(nq, Dp / W, nk, st, 1, kBlock, k_tile, Dp, dq, Dp, true);
  }
  store_rows(dq, nq, D, Dp, p.scale, g.grad_q + row0 * D);
}

// dk, dv and the bias gradient for one (batch, kv head, key block): sums over the query heads of
// the group and all query blocks that can see the keys.
template <typename T>
void backward_dkv_block(const Problem<T>& p, const Gradients<T>& g, int64_t b, int64_t kvh,
                        int64_t j0, Workspace<typename Storage<T>::Acc>& ws) {
  using Acc = typename Storage<T>::Acc;
  using V = VecOf<Acc>;
  constexpr int W = Simd<Acc>::kLanes;
  constexpr int kMaxVecs = kBlock / W;
  const int64_t D = p.head_dim, Dp = p.padded_dim(), Lq = p.len_q, Lk = p.len_k;
  const int64_t nk = std::min(kBlock, Lk - j0);
  const int64_t n_vecs = (nk + W - 1) / W;
  const int64_t kv_row0 = (b * p.heads_kv + kvh) * Lk + j0;
  const int32_t* query_ranks = p.query_rank == nullptr ? nullptr : p.query_rank + b * Lq;

  Acc* kt = ws.transposed[0];  // K^T, D x kBlock
  Acc* vt = ws.transposed[1];  // V^T, D x kBlock
  Acc* q_rows = ws.rows[0];    // Q block as Acc if it needs converting, kBlock x Dp
  Acc* do_rows = ws.rows[1];   // dO block as Acc if it needs converting, kBlock x Dp
  Acc* s = ws.tiles[0];        // S, then P
  Acc* dp = ws.tiles[1];       // dP = dO V^T, then dS
  Acc* dk = ws.accum[0];       // kBlock x Dp
  Acc* dv = ws.accum[1];       // kBlock x Dp
  Acc* bias = ws.lanes[0];     // bias of the key block, for the current query head
  RankOf<Acc>* key_ranks = nullptr;
  RankRange key_range;

  load_transposed(p.k + kv_row0 * D, nk, D, kt);
  load_transposed(p.v + kv_row0 * D, nk, D, vt);
  if (p.key_rank != nullptr) {
    key_ranks = ws.ranks;
    load_rank_lanes<Acc>(p.key_rank + b * Lk + j0, nk, key_ranks);
    key_range = rank_range(p.key_rank + b * Lk + j0, nk);
  }
  fill(dk, nk * Dp, Acc(0));
  fill(dv, nk * Dp, Acc(0));

  const int64_t query_begin = p.causal ? std::max<int64_t>(0, j0 - p.offset()) : 0;
  for (int64_t h = kvh * p.group(); h < (kvh + 1) * p.group(); ++h) {
    const Acc* bias_row = p.bias_row(b, h);
    for (int64_t j = 0; j < kBlock; ++j) {
      bias[j] = bias_row != nullptr && j < nk ? bias_row[j0 + j] : Acc(0);
    }
    V dbias[kMaxVecs];
    for (int64_t c = 0; c < n_vecs; ++c) dbias[c] = splat(Acc(0));

    for (int64_t i0 = query_begin; i0 < Lq; i0 += kBlock) {
      const int64_t nq = std::min(kBlock, Lq - i0);
      const RankRange query_range =
          query_ranks == nullptr ? RankRange{} : rank_range(query_ranks + i0, nq);
      const Visibility seen = tile_visibility(p, i0, nq, j0, nk, query_range, key_range);
      if (seen == Visibility::kNone) continue;
      const bool full = seen == Visibility::kAll && nk % W == 0;
      const int64_t row0 = (b * p.heads_q + h) * Lq + i0;
      const Acc* q_tile = rows_as_acc(p.q + row0 * D, nq, D, Dp, q_rows);
      const Acc* do_tile = rows_as_acc(g.grad_out + row0 * D, nq, D, Dp, do_rows);
      tile_product<Acc>(nq, n_vecs, D, q_tile, Dp, 1, kt, kBlock, s, kBlock, false);
      tile_product<Acc>(nq, n_vecs, D, do_tile, Dp, 1, vt, kBlock, dp, kBlock, false);
      for (int64_t i = 0; i < nq; ++i) {
        const V shift_i = splat(exponent_shift(g.lse[row0 + i]));
        const V delta_i = splat(g.delta[row0 + i]);
        const int64_t hi = p.causal ? i0 + i + p.offset() - j0 + 1 : nk;  // keys < hi are seen
        const RankOf<Acc> rank_i = query_ranks == nullptr ? 0 : query_ranks[i0 + i];
        for (int64_t c = 0; c < n_vecs; ++c) {
          const V x = splat(p.scale) * load_vec(s + i * kBlock + c * W) + load_vec(bias + c * W);
          V prob = vexp(x - shift_i);
          V ds = prob * (load_vec(dp + i * kBlock + c * W) - delta_i);
          if (!full) {
            const MaskOf<Acc> visible =
                visible_columns<Acc, false>(c, 0, std::min(hi, nk), key_ranks, rank_i);
            prob = select<Acc>(visible, prob, splat(Acc(0)));
            ds = select<Acc>(visible, ds, splat(Acc(0)));
          }
          store_vec(s + i * kBlock + c * W, prob);
          store_vec(dp + i * kBlock + c * W, ds);
          dbias[c] += ds;
        }
      }
      // dv += P^T dO and dk += dS^T Q, reading the transposes in place.
      tile_product<Acc>(nk, Dp / W, nq, s, 1, kBlock, do_tile, Dp, dv, Dp, true);
      tile_product<Acc>(nk, Dp / W, nq, dp, 1, kBlock, q_tile, Dp, dk, Dp, true);
    }
    if (g.grad_bias != nullptr) {
      Acc* out = g.grad_bias + (b * p.heads_q + h) * Lk + j0;
      for (int64_t j = 0; j < nk; ++j) out[j] = dbias[j / W][j % W];
    }
  }
  store_rows(dk, nk, D, Dp, p.scale, g.grad_k + kv_row0 * D);
  store_rows(dv, nk, D, Dp, Acc(1), g.grad_v + kv_row0 * D);
}

#undef ALIGNKERN_INLINE

}  // namespace ALIGNKERN_RA_ISA
}  // namespace reward_attention_cpu
}  // namespace alignkern

#endif  // ALIGNKERN_RA_ISA
