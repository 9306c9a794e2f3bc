// The fused statistics of a tile of logits on the CPU (linear_logprobs(..., stats=...)'s cpu
// backend): for each row of z = x / T, in the pass that gives its log-sum-exp, the partials that
// alignkern/ops/_logit_stats.py merges across tiles. One OpenMP task per row; per L1-sized chunk a
// max pass, then one pass that folds every statistic. Everything is kept relative to the running
// reference point ref (the row maximum, 0 where infinite), as the log-sum-exp is:
//   s  = sum exp(z - ref)                      -> log_sum = log s
//   xd = sum exp(z - ref) (z - ref)            -> mean_dz = xd / s (entropy = log_sum - mean_dz)
//   sq = sum exp(2 (z - ref))                  -> log_sum_sq = log sq - 2 log s
//   zsum = sum z                               -> sum_z
//   the first index of the maximum of z        -> argmax; max_z = max z
// A move of ref to ref' rescales s by alpha = exp(ref - ref'), sq by alpha^2 and turns xd into
// alpha (xd + (ref - ref') s). Rows whose maximum is +inf (their terms can be positive) take libm's
// exp. z = x * inv_t is rounded as the token_logprobs kernel rounds it (vector.h, scaled()).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"
#include "logit_stats.h"
#include "vector.h"

namespace alignkern {
namespace {

using namespace vec;

constexpr int64_t kChunk = 2048;

template <typename Acc>
struct Sums {
  Acc s = 0, xd = 0, sq = 0, zsum = 0;
};

template <bool kUnscaled>
ALIGNKERN_INLINE floats scaled_by(floats x, float inv_t) {
  if constexpr (kUnscaled) {
    return x;
  } else {
    return scaled(x, inv_t);
  }
}

// One vector of z and its padding-free mask folded into the sums (e == 0 where z = -inf: its
// (z - ref) term is 0, not 0 * -inf).
ALIGNKERN_INLINE void fold(floats z, floats ref, floats& s, floats& xd, floats& sq) {
  const floats d = z - ref;
  const floats e = exp_nonpositive(d);
  s += e;
  xd += e * (e == splat(0.0f) ? splat(0.0f) : d);
  sq += e * e;
}

template <bool kUnscaled>
ALIGNKERN_INLINE Sums<float> chunk_sums(const float* x, int64_t n, float inv_t, float ref) {
  floats s = splat(0.0f), xd = splat(0.0f), sq = splat(0.0f), zsum = splat(0.0f);
  const floats refs = splat(ref);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    __builtin_prefetch(x + i + 2 * kChunk);  // the chunk after next, while this one is in L1
    const floats z = scaled_by<kUnscaled>(load(x + i), inv_t);
    fold(z, refs, s, xd, sq);
    zsum += z;
  }
  Sums<float> out;
  if (i < n) {  // the tail: -inf padding adds nothing to the exp sums; z summed lane by lane
    const floats z = scaled_by<kUnscaled>(
        load_partial(x + i, n - i, -std::numeric_limits<float>::infinity()), inv_t);
    fold(z, refs, s, xd, sq);
    for (int64_t j = 0; i + j < n; ++j) out.zsum += z[j];
  }
  out.s = lane_sum(s);
  out.xd = lane_sum(xd);
  out.sq = lane_sum(sq);
  out.zsum += lane_sum(zsum);
  return out;
}

ALIGNKERN_MULTIVERSION
Sums<float> chunk_sums(const float* x, int64_t n, float inv_t, float ref) {
  return inv_t == 1.0f ? chunk_sums<true>(x, n, inv_t, ref) : chunk_sums<false>(x, n, inv_t, ref);
}

// libm's exp, element by element: double tiles, and rows whose maximum is +inf.
template <typename Acc>
Sums<Acc> scalar_sums(const Acc* x, int64_t n, Acc inv_t, Acc ref) {
  Sums<Acc> out;
  for (int64_t i = 0; i < n; ++i) {
    const Acc z = scaled(x[i], inv_t);
    const Acc d = z - ref;
    const Acc e = std::exp(d);
    out.s += e;
    out.xd += e == Acc(0) ? Acc(0) : e * d;
    out.sq += e * e;
    out.zsum += z;
  }
  return out;
}

Sums<double> chunk_sums(const double* x, int64_t n, double inv_t, double ref) {
  return scalar_sums(x, n, inv_t, ref);
}

// The first index of the chunk whose z equals `target` (a value some element of it has).
template <typename Acc>
int64_t first_index_of(const Acc* x, int64_t n, Acc inv_t, Acc target) {
  for (int64_t i = 0; i < n; ++i) {
    if (scaled(x[i], inv_t) == target) return i;
  }
  return 0;  // not reached for a target from this chunk (NaN excepted)
}

template <typename Acc>
Acc reference_point(Acc m) {
  return std::isinf(m) ? Acc(0) : m;
}

template <typename Acc>
void row_stats(const Acc* row, int64_t vocab, Acc inv_t, const LogitStatsOut<Acc>& out,
               int64_t r) {
  Acc m = -std::numeric_limits<Acc>::infinity();  // running max of z
  Sums<Acc> total;
  int64_t best = 0;
  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const Acc* x = row + start;
    const Acc chunk_m = scaled(chunk_max(x, n), inv_t);
    if (out.argmax != nullptr && chunk_m > m) best = start + first_index_of(x, n, inv_t, chunk_m);
    const Acc m_new = chunk_m > m ? chunk_m : m;
    const Acc ref = reference_point(m_new);
    // s == 0 means nothing was counted yet; rescaling it could compute 0 * inf.
    if (m_new != m && total.s != Acc(0)) {
      const Acc step = reference_point(m) - ref;
      const Acc alpha = std::exp(step);
      total.xd = alpha * (total.xd + step * total.s);
      total.sq *= alpha * alpha;
      total.s *= alpha;
    }
    const Sums<Acc> part = m_new == std::numeric_limits<Acc>::infinity()
                               ? scalar_sums(x, n, inv_t, ref)
                               : chunk_sums(x, n, inv_t, ref);
    total.s += part.s;
    total.xd += part.xd;
    total.sq += part.sq;
    total.zsum += part.zsum;
    m = m_new;
  }
  const Acc log_s = std::log(total.s);
  out.row_max[r] = reference_point(m);
  out.log_sum[r] = log_s;
  if (out.mean_dz != nullptr) out.mean_dz[r] = total.xd / total.s;
  if (out.log_sum_sq != nullptr) out.log_sum_sq[r] = std::log(total.sq) - 2 * log_s;
  if (out.sum_z != nullptr) out.sum_z[r] = total.zsum;
  if (out.max_z != nullptr) out.max_z[r] = m;
  if (out.argmax != nullptr) out.argmax[r] = best;
}

