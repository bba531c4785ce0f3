// r21d: fused depthwise conv3d + BatchNorm + activation, backward (op
// r21d::depthwise3d_conv_bn_act_backward, schema in csrc/ops.cpp).
//
// Kernels (per-thread arithmetic in csrc/depthwise3d.h; blocks as in the forward: (bx, by)
// with bx threads across channel vectors in channels_last_3d, VEC = 16 B / sizeof(T) with
// 128-bit loads, or bx = 1 and threads along W in NCDHW / any strides):
//   dw3d_bwd_reduce_kernel<T, VEC>   over output positions: g = dy * act'(pre); per-block
//       partial (sum_g, sum_gx, sum_(z-mean)) per channel (fixed-order tree); writes dres = g.
//   dw3d_bwd_finalize_kernel<T>      one thread per channel: sums the partials in block order;
//       dbn_weight, dbn_bias, dbias and the coefficient table dz = k_g g + k_z (z - mean) + k_0
//       (training; eval: dz = k_g g, see rebuild_dz).
//   dw3d_bwd_dx_kernel<T, VEC>       over input positions: transposed conv, input-centred:
//       for each tap, the output that reads this input, dz rebuilt there from dy, z, r.
//   dw3d_bwd_dw_kernel<T, VEC, TPT>  over output positions x TPT taps (grid.z = tap chunks):
//       dz once per position, then dz * x for each tap of the chunk in registers; block tree
//       reduction; per-block partials (deterministic) or fp32 atomicAdd.
//   dw3d_bwd_dw_finalize_kernel<T>   sums the dweight partials in block order, casts.
#include <torch/library.h>

#include "cuda/depthwise3d_common.cuh"

namespace r21d {
namespace dw3d {
namespace {

template <typename T, int VEC>
__device__ __forceinline__ void load_chan(const Params<T>& p, bool active, int64_t c0, ChanBwd (&cb)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    if (active) {
      cb[v] = load_chan_bwd(p.mean, p.invstd, p.bn_weight, p.bn_bias, p.coef, c0 + v);
    } else {
      cb[v] = ChanBwd{0.f, 0.f, 1.f, 0.f, Coef{0.f, 0.f, 0.f}};
    }
  }
}

// dz of VEC channels at output (n, c0.., to, ho, wo).
template <typename T, int VEC>
__device__ __forceinline__ void dz_at(const Params<T>& p, const ChanBwd (&cb)[VEC], int64_t n, int64_t c0, int64_t to,
                                      int64_t ho, int64_t wo, float (&dz)[VEC]) {
  float dy[VEC], z[VEC], r[VEC];
  load_vec<T, VEC>(p.dy + offset(p.sdy, n, c0, to, ho, wo), dy);
  load_vec<T, VEC>(p.z + offset(p.sz, n, c0, to, ho, wo), z);
  if (p.res != nullptr) {
    load_vec<T, VEC>(p.res + offset(p.sr, n, c0, to, ho, wo), r);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) r[v] = 0.f;
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) dz[v] = rebuild_dz(dy[v], z[v], r[v], cb[v], p.act, p.train);
}

template <typename T, int VEC>
__global__ void dw3d_bwd_reduce_kernel(const Params<T> p) {
  extern __shared__ float smem[];
  const Geom g = p.g;
  const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cv < g.C / VEC;
  const int64_t c0 = cv * VEC;
  const int64_t P = out_positions(g);
  ChanBwd cb[VEC];
  load_chan<T, VEC>(p, active, c0, cb);
  float s[3 * VEC];
#pragma unroll
  for (int i = 0; i < 3 * VEC; ++i) s[i] = 0.f;
  if (active) {
    for (int64_t pos = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; pos < P;
         pos += int64_t(gridDim.y) * blockDim.y) {
      const Pos q = decompose(pos, g.eo);
      float dy[VEC], z[VEC], r[VEC], gg[VEC];
      load_vec<T, VEC>(p.dy + offset(p.sdy, q.n, c0, q.t, q.h, q.w), dy);
      load_vec<T, VEC>(p.z + offset(p.sz, q.n, c0, q.t, q.h, q.w), z);
      if (p.res != nullptr) {
        load_vec<T, VEC>(p.res + offset(p.sr, q.n, c0, q.t, q.h, q.w), r);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) r[v] = 0.f;
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float zc = z[v] - cb[v].mean;
        float xhat;
        gg[v] = bwd_g(dy[v], zc, cb[v].invstd, cb[v].bn_weight, cb[v].bn_bias, r[v], p.act, xhat);
        s[3 * v] += gg[v];
        s[3 * v + 1] += gg[v] * xhat;
        s[3 * v + 2] += zc;
      }
      if (p.dres != nullptr) store_vec<T, VEC>(p.dres + offset(p.sdres, q.n, c0, q.t, q.h, q.w), gg);
    }
  }
  block_reduce_y<3 * VEC>(smem, s, SumCombine<3 * VEC>());
  if (active && threadIdx.y == 0 && p.partial != nullptr) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      float* o = p.partial + (int64_t(blockIdx.y) * g.C + c0 + v) * 3;
      o[0] = s[3 * v];
      o[1] = s[3 * v + 1];
      o[2] = s[3 * v + 2];
    }
  }
}

