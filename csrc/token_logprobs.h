// Entry points of the token_logprobs kernels. Pointers are raw addresses; strides are in elements.
// Row r of the logits starts at logits + row_offsets[r] (int64 element offsets, so any view works);
// rows_aligned (CUDA) promises that every row start is a multiple of 16 bytes from the base.
// Targets are int64 and contiguous (n_rows, k); out, shift and log_sum are contiguous in the
// accumulation type (float64 for float64 logits, float32 otherwise); grad_logits is contiguous
// (n_rows, vocab) in the logits' dtype.
//
// Each row's log-sum-exp of z = logits / T is written in two parts, lse = shift + log_sum: shift is
// the row's maximum of z (0 where that maximum is infinite) and log_sum = log sum_v exp(z_v - shift).
// A log-probability is (z_t - shift) - log_sum and the backward's softmax exp((z - shift) - log_sum):
// the sum rounded to one float would lose every bit of log_sum below the spacing of |shift|.
#pragma once
#include <cstdint>

#include "common.h"

namespace alignkern {

// What every entry point checks before touching memory (Python validated already; this guards
// direct callers of alignkern._C).
inline void check_token_logprobs_args(int64_t vocab, double temperature) {
  check_arg(vocab > 0, "token_logprobs: vocabulary size must be positive");
  check_arg(temperature > 0, "token_logprobs: temperature must be positive");
}

void token_logprobs_fwd_cpu(uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab,
                            uintptr_t row_offsets, uintptr_t targets, int64_t k, uintptr_t out,
                            uintptr_t shift, uintptr_t log_sum, double temperature,
                            int64_t ignore_index);

// The dense part of the backward: grad_logits = -(coef + entropy_grad (z - shift)) * softmax(z) / T
// with z = logits / T, coef and entropy_grad (n_rows,) contiguous in the accumulation type
// (entropy_grad 0: none; linear_logprobs' fused entropy); the caller writes the target columns
// afterwards. grad_logits may be the logits themselves (each chunk is read before it is written).
void token_logprobs_bwd_cpu(uintptr_t coef, uintptr_t logits, int dtype, int64_t n_rows,
                            int64_t vocab, uintptr_t row_offsets, uintptr_t shift,
                            uintptr_t log_sum, uintptr_t grad_logits, double temperature,
                            uintptr_t entropy_grad);

#ifdef ALIGNKERN_WITH_CUDA
void token_logprobs_fwd_cuda(uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab,
                             uintptr_t row_offsets, int rows_aligned, uintptr_t targets, int64_t k,
                             uintptr_t out, uintptr_t shift, uintptr_t log_sum, double temperature,
                             int64_t ignore_index, uintptr_t stream);

void token_logprobs_bwd_cuda(uintptr_t coef, uintptr_t logits, int dtype, int64_t n_rows,
                             int64_t vocab, uintptr_t row_offsets, int rows_aligned,
                             uintptr_t shift, uintptr_t log_sum, uintptr_t grad_logits,
                             double temperature, uintptr_t stream);
#endif

}  // namespace alignkern