template <typename Acc>
void stats_rows(const Acc* logits, int64_t n_rows, int64_t vocab, int64_t row_stride,
                double temperature, const LogitStatsOut<Acc>& out) {
  const Acc inv_t = static_cast<Acc>(1.0 / temperature);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n_rows; ++r) row_stats(logits + r * row_stride, vocab, inv_t, out, r);
}

template <typename Acc>
LogitStatsOut<Acc> outputs(uintptr_t row_max, uintptr_t log_sum, uintptr_t mean_dz,
                           uintptr_t log_sum_sq, uintptr_t sum_z, uintptr_t max_z,
                           uintptr_t argmax) {
  auto optional = [](uintptr_t p) { return p == 0 ? nullptr : as_ptr<Acc>(p); };
  return {as_ptr<Acc>(row_max), as_ptr<Acc>(log_sum), optional(mean_dz), optional(log_sum_sq),
          optional(sum_z), optional(max_z), argmax == 0 ? nullptr : as_ptr<int64_t>(argmax)};
}

// ---------------------------------------------------------------------------------- linear_kl

// Per row of two tiles of already scaled logits, z (policy) and y (reference): each side's
// log-sum-exp kept as (reference point, sum relative to it) and a = sum exp(z - ref_z) (z - y).
template <typename Acc>
struct KlSums {
  Acc s_z = 0, s_y = 0, a = 0;
};

ALIGNKERN_INLINE void fold_kl(floats z, floats y, floats ref_z, floats ref_y, floats& s_z,
                              floats& s_y, floats& a) {
  const floats e_z = exp_nonpositive(z - ref_z);
  s_z += e_z;
  a += e_z * (e_z == splat(0.0f) ? splat(0.0f) : z - y);  // 0, not 0 * inf, where z = -inf
  s_y += exp_nonpositive(y - ref_y);
}

