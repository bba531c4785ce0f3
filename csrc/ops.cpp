// r21d._C: op schemas of the `r21d` namespace, and the pybind11 module.
//
// This file holds the namespace's ONLY `TORCH_LIBRARY(r21d, m)` block (a second one, in
// any .so, fails with "Only a single TORCH_LIBRARY can be used to register the namespace").
// Kernel files add implementations with `TORCH_LIBRARY_IMPL(r21d, CUDA, m)`; Python adds
// ops with `torch.library.custom_op("r21d::...")` (FRAGMENT libraries), which coexist with
// this block whichever is loaded first.
//
// Python-visible API (import torch first, then r21d._C):
//   torch.ops.r21d.build_info() -> str    JSON text (dispatcher op; no tensor arguments)
//   r21d._C.build_info() -> dict          the same, parsed (pybind11; non-op helper)
#include <torch/library.h>
#include <torch/version.h>  // TORCH_VERSION_MAJOR/MINOR/PATCH (all torch >= 1.10)

#include <pybind11/pybind11.h>

#include <string>
#include <utility>
#include <vector>

#include "r21d.h"

#define R21D_STR_(...) #__VA_ARGS__
#define R21D_STR(...) R21D_STR_(__VA_ARGS__)

namespace r21d {
namespace {

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += ' ';
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

// "800,900" (nvcc's __CUDA_ARCH_LIST__) -> ["sm_80", "sm_90"] (torch.cuda.get_arch_list() style).
std::string json_arch_list(const std::string& list) {
  std::string out = "[";
  std::string item;
  bool first = true;
  auto flush = [&]() {
    if (item.empty()) return;
    const int v = std::stoi(item);
    out += (first ? "" : ", ") + json_string("sm_" + std::to_string(v / 10));
    first = false;
    item.clear();
  };
  for (const char c : list) {
    if (c >= '0' && c <= '9') {
      item += c;
    } else {
      flush();
    }
  }
  flush();
  return out + "]";
}

std::string cxx_compiler() {
#if defined(__clang__)
  return std::string("Clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("GCC ") + __VERSION__;
#elif defined(_MSC_VER)
  return "MSVC " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

}  // namespace

// JSON object describing how this extension was built. Keys:
//   torch_version          torch headers compiled against, "MAJOR.MINOR.PATCH"
//   cuda_version           CUDA runtime compiled against, "MAJOR.MINOR"
//   cudart_version         CUDART_VERSION, e.g. 13000
//   nvcc_version           "MAJOR.MINOR.BUILD"
//   cuda_archs             archs with device code, from nvcc's __CUDA_ARCH_LIST__: ["sm_80", ...]
//   torch_cuda_arch_list   TORCH_CUDA_ARCH_LIST at build time ("8.0;9.0", "9.0a", ...), or null
//   cxx_compiler           host compiler of this file
//   cxx_standard           __cplusplus
//   debug                  true unless NDEBUG
std::string build_info_json() {
  const int cudart = detail::cuda_runtime_version_compiled();
  std::vector<std::pair<std::string, std::string>> kv;
  kv.emplace_back("torch_version",
                  json_string(std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                              std::to_string(TORCH_VERSION_PATCH)));
  kv.emplace_back("cuda_version",
                  json_string(std::to_string(cudart / 1000) + "." + std::to_string((cudart % 1000) / 10)));
  kv.emplace_back("cudart_version", std::to_string(cudart));
  kv.emplace_back("nvcc_version", json_string(detail::nvcc_version()));
  kv.emplace_back("cuda_archs", json_arch_list(detail::cuda_arch_list_compiled()));
#if defined(R21D_TORCH_CUDA_ARCH_LIST)
  // setup.py passes TORCH_CUDA_ARCH_LIST with its separators turned into commas.
  std::string requested = R21D_STR(R21D_TORCH_CUDA_ARCH_LIST);
  for (char& c : requested) {
    if (c == ',') c = ';';
  }
  kv.emplace_back("torch_cuda_arch_list", json_string(requested));
#else
  kv.emplace_back("torch_cuda_arch_list", "null");
#endif
  kv.emplace_back("cxx_compiler", json_string(cxx_compiler()));
  kv.emplace_back("cxx_standard", std::to_string(__cplusplus));
#if defined(NDEBUG)
  kv.emplace_back("debug", "false");
#else
  kv.emplace_back("debug", "true");
#endif
  std::string out = "{";
  for (size_t i = 0; i < kv.size(); ++i) {
    out += (i ? ", " : "") + json_string(kv[i].first) + ": " + kv[i].second;
  }
  return out + "}";
}

}  // namespace r21d

// The namespace's single DEF block. Ops with tensor arguments get schemas here and
// CUDA kernels through TORCH_LIBRARY_IMPL(r21d, CUDA, m) in csrc/cuda/*.cu.
TORCH_LIBRARY(r21d, m) {
  // No tensor arguments: a catch-all (CompositeImplicitAutograd) kernel, so it runs
  // without any dispatch key, on any machine.
  m.def("build_info() -> str", &r21d::build_info_json);
  // Fused depthwise conv3d + BatchNorm3d + activation (csrc/cuda/depthwise3d_fwd.cu,
  // csrc/cuda/depthwise3d_bwd.cu; per-thread arithmetic in csrc/depthwise3d.h).
  // Forward returns (out, z, mean, invstd, new_running_mean, new_running_var).
  m.def(
      "depthwise3d_conv_bn_act(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor? running_mean, Tensor? running_var, Tensor? residual, int[] stride, int[] padding, "
      "int[] dilation, bool training, float momentum, float eps, str activation, bool save_for_backward) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Backward returns (dx, dweight, dbias, dbn_weight, dbn_bias, dresidual).
  m.def(
      "depthwise3d_conv_bn_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor z, "
      "Tensor mean, Tensor invstd, Tensor? bn_weight, Tensor? bn_bias, Tensor? residual, int[] stride, "
      "int[] padding, int[] dilation, bool training, str activation, bool[] output_mask, bool deterministic) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "r21d CUDA C++ extension (ops are under torch.ops.r21d)";
  m.def(
      "build_info", []() { return pybind11::module_::import("json").attr("loads")(r21d::build_info_json()); },
      "How r21d._C was built, as a dict (same content as torch.ops.r21d.build_info()).");
}