template <typename T>
__global__ void dw3d_bwd_finalize_kernel(const float* __restrict__ partial, int64_t nb, int64_t C, int64_t M,
                                         bool train, const float* __restrict__ mean, const float* __restrict__ invstd,
                                         const float* __restrict__ bn_weight, float* coef, float* dbn_weight,
                                         float* dbn_bias, T* dbias) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  bwd_finalize_channel<T>(partial, nb, C, c, M, train, mean, invstd, bn_weight, coef, dbn_weight, dbn_bias, dbias);
}

template <typename T, int VEC>
__global__ void dw3d_bwd_dx_kernel(const Params<T> p) {
  const Geom g = p.g;
  const int KK = taps(g);
  const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= g.C / VEC) return;
  const int64_t c0 = cv * VEC;
  const int64_t P = in_positions(g);
  ChanBwd cb[VEC];
  load_chan<T, VEC>(p, true, c0, cb);
  const T* __restrict__ wb = p.w + c0 * KK;
  for (int64_t pos = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; pos < P; pos += int64_t(gridDim.y) * blockDim.y) {
    const Pos q = decompose(pos, g.ei);
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
    // for_each_out_of_in (depthwise3d.h) written out: a lambda body this large was not
    // inlined (stack frame) for VEC = 8.
    for (int a = 0; a < g.kt; ++a) {
      int64_t to;
      if (!out_of_in(q.t, a, g.st, g.pt, g.dt, g.To, to)) continue;
      for (int b = 0; b < g.kh; ++b) {
        int64_t ho;
        if (!out_of_in(q.h, b, g.sh, g.ph, g.dh, g.Ho, ho)) continue;
        for (int c = 0; c < g.kw; ++c) {
          int64_t wo;
          if (!out_of_in(q.w, c, g.sw, g.pw, g.dw, g.Wo, wo)) continue;
          const int tap = (a * g.kh + b) * g.kw + c;
          float dz[VEC];
          dz_at<T, VEC>(p, cb, q.n, c0, to, ho, wo, dz);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[v] += dz[v] * static_cast<float>(wb[v * KK + tap]);
        }
      }
    }
    store_vec<T, VEC>(p.dx + offset(p.sdx, q.n, c0, q.t, q.h, q.w), acc);
  }
}