ALIGNKERN_MULTIVERSION
KlSums<float> kl_chunk_sums(const float* z, const float* y, int64_t n, float ref_z, float ref_y) {
  floats s_z = splat(0.0f), s_y = splat(0.0f), a = splat(0.0f);
  const floats rz = splat(ref_z), ry = splat(ref_y);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    __builtin_prefetch(z + i + 2 * kChunk);
    __builtin_prefetch(y + i + 2 * kChunk);
    fold_kl(load(z + i), load(y + i), rz, ry, s_z, s_y, a);
  }
  if (i < n) {  // -inf padding adds nothing
    const float pad = -std::numeric_limits<float>::infinity();
    fold_kl(load_partial(z + i, n - i, pad), load_partial(y + i, n - i, pad), rz, ry, s_z, s_y, a);
  }
  return {lane_sum(s_z), lane_sum(s_y), lane_sum(a)};
}

template <typename Acc>
KlSums<Acc> scalar_kl_sums(const Acc* z, const Acc* y, int64_t n, Acc ref_z, Acc ref_y) {
  KlSums<Acc> out;
  for (int64_t i = 0; i < n; ++i) {
    const Acc e_z = std::exp(z[i] - ref_z);
    out.s_z += e_z;
    out.a += e_z == Acc(0) ? Acc(0) : e_z * (z[i] - y[i]);
    out.s_y += std::exp(y[i] - ref_y);
  }
  return out;
}

KlSums<double> kl_chunk_sums(const double* z, const double* y, int64_t n, double ref_z,
                             double ref_y) {
  return scalar_kl_sums(z, y, n, ref_z, ref_y);
}

template <typename Acc>
void kl_row(const Acc* z, const Acc* y, int64_t width, const KlStatsOut<Acc>& out, int64_t r) {
  constexpr Acc kInf = std::numeric_limits<Acc>::infinity();
  Acc m_z = -kInf, m_y = -kInf;
  KlSums<Acc> total;
  for (int64_t start = 0; start < width; start += kChunk) {
    const int64_t n = std::min(kChunk, width - start);
    const Acc* zc = z + start;
    const Acc* yc = y + start;
    const Acc cz = chunk_max(zc, n), cy = chunk_max(yc, n);
    const Acc mz_new = cz > m_z ? cz : m_z, my_new = cy > m_y ? cy : m_y;
    const Acc ref_z = reference_point(mz_new), ref_y = reference_point(my_new);
    // s == 0 means nothing was counted yet; rescaling it could compute 0 * inf.
    if (mz_new != m_z && total.s_z != Acc(0)) {
      const Acc alpha = std::exp(reference_point(m_z) - ref_z);
      total.s_z *= alpha;
      total.a *= alpha;
    }
    if (my_new != m_y && total.s_y != Acc(0)) total.s_y *= std::exp(reference_point(m_y) - ref_y);
    const bool positive = mz_new == kInf || my_new == kInf;  // terms above 1: libm's exp
    const KlSums<Acc> part = positive ? scalar_kl_sums(zc, yc, n, ref_z, ref_y)
                                      : kl_chunk_sums(zc, yc, n, ref_z, ref_y);
    total.s_z += part.s_z;
    total.s_y += part.s_y;
    total.a += part.a;
    m_z = mz_new;
    m_y = my_new;
  }
  out.row_max[r] = reference_point(m_z);
  out.log_sum[r] = std::log(total.s_z);
  out.ref_row_max[r] = reference_point(m_y);
  out.ref_log_sum[r] = std::log(total.s_y);
  out.expect[r] = total.a / total.s_z;
}

// D = p (z - y - E) with p = exp((z - row_max) - log_sum): the direction of KL's gradient.
ALIGNKERN_MULTIVERSION
void kl_direction_chunk(const float* z, const float* y, int64_t n, float row_max, float log_sum,
                        float expect, float* out) {
  const floats m = splat(row_max), l = splat(log_sum), e = splat(expect);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const floats zv = load(z + i);
    const floats p = exp_nonpositive((zv - m) - l);
    const floats v = p * (p == splat(0.0f) ? splat(0.0f) : (zv - load(y + i)) - e);
    std::memcpy(out + i, &v, sizeof(v));
  }
  for (; i < n; ++i) {
    const float p = std::exp((z[i] - row_max) - log_sum);
    out[i] = p == 0.0f ? 0.0f : p * ((z[i] - y[i]) - expect);
  }
}

