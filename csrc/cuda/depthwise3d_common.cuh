// r21d: device helpers (vector loads, block reductions) and host helpers (argument checks,
// launch shapes) shared by csrc/cuda/depthwise3d_fwd.cu and csrc/cuda/depthwise3d_bwd.cu.
// Per-thread arithmetic lives in csrc/depthwise3d.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // (ATen/cuda/CUDAContext.h needs cusparse.h, absent from this toolkit)

#include <algorithm>
#include <string>
#include <vector>

#include "depthwise3d.h"
#include "r21d.h"

namespace r21d {
namespace dw3d {

constexpr int kThreads = 256;

// ------------------------------------------------------------------ device helpers

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// VEC consecutive channels at p (VEC > 1: channel stride 1 and 16-byte aligned, checked by
// the launcher) -> float.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<float>(p[0]);
  } else {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = static_cast<float>(pk.v[v]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = static_cast<T>(in[0]);
  } else {
    // One st.global.v4 (STG.E.128). A plain 16-byte struct store was split into scalar STG
    // by nvcc 13.0 inside these kernels (the vectorizer gave up), hence the PTX.
    static_assert(sizeof(T) * VEC == 16, "vector stores move 16 bytes");
    T tmp[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) tmp[v] = static_cast<T>(in[v]);
    uint32_t u[4];
    memcpy(u, tmp, 16);
    const size_t gaddr = __cvta_generic_to_global(p);
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(gaddr), "r"(u[0]), "r"(u[1]), "r"(u[2]), "r"(u[3])
                 : "memory");
  }
}

// Tree reduction over threadIdx.y (blockDim.y a power of two) of NV floats per thread, in a
// fixed order (deterministic). smem holds blockDim.x * blockDim.y * NV floats. The result
// is valid in the threads with threadIdx.y == 0. Every thread of the block must call it.
template <int NV, class Combine>
__device__ __forceinline__ void block_reduce_y(float* smem, float (&v)[NV], Combine comb) {
  const int slot = (threadIdx.y * blockDim.x + threadIdx.x) * NV;
#pragma unroll
  for (int i = 0; i < NV; ++i) smem[slot + i] = v[i];
  __syncthreads();
  for (int s = blockDim.y / 2; s > 0; s >>= 1) {
    if (threadIdx.y < s) {
      comb(v, smem + slot + s * blockDim.x * NV);
#pragma unroll
      for (int i = 0; i < NV; ++i) smem[slot + i] = v[i];
    }
    __syncthreads();
  }
}

template <int NV>
struct SumCombine {
  __device__ __forceinline__ void operator()(float (&v)[NV], const float* o) const {
#pragma unroll
    for (int i = 0; i < NV; ++i) v[i] += o[i];
  }
};

// v holds NV / 3 Welford triples (n, mean, m2).
template <int NV>
struct WelfordCombine {
  __device__ __forceinline__ void operator()(float (&v)[NV], const float* o) const {
#pragma unroll
    for (int i = 0; i < NV; i += 3) {
      const Welford a = {v[i], v[i + 1], v[i + 2]};
      const Welford b = {o[i], o[i + 1], o[i + 2]};
      const Welford r = chan_merge(a, b);
      v[i] = r.n;
      v[i + 1] = r.mean;
      v[i + 2] = r.m2;
    }
  }
};

// ------------------------------------------------------------------ host helpers

inline Strides5 strides_of(const at::Tensor& t) {
  Strides5 s;
  s.n = t.stride(0);
  s.c = t.stride(1);
  s.t = t.stride(2);
  s.h = t.stride(3);
  s.w = t.stride(4);
  return s;
}

// channels_last_3d when x.stride(1) == 1 and x is not plain contiguous, else NCDHW.
inline bool is_channels_last(const at::Tensor& x) { return x.stride(1) == 1 && !x.is_contiguous(); }

inline at::Tensor empty_like_format(at::IntArrayRef shape, const at::Tensor& like_format, at::TensorOptions opts) {
  return at::empty(shape, opts.memory_format(is_channels_last(like_format) ? at::MemoryFormat::ChannelsLast3d
                                                                           : at::MemoryFormat::Contiguous));
}

// A tensor can be moved VEC channels at a time: channel stride 1, every other stride a
// multiple of VEC, 16-byte aligned data (the C % VEC condition is checked by the caller).
inline bool vec_ok(const at::Tensor& t, int vec) {
  if (!t.defined()) return true;
  if (t.numel() == 0) return true;
  if (t.stride(1) != 1 && t.size(1) > 1) return false;
  for (int d : {0, 2, 3, 4}) {
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  }
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline int parse_activation(const std::string& a) {
  if (a == "relu") return kActRelu;
  if (a == "silu") return kActSilu;
  if (a == "none" || a.empty()) return kActNone;
  TORCH_CHECK(false, "r21d depthwise3d: activation must be 'relu', 'silu' or 'none', got '", a, "'");
  return kActNone;
}

inline std::vector<int64_t> triple(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 3 || v.size() == 1, "r21d depthwise3d: ", name, " must have 1 or 3 elements, got ", v.size());
  if (v.size() == 1) return {v[0], v[0], v[0]};
  return {v[0], v[1], v[2]};
}

inline void check_float_vec(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& x, int64_t C) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat, "r21d depthwise3d: ", name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->device() == x.device(), "r21d depthwise3d: ", name, " must be on ", x.device(), ", got ", t->device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "r21d depthwise3d: ", name, " must have shape (", C, "), got ",
              t->sizes());
}

