// Entry points of the reward_attention kernels: softmax attention with a per-key bias and a
// reward-ordering mask, S_ij = scale * <q_i, k_j> + key_bias_j over the visible keys, where key j
// is visible to query i iff (causal => j <= i + len_k - len_q) and
// (ranks given => key_rank[b, j] <= query_rank[b, i]).
//
// Pointers are raw addresses of contiguous tensors. q, out, grad_out, grad_q are
// (batch, heads_q, len_q, head_dim) and k, v, grad_k, grad_v are (batch, heads_kv, len_k, head_dim),
// all in `dtype`; query head h reads kv head h / (heads_q / heads_kv). key_bias is
// (batch, bias_heads, len_k) with bias_heads 1 (shared) or heads_q, lse and grad_lse are
// (batch, heads_q, len_q), grad_bias is (batch, heads_q, len_k) (per query head; the caller sums
// over heads for a shared bias), all in the accumulation type (float64 for float64 inputs, float32
// otherwise). key_rank (batch, len_k) and query_rank (batch, len_q) are float64. An address of 0
// means "none" for key_bias, the ranks (both or neither), grad_lse and grad_bias.
// A query with no visible key gets out = 0 and lse = -inf.
#pragma once
#include <cstdint>

#include "common.h"

namespace alignkern {

// What every entry point checks before touching memory (Python validated already; this guards
// direct callers of alignkern._C). batch == 0 and empty lengths are allowed (nothing to do).
inline void check_reward_attention_args(int dtype, int64_t batch, int64_t heads_q,
                                        int64_t heads_kv, int64_t len_q, int64_t len_k,
                                        int64_t head_dim, uintptr_t key_bias, int64_t bias_heads,
                                        uintptr_t key_rank, uintptr_t query_rank) {
  to_dtype(dtype);
  check_arg(batch >= 0, "reward_attention: batch size must not be negative");
  check_arg(heads_q > 0 && heads_kv > 0, "reward_attention: the numbers of heads must be positive");
  check_arg(heads_q % heads_kv == 0,
            "reward_attention: query heads must be a multiple of key/value heads");
  check_arg(len_q >= 0 && len_k >= 0, "reward_attention: lengths must not be negative");
  check_arg(head_dim > 0, "reward_attention: head dimension must be positive");
  check_arg(key_bias == 0 || bias_heads == 1 || bias_heads == heads_q,
            "reward_attention: key_bias must have 1 head or as many heads as the queries");
  check_arg((key_rank == 0) == (query_rank == 0),
            "reward_attention: key_rank and query_rank must be given together");
}

void reward_attention_fwd_cpu(uintptr_t q, uintptr_t k, uintptr_t v, int dtype, int64_t batch,
                              int64_t heads_q, int64_t heads_kv, int64_t len_q, int64_t len_k,
                              int64_t head_dim, uintptr_t key_bias, int64_t bias_heads,
                              uintptr_t key_rank, uintptr_t query_rank, int causal, double scale,
                              uintptr_t out, uintptr_t lse);

void reward_attention_bwd_cpu(uintptr_t grad_out, uintptr_t grad_lse, uintptr_t q, uintptr_t k,
                              uintptr_t v, int dtype, int64_t batch, int64_t heads_q,
                              int64_t heads_kv, int64_t len_q, int64_t len_k, int64_t head_dim,
                              uintptr_t key_bias, int64_t bias_heads, uintptr_t key_rank,
                              uintptr_t query_rank, int causal, double scale, uintptr_t out,
                              uintptr_t lse, uintptr_t grad_q, uintptr_t grad_k, uintptr_t grad_v,
                              uintptr_t grad_bias);

#ifdef ALIGNKERN_WITH_CUDA
void reward_attention_fwd_cuda(uintptr_t q, uintptr_t k, uintptr_t v, int dtype, int64_t batch,
                               int64_t heads_q, int64_t heads_kv, int64_t len_q, int64_t len_k,
                               int64_t head_dim, uintptr_t key_bias, int64_t bias_heads,
                               uintptr_t key_rank, uintptr_t query_rank, int causal, double scale,
                               uintptr_t out, uintptr_t lse, uintptr_t stream);
#endif

}  // namespace alignkern
