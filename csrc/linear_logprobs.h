// Entry points of the linear_logprobs kernels: the log-sum-exp of every row of the scaled logits
// computed straight from hidden states and the LM head, without materialising the (n_rows, vocab)
// logits. Pointers are raw addresses; strides are in elements. hidden is (n_rows, hidden_size) and
// weight is (vocab, hidden_size), both with column stride 1; bias is (vocab,) in the same dtype, or
// 0 for none. shift and log_sum (n_rows,) are contiguous float32: each row's log-sum-exp is
// shift + log_sum, shift the row's maximum of z (0 where it is infinite) and log_sum =
// log sum_v exp(z_v - shift), kept apart so that log-probabilities (z_t - shift) - log_sum keep the
// bits that shift + log_sum rounded to one float would lose. The logits are
// softcap * tanh(logit_scale * (hidden . weight + bias) / softcap) / temperature; a softcap <= 0
// means "no softcap" (logit_scale * (hidden . weight + bias) / temperature).
//
// Fused statistics: mean_dz, log_sum_sq, sum_z, max_z (float32) and argmax (int64), each the
// address of a contiguous (n_rows,) buffer or 0 for "not requested", are written from the same pass
// as the log-sum-exp, over the whole vocabulary: with p = softmax(z), mean_dz = sum p (z - shift)
// (entropy = log_sum - mean_dz), log_sum_sq = log sum p^2, sum_z = sum z, max_z = max z, argmax =
// the first id attaining max_z.
// With all five 0 the kernel computes the LSE alone.
#pragma once
#include <cstdint>

#include "common.h"

namespace alignkern {

// What every entry point checks before touching memory (Python validated already; this guards
// direct callers of alignkern._C).
inline void check_linear_logprobs_args(int64_t n_rows, int64_t vocab, int64_t hidden_size,
                                       double temperature) {
  check_arg(n_rows >= 0, "linear_logprobs: the number of rows must not be negative");
  check_arg(vocab > 0, "linear_logprobs: vocabulary size must be positive");
  check_arg(hidden_size > 0, "linear_logprobs: hidden size must be positive");
  check_arg(temperature > 0, "linear_logprobs: temperature must be positive");
}

#ifdef ALIGNKERN_WITH_CUDA
void linear_logprobs_lse_cuda(uintptr_t hidden, int64_t hidden_row_stride, uintptr_t weight,
                              int64_t weight_row_stride, uintptr_t bias, int dtype, int64_t n_rows,
                              int64_t vocab, int64_t hidden_size, uintptr_t shift,
                              uintptr_t log_sum, double temperature, double softcap,
                              double logit_scale, uintptr_t stream, uintptr_t mean_dz,
                              uintptr_t log_sum_sq,
                              uintptr_t sum_z, uintptr_t max_z, uintptr_t argmax);
#endif

}  // namespace alignkern
