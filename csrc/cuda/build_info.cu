// CUDA side of r21d._C's build information. nvcc compiles this translation unit once
// for the host and once per architecture in TORCH_CUDA_ARCH_LIST (the device passes are
// empty until the first kernels arrive), so the .so carries one cubin per arch, which
// `cuobjdump --list-elf` shows.
#include <cuda_runtime_api.h>

#include <string>

#include "../r21d.h"

#define R21D_STR_(...) #__VA_ARGS__
#define R21D_STR(...) R21D_STR_(__VA_ARGS__)

namespace r21d {
namespace detail {

int cuda_runtime_version_compiled() { return CUDART_VERSION; }

std::string cuda_arch_list_compiled() {
#if defined(__CUDA_ARCH_LIST__)
  // nvcc (>= 11.5) defines it in every pass as the virtual archs compiled for, e.g.
  // 800,900 (an arch-specific target such as sm_90a also shows as 900).
  return R21D_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

std::string nvcc_version() {
  return std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__) + "." +
         std::to_string(__CUDACC_VER_BUILD__);
}

}  // namespace detail
}  // namespace r21d
