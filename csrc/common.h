// Shared helpers for the alignkern C++/CUDA kernels: dtype codes and conversions, argument checks,
// CUDA error checking. The extension does not link libtorch, so the Python side passes raw pointers
// and a dtype code; this header turns them back into typed pointers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace alignkern {

// Must match alignkern/_backend.py (DTYPE_CODES).
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

inline DType to_dtype(int code) {
  if (code < 0 || code > 3) {
    throw std::invalid_argument("alignkern._C: unknown dtype code " + std::to_string(code));
  }
  return static_cast<DType>(code);
}

// Throws ValueError on the Python side (pybind11 maps std::invalid_argument to ValueError).
inline void check_arg(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("alignkern._C: " + message);
}

// 16-bit storage types. The CPU code converts them with bit operations (no compiler extensions,
// no libtorch); the CUDA code uses its own __half / __nv_bfloat16.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float to_float(BFloat16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

inline float to_float(Half x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1Fu;
  uint32_t mantissa = x.bits & 0x3FFu;
  if (exponent == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));  // inf, nan
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_to_float(sign);  // signed zero
  // Subnormal half: normalise the mantissa.
  uint32_t e = 113;
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    --e;
  }
  return bits_to_float(sign | (e << 23) | ((mantissa & 0x3FFu) << 13));
}

inline float to_float(float x) { return x; }
inline double to_double(double x) { return x; }

// Round to nearest even, NaN stays NaN.
inline BFloat16 to_bfloat16(float f) {
  uint32_t u = float_to_bits(f);
  if (std::isnan(f)) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}

// Round to nearest even, overflow to inf, subnormals kept, NaN stays NaN.
inline Half to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs_bits = u & 0x7FFFFFFFu;
  if (abs_bits > 0x7F800000u) return Half{static_cast<uint16_t>(sign | 0x7E00u)};  // nan
  if (abs_bits >= 0x477FF000u) return Half{static_cast<uint16_t>(sign | 0x7C00u)};  // >= 65520: inf
  if (abs_bits < 0x38800000u) {                                                      // < 2^-14
    // Subnormal or zero: scale by 2^24 and round to an integer number of 2^-24 steps.
    const float scaled = bits_to_float(abs_bits) * 16777216.0f;
    return Half{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)))};
  }
  uint32_t rounded = abs_bits + 0xFFFu + ((abs_bits >> 13) & 1u);
  rounded -= 112u << 23;
  return Half{static_cast<uint16_t>(sign | (rounded >> 13))};
}

template <typename T>
struct Storage;
template <>
struct Storage<float> {
  using Acc = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};
template <>
struct Storage<double> {
  using Acc = double;
  static double load(double x) { return x; }
  static double store(double x) { return x; }
};
template <>
struct Storage<Half> {
  using Acc = float;
  static float load(Half x) { return to_float(x); }
  static Half store(float x) { return to_half(x); }
};
template <>
struct Storage<BFloat16> {
  using Acc = float;
  static float load(BFloat16 x) { return to_float(x); }
  static BFloat16 store(float x) { return to_bfloat16(x); }
};

// Calls fn(T{}) with T the storage type named by a dtype code.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(float{}); break;
    case DType::Float16: fn(Half{}); break;
    case DType::BFloat16: fn(BFloat16{}); break;
    case DType::Float64: fn(double{}); break;
  }
}

template <typename T>
inline T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace alignkern

#ifdef ALIGNKERN_WITH_CUDA
#include <cuda_runtime.h>
#define ALIGNKERN_CUDA_CHECK(expr)                                                              \
  do {                                                                                          \
    cudaError_t alignkern_err_ = (expr);                                                        \
    if (alignkern_err_ != cudaSuccess) {                                                        \
      throw std::runtime_error(std::string("alignkern._C: CUDA error in ") + #expr + " at " +   \
                               __FILE__ + ":" + std::to_string(__LINE__) + ": " +               \
                               cudaGetErrorString(alignkern_err_));                             \
    }                                                                                           \
  } while (0)
#endif
