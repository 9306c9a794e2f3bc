// alignkern._C: thin pybind11 bindings. Every function takes raw addresses, sizes and strides (and
// the CUDA stream for CUDA kernels), writes into buffers the caller allocated, and returns nothing.
#include <pybind11/pybind11.h>

#include "common.h"
#include "linear_logprobs.h"
#include "logit_stats.h"
#include "reward_attention.h"
#include "token_logprobs.h"

namespace py = pybind11;

namespace {
bool has_cuda() {
#ifdef ALIGNKERN_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "alignkern C++/CUDA kernels (raw-pointer interface; use the alignkern package instead)";
  m.def("has_cuda", &has_cuda, "Whether the CUDA kernels were compiled into this build");

  m.def("token_logprobs_fwd_cpu", &alignkern::token_logprobs_fwd_cpu,
        py::call_guard<py::gil_scoped_release>());
  m.def("token_logprobs_bwd_cpu", &alignkern::token_logprobs_bwd_cpu,
        py::call_guard<py::gil_scoped_release>());
  // The five statistic outputs are optional (0: not requested).
  m.def("logit_stats_cpu", &alignkern::logit_stats_cpu, py::arg("logits"), py::arg("dtype"),
        py::arg("n_rows"), py::arg("vocab"), py::arg("row_stride"), py::arg("temperature"),
        py::arg("row_max"), py::arg("log_sum"), py::arg("mean_dz") = 0, py::arg("log_sum_sq") = 0,
        py::arg("sum_z") = 0, py::arg("max_z") = 0, py::arg("argmax") = 0,
        py::call_guard<py::gil_scoped_release>());
  m.def("kl_tile_stats_cpu", &alignkern::kl_tile_stats_cpu,
        py::call_guard<py::gil_scoped_release>());
  m.def("reward_attention_fwd_cpu", &alignkern::reward_attention_fwd_cpu,
        py::call_guard<py::gil_scoped_release>());
  m.def("reward_attention_bwd_cpu", &alignkern::reward_attention_bwd_cpu,
        py::call_guard<py::gil_scoped_release>());
#ifdef ALIGNKERN_WITH_CUDA
  m.def("token_logprobs_fwd_cuda", &alignkern::token_logprobs_fwd_cuda,
        py::call_guard<py::gil_scoped_release>());
  m.def("token_logprobs_bwd_cuda", &alignkern::token_logprobs_bwd_cuda,
        py::call_guard<py::gil_scoped_release>());
  // The five statistic buffers are optional (0: not requested).
  m.def("linear_logprobs_lse_cuda", &alignkern::linear_logprobs_lse_cuda, py::arg("hidden"),
        py::arg("hidden_row_stride"), py::arg("weight"), py::arg("weight_row_stride"),
        py::arg("bias"), py::arg("dtype"), py::arg("n_rows"), py::arg("vocab"),
        py::arg("hidden_size"), py::arg("shift"), py::arg("log_sum"), py::arg("temperature"),
        py::arg("softcap"), py::arg("logit_scale"), py::arg("stream"), py::arg("mean_dz") = 0,
        py::arg("log_sum_sq") = 0, py::arg("sum_z") = 0, py::arg("max_z") = 0,
        py::arg("argmax") = 0, py::call_guard<py::gil_scoped_release>());
  m.def("reward_attention_fwd_cuda", &alignkern::reward_attention_fwd_cuda,
        py::call_guard<py::gil_scoped_release>());
#endif
}
