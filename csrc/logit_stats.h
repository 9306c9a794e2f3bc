// Entry point of the CPU kernel behind linear_logprobs(..., stats=...)'s cpu backend: for each row
// of a tile of logits x (n_rows rows of `vocab` elements, `row_stride` apart, float32 or float64),
// with z = x / temperature, the row's log-sum-exp in two parts (row_max: the maximum of z, 0 where
// it is infinite; log_sum = log sum exp(z - row_max)) and, for each output pointer that is not 0,
// mean_dz = sum p (z - row_max) (p = softmax(z)), log_sum_sq = log sum p^2, sum_z = sum z,
// max_z = max z and argmax = the first index attaining it (int64). Outputs are contiguous (n_rows,)
// in the tile's dtype. See csrc/cpu/logit_stats.cpp.
#pragma once
#include <cstdint>

#include "common.h"

namespace alignkern {

template <typename Acc>
struct LogitStatsOut {
  Acc* row_max;
  Acc* log_sum;
  Acc* mean_dz;     // nullptr: not requested (so below)
  Acc* log_sum_sq;
  Acc* sum_z;
  Acc* max_z;
  int64_t* argmax;
};

template <typename Acc>
struct KlStatsOut {
  Acc* row_max;
  Acc* log_sum;
  Acc* ref_row_max;
  Acc* ref_log_sum;
  Acc* expect;
};

// linear_kl's cpu backend: for each row of two tiles z (policy) and y (reference) of already
// scaled logits (n_rows x width, row_stride apart, the same for both; float32 or float64), each
// side's log-sum-exp in two parts (as above) and expect = sum_v softmax(z)_v (z_v - y_v); with
// `direction` (else 0) also D = softmax(z) (z - y - expect) written there (same layout; it may be
// y itself: each element is read before it is written).
void kl_tile_stats_cpu(uintptr_t z, uintptr_t y, int dtype, int64_t n_rows, int64_t width,
                       int64_t row_stride, uintptr_t row_max, uintptr_t log_sum,
                       uintptr_t ref_row_max, uintptr_t ref_log_sum, uintptr_t expect,
                       uintptr_t direction);

void logit_stats_cpu(uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab,
                     int64_t row_stride, double temperature, uintptr_t row_max,
                     uintptr_t log_sum, uintptr_t mean_dz, uintptr_t log_sum_sq, uintptr_t sum_z,
                     uintptr_t max_z, uintptr_t argmax);

}  // namespace alignkern