void kl_direction_chunk(const double* z, const double* y, int64_t n, double row_max,
                        double log_sum, double expect, double* out) {
  for (int64_t i = 0; i < n; ++i) {
    const double p = std::exp((z[i] - row_max) - log_sum);
    out[i] = p == 0.0 ? 0.0 : p * ((z[i] - y[i]) - expect);
  }
}

template <typename Acc>
void kl_rows(const Acc* z, const Acc* y, int64_t n_rows, int64_t width, int64_t row_stride,
             const KlStatsOut<Acc>& out, Acc* direction) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n_rows; ++r) {
    const Acc* zr = z + r * row_stride;
    const Acc* yr = y + r * row_stride;
    kl_row(zr, yr, width, out, r);
    if (direction == nullptr) continue;
    const bool finite = std::isfinite(out.log_sum[r]);
    for (int64_t start = 0; start < width; start += kChunk) {
      const int64_t n = std::min(kChunk, width - start);
      Acc* d = direction + r * row_stride + start;
      if (finite) {
        kl_direction_chunk(zr + start, yr + start, n, out.row_max[r], out.log_sum[r],
                           out.expect[r], d);
      } else {  // a row whose maximum is +inf, or NaN: libm's exp
        for (int64_t i = 0; i < n; ++i) {
          const Acc p = std::exp((zr[start + i] - out.row_max[r]) - out.log_sum[r]);
          d[i] = p == Acc(0) ? Acc(0) : p * ((zr[start + i] - yr[start + i]) - out.expect[r]);
        }
      }
    }
  }
}

}  // namespace

void kl_tile_stats_cpu(uintptr_t z, uintptr_t y, int dtype, int64_t n_rows, int64_t width,
                       int64_t row_stride, uintptr_t row_max, uintptr_t log_sum,
                       uintptr_t ref_row_max, uintptr_t ref_log_sum, uintptr_t expect,
                       uintptr_t direction) {
  check_arg(width > 0, "kl_tile_stats: the tiles must have at least one column");
  check_arg(row_stride >= width, "kl_tile_stats: the row stride must be at least the width");
  auto run = [&](auto tag) {
    using Acc = decltype(tag);
    kl_rows(as_ptr<const Acc>(z), as_ptr<const Acc>(y), n_rows, width, row_stride,
            KlStatsOut<Acc>{as_ptr<Acc>(row_max), as_ptr<Acc>(log_sum), as_ptr<Acc>(ref_row_max),
                            as_ptr<Acc>(ref_log_sum), as_ptr<Acc>(expect)},
            direction == 0 ? nullptr : as_ptr<Acc>(direction));
  };
  switch (to_dtype(dtype)) {
    case DType::Float32: run(float{}); break;
    case DType::Float64: run(double{}); break;
    default: throw std::invalid_argument("kl_tile_stats: tiles are float32 or float64");
  }
}

void logit_stats_cpu(uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab,
                     int64_t row_stride, double temperature, uintptr_t row_max,
                     uintptr_t log_sum, uintptr_t mean_dz, uintptr_t log_sum_sq, uintptr_t sum_z,
                     uintptr_t max_z, uintptr_t argmax) {
  check_arg(vocab > 0, "logit_stats: the tile must have at least one column");
  check_arg(row_stride >= vocab, "logit_stats: the row stride must be at least the width");
  check_arg(temperature > 0, "logit_stats: temperature must be positive");
  check_arg(row_max != 0 && log_sum != 0, "logit_stats: row_max and log_sum are required");
  switch (to_dtype(dtype)) {
    case DType::Float32:
      stats_rows(as_ptr<const float>(logits), n_rows, vocab, row_stride, temperature,
                 outputs<float>(row_max, log_sum, mean_dz, log_sum_sq, sum_z, max_z, argmax));
      break;
    case DType::Float64:
      stats_rows(as_ptr<const double>(logits), n_rows, vocab, row_stride, temperature,
                 outputs<double>(row_max, log_sum, mean_dz, log_sum_sq, sum_z, max_z, argmax));
      break;
    default:
      throw std::invalid_argument("logit_stats: tiles are float32 or float64");
  }
}

}  // namespace alignkern