inline bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Checks x / weight / bias and the geometry; returns the geometry.
inline Geom check_geometry(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.is_cuda(), "r21d depthwise3d: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 5, "r21d depthwise3d: x must have rank 5 (N, C, T, H, W), got rank ", x.dim());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "r21d depthwise3d: x must be float32, float16 or bfloat16, got ", st);
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 5 && weight.size(0) == C && weight.size(1) == 1,
              "r21d depthwise3d: weight must be a depthwise weight of shape (C, 1, KT, KH, KW) with C = ", C, ", got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == st, "r21d depthwise3d: weight must have the dtype of x (", st, "), got ",
              weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "r21d depthwise3d: weight must be on ", x.device(), ", got ",
              weight.device());
  if (present(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C, "r21d depthwise3d: bias must have shape (", C, "), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == st, "r21d depthwise3d: bias must have the dtype of x (", st, "), got ",
                bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), "r21d depthwise3d: bias must be on ", x.device());
  }
  const auto s = triple(stride, "stride");
  const auto p = triple(padding, "padding");
  const auto d = triple(dilation, "dilation");
  const char* dims[3] = {"T", "H", "W"};
  int64_t out[3];
  for (int i = 0; i < 3; ++i) {
    const int64_t k = weight.size(2 + i);
    TORCH_CHECK(k >= 1 && k <= 7, "r21d depthwise3d: kernel size must be in 1..7, got ", k, " along ", dims[i]);
    TORCH_CHECK(s[i] == 1 || s[i] == 2, "r21d depthwise3d: stride must be 1 or 2, got ", s[i], " along ", dims[i]);
    TORCH_CHECK(d[i] >= 1 && d[i] <= 3, "r21d depthwise3d: dilation must be in 1..3, got ", d[i], " along ", dims[i]);
    TORCH_CHECK(p[i] >= 0 && p[i] <= (1 << 20), "r21d depthwise3d: padding must be >= 0, got ", p[i], " along ",
                dims[i]);
    out[i] = out_size(x.size(2 + i), k, s[i], p[i], d[i]);
    TORCH_CHECK(out[i] >= 1, "r21d depthwise3d: output size along ", dims[i], " must be >= 1 (input ", x.size(2 + i),
                ", kernel ", k, ", stride ", s[i], ", padding ", p[i], ", dilation ", d[i], ")");
  }
  Geom g;
  g.N = x.size(0);
  g.C = C;
  g.T = x.size(2);
  g.H = x.size(3);
  g.W = x.size(4);
  g.To = out[0];
  g.Ho = out[1];
  g.Wo = out[2];
  g.kt = int(weight.size(2));
  g.kh = int(weight.size(3));
  g.kw = int(weight.size(4));
  g.st = int(s[0]);
  g.sh = int(s[1]);
  g.sw = int(s[2]);
  g.pt = int(p[0]);
  g.ph = int(p[1]);
  g.pw = int(p[2]);
  g.dt = int(d[0]);
  g.dh = int(d[1]);
  g.dw = int(d[2]);
  set_extents(g);
  return g;
}

inline void check_out_shaped(const at::Tensor& t, const char* name, const Geom& g, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 5 && t.size(0) == g.N && t.size(1) == g.C && t.size(2) == g.To && t.size(3) == g.Ho &&
                  t.size(4) == g.Wo,
              "r21d depthwise3d: ", name, " must have the output shape (", g.N, ", ", g.C, ", ", g.To, ", ", g.Ho, ", ",
              g.Wo, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "r21d depthwise3d: ", name, " must have the dtype of x (",
              x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "r21d depthwise3d: ", name, " must be on ", x.device(), ", got ", t.device());
}

// Launch shape: blockDim = (bx, by) with bx * by = kThreads (both powers of two); bx threads
// across channel vectors (channels-last) or bx = 1 (one channel per block, threads along
// positions: coalesced in NCDHW). grid = (channel groups, position chunks[, tap chunks]).
struct Launch {
  dim3 block, grid;
  int64_t chunks;  // gridDim.y
};

inline Launch make_launch(int64_t C, int vec, bool channels_fast, int64_t positions, int64_t target_blocks,
                          int64_t max_chunks = 65535) {
  const int64_t cv = C / vec;
  int bx = 1;
  if (channels_fast) {
    while (bx * 2 <= 32 && bx * 2 <= cv) bx *= 2;
  }
  const int by = kThreads / bx;
  const int64_t groups = detail::ceil_div(cv, bx);
  int64_t chunks = std::max<int64_t>(1, detail::ceil_div(positions, by));
  const int64_t budget = std::max<int64_t>(1, target_blocks / std::max<int64_t>(1, groups));
  chunks = std::min<int64_t>(chunks, std::min<int64_t>(std::max<int64_t>(1, std::min(budget, max_chunks)), 65535));
  Launch l;
  l.block = dim3(bx, by, 1);
  l.grid = dim3(static_cast<unsigned>(groups), static_cast<unsigned>(chunks), 1);
  l.chunks = chunks;
  return l;
}

// float32 / float16 / bfloat16 only (no double instantiations).
// clang-format off: one dispatch case per dtype (clang-format packs and staircases them)
#define R21D_DW3D_DISPATCH(TYPE, NAME, ...)                       \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
// clang-format on

template <typename T>
constexpr int vec_of() {
  return static_cast<int>(16 / sizeof(T));
}

}  // namespace dw3d
}  // namespace r21d