template <typename T, int VEC, int TPT>
__global__ void dw3d_bwd_dw_kernel(const Params<T> p) {
  extern __shared__ float smem[];
  const Geom g = p.g;
  const int KK = taps(g);
  const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cv < g.C / VEC;
  const int64_t c0 = cv * VEC;
  const int64_t P = out_positions(g);
  const int tap0 = blockIdx.z * TPT;
  ChanBwd cb[VEC];
  load_chan<T, VEC>(p, active, c0, cb);
  // tap coordinates of the chunk (small ints, computed once)
  int ka[TPT], kb[TPT], kc[TPT];
#pragma unroll
  for (int j = 0; j < TPT; ++j) tap_coords(g, tap0 + j < KK ? tap0 + j : 0, ka[j], kb[j], kc[j]);
  float acc[TPT * VEC];
#pragma unroll
  for (int i = 0; i < TPT * VEC; ++i) acc[i] = 0.f;
  if (active) {
    for (int64_t pos = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; pos < P;
         pos += int64_t(gridDim.y) * blockDim.y) {
      const Pos q = decompose(pos, g.eo);
      float dz[VEC];
      dz_at<T, VEC>(p, cb, q.n, c0, q.t, q.h, q.w, dz);
      const T* __restrict__ xb = p.x + q.n * p.sx.n + c0 * p.sx.c;
#pragma unroll
      for (int j = 0; j < TPT; ++j) {
        int64_t ti, hi, wi;
        if (tap0 + j < KK && tap_input(g, q.t, q.h, q.w, ka[j], kb[j], kc[j], ti, hi, wi)) {
          float xv[VEC];
          load_vec<T, VEC>(xb + ti * p.sx.t + hi * p.sx.h + wi * p.sx.w, xv);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[j * VEC + v] += dz[v] * xv[v];
        }
      }
    }
  }
  block_reduce_y<TPT * VEC>(smem, acc, SumCombine<TPT * VEC>());
  if (active && threadIdx.y == 0) {
    const int64_t CKK = g.C * KK;
#pragma unroll
    for (int j = 0; j < TPT; ++j) {
      if (tap0 + j >= KK) continue;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int64_t i = (c0 + v) * KK + tap0 + j;
        if (p.partial != nullptr) {
          p.partial[int64_t(blockIdx.y) * CKK + i] = acc[j * VEC + v];
        } else {
          atomicAdd(p.dw_acc + i, acc[j * VEC + v]);
        }
      }
    }
  }
}

template <typename T>
__global__ void dw3d_bwd_dw_finalize_kernel(const float* __restrict__ partial, int64_t nb, int64_t CKK, T* dweight) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= CKK) return;
  dweight[i] = static_cast<T>(sum_dw_partials(partial, nb, CKK, i));
}

template <typename T, int VEC>
void launch_reduce(const Params<T>& p, const Launch& l, cudaStream_t stream) {
  const size_t smem = size_t(l.block.x) * l.block.y * 3 * VEC * sizeof(float);
  dw3d_bwd_reduce_kernel<T, VEC><<<l.grid, l.block, smem, stream>>>(p);
  R21D_CHECK_LAUNCH();
}

template <typename T, int VEC>
void launch_dx(const Params<T>& p, const Launch& l, cudaStream_t stream) {
  dw3d_bwd_dx_kernel<T, VEC><<<l.grid, l.block, 0, stream>>>(p);
  R21D_CHECK_LAUNCH();
}

