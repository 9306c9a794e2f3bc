// The CUDA kernels' tuning choices (template parameters with more than one instantiation) and how
// a run picks one: ALIGNKERN_CUDA_CONFIG="name=value,name=value" (read at every launch, so a
// tuning script can switch between launches), else the default. Every value of every choice is
// instantiated, so the build compiles them all for every architecture and the resource check
// (tests/test_gpu_compile.py, cuobjdump -res-usage) proves each one free of spills and local memory.
//
//   token_threads  threads per block of the token_logprobs row kernels: 256 (default), 512, 1024
//   linear_kbk     hidden elements per shared-memory stage of linear_logprobs' float16/bfloat16
//                  tile product: 32 (default), 64 (float32 always stages 32: 64 would exceed the
//                  48 KB of static shared memory; the fused statistics' unaligned fallback also
//                  stages 32, since 64 spilled there on sm_80)
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace alignkern {
namespace cuda_detail {

// The value of `name` in ALIGNKERN_CUDA_CONFIG, or `fallback`. A value that is not one of `allowed`
// (count entries) is an error naming the choice and the values it takes.
inline int tuning_choice(const char* name, int fallback, const int* allowed, int count) {
  const char* config = std::getenv("ALIGNKERN_CUDA_CONFIG");
  if (config == nullptr) return fallback;
  const std::string text(config);
  const std::string key = std::string(name) + "=";
  size_t at = 0;
  while (at < text.size()) {
    size_t end = text.find(',', at);
    if (end == std::string::npos) end = text.size();
    const std::string item = text.substr(at, end - at);
    if (item.compare(0, key.size(), key) == 0) {
      const std::string value = item.substr(key.size());
      for (int i = 0; i < count; ++i) {
        if (value == std::to_string(allowed[i])) return allowed[i];
      }
      std::string values;
      for (int i = 0; i < count; ++i) values += (i ? ", " : "") + std::to_string(allowed[i]);
      throw std::invalid_argument("alignkern._C: ALIGNKERN_CUDA_CONFIG: " + std::string(name) +
                                  " takes " + values + ", got '" + value + "'");
    }
    at = end + 1;
  }
  return fallback;
}

}  // namespace cuda_detail
}  // namespace alignkern
