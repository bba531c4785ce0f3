// r21d: fused depthwise conv3d + BatchNorm + activation, forward (op
// r21d::depthwise3d_conv_bn_act, schema in csrc/ops.cpp).
//
// Kernels (per-thread arithmetic in csrc/depthwise3d.h):
//   dw3d_fwd_kernel<T, VEC, MODE>  one thread = VEC channels x a grid-stride run of output
//     positions; block (bx, by): bx threads across channel vectors (channels_last_3d, VEC =
//     16 bytes / sizeof(T), 128-bit loads/stores) or bx = 1 (one channel per block, threads
//     along W: coalesced in NCDHW and any other strides). MODE:
//       kEval   one launch: BN folded into per-thread scale/shift from the running stats
//               (and mean/invstd written by the first chunk when asked), out (+ z) written.
//       kStats  train pass 1: the conv, per-thread Welford, block Chan merge in fixed order,
//               per-block partial (n, mean, M2) per channel; z is not written.
//       kApply  train pass 2: recompute the conv, normalise with the batch stats, write out
//               (+ z).
//   dw3d_stats_finalize_kernel  one thread per channel: merges the partials in block order
//     (deterministic), writes mean, invstd and the new running stats.
#include <torch/library.h>

#include "cuda/depthwise3d_common.cuh"

namespace r21d {
namespace dw3d {
namespace {

constexpr int kEval = 0;
constexpr int kStats = 1;
constexpr int kApply = 2;

template <typename T, int VEC, int MODE>
__global__ void dw3d_fwd_kernel(const Params<T> p) {
  extern __shared__ float smem[];
  const Geom g = p.g;
  const int KK = taps(g);
  const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cv < g.C / VEC;
  const int64_t c0 = cv * VEC;
  const int64_t P = out_positions(g);

  float scale[VEC], shift[VEC], bias[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    scale[v] = 1.f;
    shift[v] = 0.f;
    bias[v] = 0.f;
  }
  if (active) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int64_t c = c0 + v;
      bias[v] = p.bias ? static_cast<float>(p.bias[c]) : 0.f;
      if (MODE == kEval) {
        const float m = p.rmean[c];
        const float inv = invstd_of(p.rvar[c], p.eps);
        if (p.mean != nullptr && blockIdx.y == 0 && threadIdx.y == 0) {
          p.mean[c] = m;
          p.invstd[c] = inv;
        }
        const Affine a = bn_fold(m, inv, p.bn_weight, p.bn_bias, c, bias[v]);
        scale[v] = a.scale;
        shift[v] = a.shift;
      } else if (MODE == kApply) {
        const Affine a = bn_fold(p.mean[c], p.invstd[c], p.bn_weight, p.bn_bias, c, bias[v]);
        scale[v] = a.scale;
        shift[v] = a.shift;
      }
    }
  }

  float wf[MODE == kStats ? 3 * VEC : 1];
#pragma unroll
  for (int i = 0; i < (MODE == kStats ? 3 * VEC : 1); ++i) wf[i] = 0.f;

  if (active) {
    const T* __restrict__ wb = p.w + c0 * KK;
    for (int64_t pos = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; pos < P;
         pos += int64_t(gridDim.y) * blockDim.y) {
      const Pos q = decompose(pos, g.eo);
      const T* __restrict__ xb = p.x + q.n * p.sx.n + c0 * p.sx.c;
      float acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
      for_each_tap(g, q.t, q.h, q.w, [&](int tap, int64_t ti, int64_t hi, int64_t wi) {
        float xv[VEC];
        load_vec<T, VEC>(xb + ti * p.sx.t + hi * p.sx.h + wi * p.sx.w, xv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] += xv[v] * static_cast<float>(wb[v * KK + tap]);
      });
      if constexpr (MODE == kStats) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          Welford w = {wf[3 * v], wf[3 * v + 1], wf[3 * v + 2]};
          welford_push(w, acc[v] + bias[v]);
          wf[3 * v] = w.n;
          wf[3 * v + 1] = w.mean;
          wf[3 * v + 2] = w.m2;
        }
      } else {
        float r[VEC];
        if (p.res != nullptr) {
          load_vec<T, VEC>(p.res + offset(p.sr, q.n, c0, q.t, q.h, q.w), r);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) r[v] = 0.f;
        }
        float y[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) y[v] = act_fwd(acc[v] * scale[v] + shift[v] + r[v], p.act);
        store_vec<T, VEC>(p.out + offset(p.so, q.n, c0, q.t, q.h, q.w), y);
        if (p.z != nullptr) {
          float zv[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) zv[v] = acc[v] + bias[v];
          store_vec<T, VEC>(p.z + offset(p.sz, q.n, c0, q.t, q.h, q.w), zv);
        }
      }
    }
  }

  if constexpr (MODE == kStats) {
    block_reduce_y<3 * VEC>(smem, wf, WelfordCombine<3 * VEC>());
    if (active && threadIdx.y == 0) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float* q = p.partial + (int64_t(blockIdx.y) * g.C + c0 + v) * 3;
        q[0] = wf[3 * v];
        q[1] = wf[3 * v + 1];
        q[2] = wf[3 * v + 2];
      }
    }
  }
}