template <typename T, int VEC>
void launch_dw(const Params<T>& p, Launch l, int KK, cudaStream_t stream) {
  constexpr int TPT = DwTaps<VEC>::value;
  l.grid.z = static_cast<unsigned>(detail::ceil_div(KK, TPT));
  const size_t smem = size_t(l.block.x) * l.block.y * TPT * VEC * sizeof(float);
  dw3d_bwd_dw_kernel<T, VEC, TPT><<<l.grid, l.block, smem, stream>>>(p);
  R21D_CHECK_LAUNCH();
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads depthwise3d_conv_bn_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& z, const at::Tensor& mean, const at::Tensor& invstd, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool training, c10::string_view activation,
    const c10::List<bool>& output_mask, bool deterministic) {
  const Geom g = check_geometry(x, weight, bias, stride, padding, dilation);
  const int act = parse_activation(std::string(activation));
  TORCH_CHECK(output_mask.size() == 6,
              "r21d depthwise3d backward: output_mask must have 6 entries (dx, dweight, dbias, dbn_weight, dbn_bias, "
              "dresidual), got ",
              output_mask.size());
  check_out_shaped(grad_out, "grad_out", g, x);
  check_out_shaped(z, "z", g, x);
  check_float_vec(mean, "mean", x, g.C);
  check_float_vec(invstd, "invstd", x, g.C);
  check_float_vec(bn_weight, "bn_weight", x, g.C);
  check_float_vec(bn_bias, "bn_bias", x, g.C);
  if (present(residual)) check_out_shaped(*residual, "residual", g, x);

  c10::cuda::CUDAGuard guard(x.device());
  const bool want_dx = output_mask[0];
  const bool want_dw = output_mask[1];
  const bool want_db = output_mask[2] && present(bias);
  const bool want_dbn_weight = output_mask[3] && present(bn_weight);
  const bool want_dbn_bias = output_mask[4] && present(bn_bias);
  const bool want_dres = output_mask[5] && present(residual);
  const auto fopts = x.options().dtype(at::kFloat);

  const int64_t P = out_positions(g);
  if (P == 0 || g.C == 0) {
    return Grads(want_dx ? at::zeros_like(x) : x.new_empty({0}), want_dw ? at::zeros_like(weight) : x.new_empty({0}),
                 want_db ? at::zeros_like(*bias) : x.new_empty({0}),
                 want_dbn_weight ? at::zeros_like(*bn_weight) : x.new_empty({0}),
                 want_dbn_bias ? at::zeros_like(*bn_bias) : x.new_empty({0}),
                 want_dres ? at::zeros_like(*residual) : x.new_empty({0}));
  }

  at::Tensor dx = want_dx ? empty_like_format(x.sizes(), x, x.options()) : x.new_empty({0});
  at::Tensor dweight = want_dw ? at::empty(weight.sizes(), weight.options()) : x.new_empty({0});
  at::Tensor dbias = want_db ? at::empty({g.C}, bias->options()) : x.new_empty({0});
  at::Tensor dbn_weight = want_dbn_weight ? at::empty({g.C}, fopts) : x.new_empty({0});
  at::Tensor dbn_bias = want_dbn_bias ? at::empty({g.C}, fopts) : x.new_empty({0});
  at::Tensor dres = want_dres ? empty_like_format(residual->sizes(), *residual, residual->options()) : x.new_empty({0});

  const bool need_sums = want_db || want_dbn_weight || want_dbn_bias || (training && (want_dx || want_dw));
  const bool need_coef = want_dx || want_dw || want_db || want_dbn_weight || want_dbn_bias;
  const bool run_reduce = need_sums || want_dres;

  const at::Tensor w = weight.contiguous();
  const at::Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const at::Tensor bn_weight_c = present(bn_weight) ? bn_weight->contiguous() : at::Tensor();
  const at::Tensor bn_bias_c = present(bn_bias) ? bn_bias->contiguous() : at::Tensor();
  const at::Tensor r = present(residual) ? *residual : at::Tensor();
  const bool cl = is_channels_last(x);
  const int KK = taps(g);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());

  R21D_DW3D_DISPATCH(x.scalar_type(), "depthwise3d_conv_bn_act_backward", [&] {
    using T = scalar_t;
    constexpr int V = vec_of<T>();
    const bool vec_common = cl && g.C % V == 0 && vec_ok(grad_out, V) && vec_ok(z, V) && vec_ok(r, V);
    Params<T> p{};
    p.g = g;
    p.x = x.data_ptr<T>();
    p.sx = strides_of(x);
    p.w = w.data_ptr<T>();
    p.bn_weight = bn_weight_c.defined() ? bn_weight_c.data_ptr<float>() : nullptr;
    p.bn_bias = bn_bias_c.defined() ? bn_bias_c.data_ptr<float>() : nullptr;
    p.res = r.defined() ? r.data_ptr<T>() : nullptr;
    p.sr = r.defined() ? strides_of(r) : Strides5{0, 0, 0, 0, 0};
    p.z = const_cast<T*>(z.data_ptr<T>());
    p.sz = strides_of(z);
    p.dy = grad_out.data_ptr<T>();
    p.sdy = strides_of(grad_out);
    p.mean = const_cast<float*>(mean_c.data_ptr<float>());
    p.invstd = const_cast<float*>(invstd_c.data_ptr<float>());
    p.eps = 0.f;
    p.act = act;
    p.train = training;

    // 1. sums (and dres)
    at::Tensor sums;
    int64_t nb = 0;
    if (run_reduce) {
      const bool vec = vec_common && vec_ok(dres, V);
      const Launch l = make_launch(g.C, vec ? V : 1, cl, P, 2048);
      nb = l.chunks;
      sums = at::empty({nb, g.C, 3}, fopts);
      Params<T> q = p;
      q.partial = sums.data_ptr<float>();
      q.dres = want_dres ? dres.data_ptr<T>() : nullptr;
      q.sdres = want_dres ? strides_of(dres) : Strides5{0, 0, 0, 0, 0};
      if (vec) {
        launch_reduce<T, V>(q, l, stream);
      } else {
        launch_reduce<T, 1>(q, l, stream);
      }
    }
    if (!need_coef) return;
    // 2. coefficient table, dbn_weight, dbn_bias, dbias
    at::Tensor coef = at::empty({g.C, 3}, fopts);
    {
      const int threads = 128;
      dw3d_bwd_finalize_kernel<T><<<unsigned(detail::ceil_div(g.C, threads)), threads, 0, stream>>>(
          need_sums ? sums.data_ptr<float>() : nullptr, nb, g.C, P, training, mean_c.data_ptr<float>(),
          invstd_c.data_ptr<float>(), p.bn_weight, coef.data_ptr<float>(),
          want_dbn_weight ? dbn_weight.data_ptr<float>() : nullptr,
          want_dbn_bias ? dbn_bias.data_ptr<float>() : nullptr, want_db ? dbias.data_ptr<T>() : nullptr);
      R21D_CHECK_LAUNCH();
    }
    p.coef = coef.data_ptr<float>();
    // 3. dx
    if (want_dx) {
      const bool vec = vec_common && vec_ok(x, V) && vec_ok(dx, V);
      const Launch l = make_launch(g.C, vec ? V : 1, cl, in_positions(g), 16384);
      Params<T> q = p;
      q.dx = dx.data_ptr<T>();
      q.sdx = strides_of(dx);
      if (vec) {
        launch_dx<T, V>(q, l, stream);
      } else {
        launch_dx<T, 1>(q, l, stream);
      }
    }
    // 4. dweight
    if (want_dw) {
      const bool vec = vec_common && vec_ok(x, V);
      const int vv = vec ? V : 1;
      const int tpt = vec ? DwTaps<V>::value : DwTaps<1>::value;
      const int64_t tap_chunks = detail::ceil_div(KK, tpt);
      const int64_t CKK = g.C * KK;
      // partial buffer at most ~16M floats (64 MB)
      const int64_t max_chunks = deterministic ? std::max<int64_t>(1, (int64_t(1) << 24) / CKK) : 65535;
      const Launch l = make_launch(g.C, vv, cl, P, std::max<int64_t>(1, 2048 / tap_chunks), max_chunks);
      at::Tensor buf;
      Params<T> q = p;
      if (deterministic) {
        buf = at::empty({l.chunks, CKK}, fopts);
        q.partial = buf.data_ptr<float>();
      } else {
        buf = at::zeros({CKK}, fopts);
        q.partial = nullptr;
        q.dw_acc = buf.data_ptr<float>();
      }
      if (vec) {
        launch_dw<T, V>(q, l, KK, stream);
      } else {
        launch_dw<T, 1>(q, l, KK, stream);
      }
      const int threads = 256;
      dw3d_bwd_dw_finalize_kernel<T><<<unsigned(detail::ceil_div(CKK, threads)), threads, 0, stream>>>(
          buf.data_ptr<float>(), deterministic ? l.chunks : 1, CKK, dweight.data_ptr<T>());
      R21D_CHECK_LAUNCH();
    }
  });
  return Grads(dx, dweight, dbias, dbn_weight, dbn_bias, dres);
}

}  // namespace
}  // namespace dw3d
}  // namespace r21d

TORCH_LIBRARY_IMPL(r21d, CUDA, m) {
  m.impl("depthwise3d_conv_bn_act_backward", &r21d::dw3d::depthwise3d_conv_bn_act_backward_cuda);
}
