// r21d: shared header of the CUDA C++ extension `r21d._C` (see docs/architecture.md, docs/testing.md).
//
// Conventions for every csrc kernel
// ---------------------------------
// * Namespace `r21d` (kernels and launchers), `r21d::detail` (helpers not part of any op).
// * Op schemas live in ONE place: `TORCH_LIBRARY(r21d, m)` in csrc/ops.cpp. Kernel files
//   register implementations with `TORCH_LIBRARY_IMPL(r21d, CUDA, m)`; Python registers
//   further ops into the same namespace with `torch.library.custom_op("r21d::...")`
//   (FRAGMENT libraries), which coexists with the DEF block in either import order.
// * One .cu per kernel family and pass (csrc/cuda/depthwise3d_fwd.cu, ..._bwd.cu, ...).
// * Launchers validate inputs with TORCH_CHECK in the op wrapper, set the device guard
//   (`c10::cuda::CUDAGuard`), and launch on the CURRENT stream,
//   `at::cuda::getCurrentCUDAStream()`, never the default stream, with no host sync
//   (no .item(), no cudaDeviceSynchronize) so ops are CUDA-graph safe. Every launch is
//   followed by `R21D_CHECK_LAUNCH()`.
// * Parameter structs (one per kernel family, passed by value to the kernel) hold sizes and
//   strides as int64_t, pointers as `const T*` / `T*`; 32-bit indexing only where a launcher
//   has checked that every index fits (`r21d::detail::fits_int32`).
// * Per-thread arithmetic and indexing go in `R21D_HOST_DEVICE` functions (inline, in
//   headers next to the kernel) so that a plain g++ CPU harness can run them over the whole
//   index space against the float64 oracle (docs/testing.md, Speed without a GPU). Keep the cooperative part
//   (shared-memory staging, barriers) thin. A harness compiles this header with
//   `-DR21D_CPU_HARNESS`, which drops every torch / CUDA runtime dependency.
// * r21d's own code is valid C++17 (it builds against older torch too), while the build uses
//   the standard torch's cpp_extension picks (C++20 with torch 2.14). Accumulate in float.
#pragma once

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define R21D_HOST_DEVICE __host__ __device__
#define R21D_DEVICE __device__
#define R21D_FORCEINLINE __forceinline__
#else
#define R21D_HOST_DEVICE
#define R21D_DEVICE
#define R21D_FORCEINLINE inline
#endif

#if !defined(R21D_CPU_HARNESS)
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

// Check the cudaError_t of a CUDA runtime call; throws a c10::Error (a Python
// RuntimeError) naming the call, the file and the line.
#define R21D_CHECK_CUDA(expr)                                                                                   \
  do {                                                                                                          \
    const cudaError_t r21d_err_ = (expr);                                                                       \
    TORCH_CHECK(r21d_err_ == cudaSuccess, "r21d: CUDA error in ", #expr, " at ", __FILE__, ":", __LINE__, ": ", \
                cudaGetErrorName(r21d_err_), ": ", cudaGetErrorString(r21d_err_));                              \
  } while (0)

// After every kernel launch: reports invalid launch configurations (too many threads,
// too much shared memory, ...) at the launch site. Does not synchronise.
#define R21D_CHECK_LAUNCH() R21D_CHECK_CUDA(cudaGetLastError())
#endif  // !R21D_CPU_HARNESS

namespace r21d {
namespace detail {

// True when every value in [0, n) fits a 32-bit signed index.
R21D_HOST_DEVICE R21D_FORCEINLINE bool fits_int32(int64_t n) { return n >= 0 && n <= int64_t(2147483647); }

// Ceiling division for grid sizes.
R21D_HOST_DEVICE R21D_FORCEINLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#if !defined(R21D_CPU_HARNESS)
// Build information compiled by nvcc (csrc/cuda/build_info.cu).
int cuda_runtime_version_compiled();    // CUDART_VERSION, e.g. 13000
std::string cuda_arch_list_compiled();  // __CUDA_ARCH_LIST__, e.g. "800,900"
std::string nvcc_version();             // e.g. "13.0.88"
#endif

}  // namespace detail
}  // namespace r21d