__global__ void dw3d_stats_finalize_kernel(const float* __restrict__ partial, int64_t nb, int64_t C, int64_t M,
                                           float eps, float momentum, const float* __restrict__ rmean,
                                           const float* __restrict__ rvar, float* mean, float* invstd, float* new_rmean,
                                           float* new_rvar) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  fwd_finalize_channel(partial, nb, C, c, M, eps, momentum, rmean, rvar, mean, invstd, new_rmean, new_rvar);
}

template <typename T, int VEC, int MODE>
void launch_fwd(const Params<T>& p, const Launch& l, cudaStream_t stream) {
  const size_t smem = MODE == kStats ? size_t(l.block.x) * l.block.y * 3 * VEC * sizeof(float) : 0;
  dw3d_fwd_kernel<T, VEC, MODE><<<l.grid, l.block, smem, stream>>>(p);
  R21D_CHECK_LAUNCH();
}

template <typename T, int MODE>
void launch_fwd_any(const Params<T>& p, bool vec, const Launch& lv, const Launch& l1, cudaStream_t stream) {
  if (vec) {
    launch_fwd<T, vec_of<T>(), MODE>(p, lv, stream);
  } else {
    launch_fwd<T, 1, MODE>(p, l1, stream);
  }
}

template <typename T>
void run_forward(Params<T> p, bool training, bool vec, bool channels_last, float momentum, at::Tensor& partial,
                 float* new_rmean, float* new_rvar, const at::TensorOptions& fopts, cudaStream_t stream) {
  const Geom g = p.g;
  const int64_t P = out_positions(g);
  const int V = vec_of<T>();
  // eval / apply: up to ~16k blocks; stats: up to ~2k partial blocks in all.
  const Launch lv = make_launch(g.C, V, true, P, training ? 2048 : 16384);
  const Launch l1 = make_launch(g.C, 1, channels_last, P, training ? 2048 : 16384);
  if (!training) {
    launch_fwd_any<T, kEval>(p, vec, lv, l1, stream);
    return;
  }
  const Launch& l = vec ? lv : l1;
  partial = at::empty({l.chunks, g.C, 3}, fopts);
  p.partial = partial.data_ptr<float>();
  launch_fwd_any<T, kStats>(p, vec, lv, l1, stream);
  const int threads = 128;
  dw3d_stats_finalize_kernel<<<unsigned(detail::ceil_div(g.C, threads)), threads, 0, stream>>>(
      p.partial, l.chunks, g.C, P, p.eps, momentum, p.rmean, p.rvar, p.mean, p.invstd, new_rmean, new_rvar);
  R21D_CHECK_LAUNCH();
  launch_fwd_any<T, kApply>(p, vec, lv, l1, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise3d_conv_bn_act_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    const c10::optional<at::Tensor>& residual, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool training, double momentum, double eps, c10::string_view activation,
    bool save_for_backward) {
  const Geom g = check_geometry(x, weight, bias, stride, padding, dilation);
  const int act = parse_activation(std::string(activation));
  check_float_vec(bn_weight, "bn_weight", x, g.C);
  check_float_vec(bn_bias, "bn_bias", x, g.C);
  check_float_vec(running_mean, "running_mean", x, g.C);
  check_float_vec(running_var, "running_var", x, g.C);
  const bool has_running = present(running_mean);
  TORCH_CHECK(has_running == present(running_var),
              "r21d depthwise3d: running_mean and running_var must be given both or neither");
  TORCH_CHECK(training || has_running,
              "r21d depthwise3d: training=False needs running_mean and running_var (BatchNorm without running "
              "statistics normalises with batch statistics: pass training=True)");
  if (present(residual)) check_out_shaped(*residual, "residual", g, x);

  c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options();
  const auto fopts = opts.dtype(at::kFloat);
  at::Tensor out = empty_like_format({g.N, g.C, g.To, g.Ho, g.Wo}, x, opts);
  const int64_t P = out_positions(g);
  // An empty batch (N = 0) normalises nothing and saves nothing: every other output is empty,
  // as the fake implementation in r21d/ops.py says (autograd then returns zero gradients).
  if (P == 0 || g.C == 0) {
    return std::make_tuple(out, x.new_empty({0}), x.new_empty({0}, fopts), x.new_empty({0}, fopts),
                           x.new_empty({0}, fopts), x.new_empty({0}, fopts));
  }
  at::Tensor z = save_for_backward ? empty_like_format({g.N, g.C, g.To, g.Ho, g.Wo}, x, opts) : x.new_empty({0});
  at::Tensor mean, invstd;
  if (save_for_backward || training) {
    mean = at::empty({g.C}, fopts);
    invstd = at::empty({g.C}, fopts);
  }
  at::Tensor new_rm = x.new_empty({0}, fopts), new_rv = x.new_empty({0}, fopts);
  if (training && has_running) {
    new_rm = at::empty({g.C}, fopts);
    new_rv = at::empty({g.C}, fopts);
  }
  auto finish = [&]() {
    if (!save_for_backward) {
      mean = x.new_empty({0}, fopts);
      invstd = x.new_empty({0}, fopts);
    }
    return std::make_tuple(out, z, mean, invstd, new_rm, new_rv);
  };

  const at::Tensor w = weight.contiguous();
  const at::Tensor b = present(bias) ? bias->contiguous() : at::Tensor();
  const at::Tensor bn_weight_c = present(bn_weight) ? bn_weight->contiguous() : at::Tensor();
  const at::Tensor bn_bias_c = present(bn_bias) ? bn_bias->contiguous() : at::Tensor();
  const at::Tensor rm = has_running ? running_mean->contiguous() : at::Tensor();
  const at::Tensor rv = has_running ? running_var->contiguous() : at::Tensor();
  const at::Tensor r = present(residual) ? *residual : at::Tensor();

  const bool cl = is_channels_last(x);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  at::Tensor partial;
  R21D_DW3D_DISPATCH(x.scalar_type(), "depthwise3d_conv_bn_act", [&] {
    using T = scalar_t;
    const int V = vec_of<T>();
    const bool vec = cl && g.C % V == 0 && vec_ok(x, V) && vec_ok(out, V) && vec_ok(z, V) && vec_ok(r, V);
    Params<T> p{};
    p.g = g;
    p.x = x.data_ptr<T>();
    p.sx = strides_of(x);
    p.w = w.data_ptr<T>();
    p.bias = b.defined() ? b.data_ptr<T>() : nullptr;
    p.bn_weight = bn_weight_c.defined() ? bn_weight_c.data_ptr<float>() : nullptr;
    p.bn_bias = bn_bias_c.defined() ? bn_bias_c.data_ptr<float>() : nullptr;
    p.rmean = rm.defined() ? rm.data_ptr<float>() : nullptr;
    p.rvar = rv.defined() ? rv.data_ptr<float>() : nullptr;
    p.res = r.defined() ? r.data_ptr<T>() : nullptr;
    p.sr = r.defined() ? strides_of(r) : Strides5{0, 0, 0, 0, 0};
    p.out = out.data_ptr<T>();
    p.so = strides_of(out);
    p.z = save_for_backward ? z.data_ptr<T>() : nullptr;
    p.sz = save_for_backward ? strides_of(z) : Strides5{0, 0, 0, 0, 0};
    p.mean = mean.defined() ? mean.data_ptr<float>() : nullptr;
    p.invstd = invstd.defined() ? invstd.data_ptr<float>() : nullptr;
    p.eps = static_cast<float>(eps);
    p.act = act;
    run_forward<T>(p, training, vec, cl, static_cast<float>(momentum), partial,
                   new_rm.numel() ? new_rm.data_ptr<float>() : nullptr,
                   new_rv.numel() ? new_rv.data_ptr<float>() : nullptr, fopts, stream);
  });
  return finish();
}

}  // namespace
}  // namespace dw3d
}  // namespace r21d

TORCH_LIBRARY_IMPL(r21d, CUDA, m) { m.impl("depthwise3d_conv_bn_act", &r21d::dw3d::depthwise3d_conv_bn_act_cuda); }
