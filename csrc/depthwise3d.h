// r21d: per-thread arithmetic of the fused depthwise conv3d + BatchNorm + activation kernels
// (csrc/cuda/depthwise3d_fwd.cu, csrc/cuda/depthwise3d_bwd.cu).
//
// Everything here is an R21D_HOST_DEVICE inline function over plain structs, so that the
// CPU harness (tests/csrc/depthwise3d_harness.cpp, g++ -DR21D_CPU_HARNESS) runs exactly the
// same index math and arithmetic over the whole index space against the float64 oracle.
// The kernels add only the cooperative part: grid-stride loops, vector loads and
// shared-memory reductions.
//
// Conventions
// * Depthwise: groups == C_in == C_out == C, weight (C, 1, KT, KH, KW), contiguous in the
//   kernels, read as w[c * KK + tap] with tap = (kt * KH + kh) * KW + kw.
// * Sizes and strides are int64 (element strides of (N, C, T, H, W), any layout), so the
//   index math never overflows, whatever the tensor size.
// * A "position" is one (n, t, h, w) of the output (forward, statistics, dweight) or of the
//   input (dx), flattened with w fastest.
// * Per-block partials (statistics, backward sums) are laid out [block][C][3] (float) and
//   merged in block order: deterministic.
#pragma once

#include <math.h>

#include <cstdint>

#include "r21d.h"

#if defined(__CUDACC__)
#define R21D_HD_TEMPLATE _Pragma("nv_exec_check_disable")
#else
#define R21D_HD_TEMPLATE
#endif

namespace r21d {
namespace dw3d {

// Activation codes (the op's `activation` string: "none", "relu", "silu").
enum Act : int { kActNone = 0, kActRelu = 1, kActSilu = 2 };

// Extents (T, H, W) of a position space with their reciprocals (set on the host by
// set_extents): positions are decomposed with a double multiply and an exact integer
// correction, because a 64-bit integer division compiles to a subroutine call (and a stack
// frame) in the kernels.
struct Extents {
  int64_t T, H, W;
  double rT, rH, rW;
};

// Convolution geometry: input (N, C, T, H, W), output (N, C, To, Ho, Wo). Strides are 1 or 2.
struct Geom {
  int64_t N, C, T, H, W;
  int64_t To, Ho, Wo;
  Extents ei, eo;  // input / output position extents (set_extents)
  int kt, kh, kw;  // kernel size
  int st, sh, sw;  // stride
  int pt, ph, pw;  // padding
  int dt, dh, dw;  // dilation
};

// Element strides of a 5-d tensor (N, C, T, H, W).
struct Strides5 {
  int64_t n, c, t, h, w;
};

// One parameter struct for every kernel of the family (passed by value). Pointers that a
// kernel does not use are null.
template <typename T>
struct Params {
  Geom g;
  const T* x;  // input
  Strides5 sx;
  const T* w;              // weight, contiguous (C, KK)
  const T* bias;           // conv bias (C) or null
  const float* bn_weight;  // bn weight (C) or null (affine=False)
  const float* bn_bias;    // bn bias (C) or null
  const float* rmean;      // running mean (C) (eval forward)
  const float* rvar;       // running var (C) (eval forward)
  const T* res;            // residual (output shape) or null
  Strides5 sr;
  T* out;  // forward output
  Strides5 so;
  T* z;  // forward: conv + bias, written when non-null; backward: read
  Strides5 sz;
  const T* dy;  // backward: grad of out
  Strides5 sdy;
  T* dx;  // backward: grad of x
  Strides5 sdx;
  T* dres;  // backward: grad of residual, written when non-null
  Strides5 sdres;
  float* mean;     // (C): forward eval writes it (when non-null), train-apply and backward read it
  float* invstd;   // (C): idem
  float* partial;  // per-block partials [gridDim.y][C][3] (stats / backward sums) or [gridDim.y][C][KK] (dweight)
  float* coef;     // backward: per-channel (k_g, k_z, k_0), [C][3]
  float* dw_acc;   // backward, non-deterministic dweight: fp32 accumulator [C][KK]
  float eps;
  int act;
  bool train;  // backward: batch statistics (their terms of dz apply) or running statistics (eval)
};

// ------------------------------------------------------------------ sizes and indices

// Output size of a convolution along one dimension; 0 when the window does not fit.
R21D_HOST_DEVICE R21D_FORCEINLINE int64_t out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  const int64_t num = in + 2 * p - d * (k - 1) - 1;
  return num < 0 ? 0 : num / s + 1;
}

R21D_HOST_DEVICE R21D_FORCEINLINE int taps(const Geom& g) { return g.kt * g.kh * g.kw; }

R21D_HOST_DEVICE R21D_FORCEINLINE int64_t out_positions(const Geom& g) { return g.N * g.To * g.Ho * g.Wo; }

R21D_HOST_DEVICE R21D_FORCEINLINE int64_t in_positions(const Geom& g) { return g.N * g.T * g.H * g.W; }

R21D_HOST_DEVICE R21D_FORCEINLINE int64_t offset(const Strides5& s, int64_t n, int64_t c, int64_t t, int64_t h,
                                                 int64_t w) {
  return n * s.n + c * s.c + t * s.t + h * s.h + w * s.w;
}

struct Pos {
  int64_t n, t, h, w;
};

// Host side: fill g.ei and g.eo from the sizes (call after setting T, H, W, To, Ho, Wo).
inline void set_extents(Geom& g) {
  g.ei = Extents{g.T, g.H, g.W, 1.0 / double(g.T), 1.0 / double(g.H), 1.0 / double(g.W)};
  g.eo = Extents{g.To, g.Ho, g.Wo, 1.0 / double(g.To), 1.0 / double(g.Ho), 1.0 / double(g.Wo)};
}

// q = a / d, r = a % d for 0 <= a < 2^53, d >= 1, rd = 1.0 / d: the double estimate is off
// by at most a few units, corrected exactly in integers.
R21D_HOST_DEVICE R21D_FORCEINLINE void divmod(int64_t a, int64_t d, double rd, int64_t& q, int64_t& r) {
  q = static_cast<int64_t>(static_cast<double>(a) * rd);
  r = a - q * d;
  while (r < 0) {
    --q;
    r += d;
  }
  while (r >= d) {
    ++q;
    r -= d;
  }
}

// Flattened position (w fastest) -> (n, t, h, w) over extents e.
R21D_HOST_DEVICE R21D_FORCEINLINE Pos decompose(int64_t p, const Extents& e) {
  Pos r;
  int64_t q;
  divmod(p, e.W, e.rW, q, r.w);
  divmod(q, e.H, e.rH, p, r.h);
  divmod(p, e.T, e.rT, r.n, r.t);
  return r;
}

// Tap index -> (kt, kh, kw).
R21D_HOST_DEVICE R21D_FORCEINLINE void tap_coords(const Geom& g, int tap, int& a, int& b, int& c) {
  c = tap % g.kw;
  const int r = tap / g.kw;
  b = r % g.kh;
  a = r / g.kh;
}

// Output-centred tap loop: calls f(tap, ti, hi, wi) for every tap of output (to, ho, wo)
// whose input position lies inside the input (zero padding elsewhere).
R21D_HD_TEMPLATE
template <class F>
R21D_HOST_DEVICE R21D_FORCEINLINE void for_each_tap(const Geom& g, int64_t to, int64_t ho, int64_t wo, F&& f) {
  const int64_t t0 = to * g.st - g.pt, h0 = ho * g.sh - g.ph, w0 = wo * g.sw - g.pw;
  for (int a = 0; a < g.kt; ++a) {
    const int64_t ti = t0 + int64_t(a) * g.dt;
    if (ti < 0 || ti >= g.T) continue;
    for (int b = 0; b < g.kh; ++b) {
      const int64_t hi = h0 + int64_t(b) * g.dh;
      if (hi < 0 || hi >= g.H) continue;
      for (int c = 0; c < g.kw; ++c) {
        const int64_t wi = w0 + int64_t(c) * g.dw;
        if (wi < 0 || wi >= g.W) continue;
        f((a * g.kh + b) * g.kw + c, ti, hi, wi);
      }
    }
  }
}

// Input position read by tap (kt, kh, kw) of output (to, ho, wo); false when it is padding.
R21D_HOST_DEVICE R21D_FORCEINLINE bool tap_input(const Geom& g, int64_t to, int64_t ho, int64_t wo, int a, int b, int c,
                                                 int64_t& ti, int64_t& hi, int64_t& wi) {
  ti = to * g.st - g.pt + int64_t(a) * g.dt;
  hi = ho * g.sh - g.ph + int64_t(b) * g.dh;
  wi = wo * g.sw - g.pw + int64_t(c) * g.dw;
  return ti >= 0 && ti < g.T && hi >= 0 && hi < g.H && wi >= 0 && wi < g.W;
}

// Inverse mapping along one dimension: the output index o whose tap k reads input index i
// (i = o * s - p + k * d); false when no output reads it through this tap.
R21D_HOST_DEVICE R21D_FORCEINLINE bool out_of_in(int64_t i, int k, int s, int p, int d, int64_t out_n, int64_t& o) {
  const int64_t num = i + p - int64_t(k) * d;
  if (num < 0) return false;
  if (s == 1) {
    o = num;
  } else {  // s == 2
    if (num & 1) return false;
    o = num >> 1;
  }
  return o < out_n;
}

// Input-centred tap loop (transposed conv, for dx): calls f(tap, to, ho, wo) for every
// (tap, output) pair that reads input (ti, hi, wi).
R21D_HD_TEMPLATE
template <class F>
R21D_HOST_DEVICE R21D_FORCEINLINE void for_each_out_of_in(const Geom& g, int64_t ti, int64_t hi, int64_t wi, F&& f) {
  for (int a = 0; a < g.kt; ++a) {
    int64_t to;
    if (!out_of_in(ti, a, g.st, g.pt, g.dt, g.To, to)) continue;
    for (int b = 0; b < g.kh; ++b) {
      int64_t ho;
      if (!out_of_in(hi, b, g.sh, g.ph, g.dh, g.Ho, ho)) continue;
      for (int c = 0; c < g.kw; ++c) {
        int64_t wo;
        if (!out_of_in(wi, c, g.sw, g.pw, g.dw, g.Wo, wo)) continue;
        f((a * g.kh + b) * g.kw + c, to, ho, wo);
      }
    }
  }
}

// Convolution (no bias) at one output element, given loaders lx(ti, hi, wi) -> float of the
// input channel and lw(tap) -> float of its filter.
R21D_HD_TEMPLATE
template <class LX, class LW>
R21D_HOST_DEVICE R21D_FORCEINLINE float conv_point(const Geom& g, int64_t to, int64_t ho, int64_t wo, const LX& lx,
                                                   const LW& lw) {
  float acc = 0.f;
  for_each_tap(g, to, ho, wo, [&](int tap, int64_t ti, int64_t hi, int64_t wi) { acc += lx(ti, hi, wi) * lw(tap); });
  return acc;
}

// ------------------------------------------------------------------ BatchNorm and activation

// a / b. On the device __fdividef (2 ulp, no call into the IEEE-division slow path, whose
// subroutine call costs a stack frame in the kernels); plain division on the host.
R21D_HOST_DEVICE R21D_FORCEINLINE float fast_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}

R21D_HOST_DEVICE R21D_FORCEINLINE float invstd_of(float var, float eps) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(var + eps);
#else
  return 1.f / sqrtf(var + eps);
#endif
}

struct Affine {
  float scale, shift;
};

// BN folded onto the bias-free conv sum: pre = conv * scale + shift
//   = ((conv + bias) - mean) * invstd * bn_weight + bn_bias.
R21D_HOST_DEVICE R21D_FORCEINLINE Affine bn_fold(float mean, float invstd, const float* bn_weight, const float* bn_bias,
                                                 int64_t c, float bias) {
  Affine a;
  a.scale = invstd * (bn_weight ? bn_weight[c] : 1.f);
  a.shift = (bn_bias ? bn_bias[c] : 0.f) + (bias - mean) * a.scale;
  return a;
}

R21D_HOST_DEVICE R21D_FORCEINLINE float sigmoid(float v) { return fast_div(1.f, 1.f + expf(-v)); }

R21D_HOST_DEVICE R21D_FORCEINLINE float act_fwd(float v, int act) {
  if (act == kActRelu) return v <= 0.f ? 0.f : v;  // NaN stays NaN, as in torch.relu
  if (act == kActSilu) return v * sigmoid(v);
  return v;
}

// d act(pre) / d pre (ReLU: 0 where pre <= 0, 1 elsewhere, NaN included, as bwd_g).
R21D_HOST_DEVICE R21D_FORCEINLINE float act_grad(float pre, int act) {
  if (act == kActRelu) return pre <= 0.f ? 0.f : 1.f;
  if (act == kActSilu) {
    const float s = sigmoid(pre);
    return s * (1.f + pre * (1.f - s));
  }
  return 1.f;
}

// ------------------------------------------------------------------ statistics (Welford / Chan)

struct Welford {
  float n, mean, m2;
};

R21D_HOST_DEVICE R21D_FORCEINLINE void welford_push(Welford& a, float v) {
  a.n += 1.f;
  const float d = v - a.mean;
  a.mean += fast_div(d, a.n);
  a.m2 += d * (v - a.mean);
}

// Chan et al.'s parallel merge of two (count, mean, M2) summaries.
R21D_HOST_DEVICE R21D_FORCEINLINE Welford chan_merge(const Welford& a, const Welford& b) {
  const float n = a.n + b.n;
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float d = b.mean - a.mean;
  const float fb = fast_div(b.n, n);
  Welford r;
  r.n = n;
  r.mean = a.mean + d * fb;
  r.m2 = a.m2 + b.m2 + d * d * a.n * fb;
  return r;
}

// Merge the per-block partials [nb][C][3] of channel c in block order (deterministic).
R21D_HOST_DEVICE R21D_FORCEINLINE Welford merge_partials(const float* partial, int64_t nb, int64_t C, int64_t c) {
  Welford acc = {0.f, 0.f, 0.f};
  for (int64_t b = 0; b < nb; ++b) {
    const float* q = partial + (b * C + c) * 3;
    Welford w = {q[0], q[1], q[2]};
    acc = chan_merge(acc, w);
  }
  return acc;
}

// Forward training finalize of channel c: batch mean / invstd (biased variance) and, when
// the running stats are given, the updated ones (unbiased variance; M = positions).
R21D_HOST_DEVICE R21D_FORCEINLINE void fwd_finalize_channel(const float* partial, int64_t nb, int64_t C, int64_t c,
                                                            int64_t M, float eps, float momentum, const float* rmean,
                                                            const float* rvar, float* mean, float* invstd,
                                                            float* new_rmean, float* new_rvar) {
  const Welford w = merge_partials(partial, nb, C, c);
  const float var = fast_div(w.m2, float(M));
  mean[c] = w.mean;
  invstd[c] = invstd_of(var > 0.f ? var : 0.f, eps);
  if (new_rmean != nullptr) {
    const float unbias = M > 1 ? fast_div(float(M), float(M - 1)) : 1.f;
    const float var_u = (M > 1 ? var : 0.f) * unbias;
    new_rmean[c] = (1.f - momentum) * rmean[c] + momentum * w.mean;
    new_rvar[c] = (1.f - momentum) * rvar[c] + momentum * var_u;
  }
}

// ------------------------------------------------------------------ backward

// g = dy * act'(pre), pre = xhat * bn_weight + bn_bias + r, xhat = (z - mean) * invstd.
R21D_HOST_DEVICE R21D_FORCEINLINE float bwd_g(float dy, float zc, float invstd, float bn_weight, float bn_bias, float r,
                                              int act, float& xhat) {
  xhat = zc * invstd;
  const float pre = xhat * bn_weight + bn_bias + r;
  // ReLU selects as torch's threshold_backward: 0 where pre <= 0 (an infinite dy gives 0, not
  // the NaN of a multiply), dy elsewhere, also where pre is NaN (pre > 0 would give 0 there).
  if (act == kActRelu) return pre <= 0.f ? 0.f : dy;
  return dy * act_grad(pre, act);
}

// dz = k_g * g + k_z * (z - mean) + k_0 in training; k_g * g in eval (rebuild_dz).
struct Coef {
  float kg, kz, k0;
};

R21D_HOST_DEVICE R21D_FORCEINLINE Coef bwd_coef(float sum_g, float sum_gx, int64_t M, float invstd, float bn_weight,
                                                bool train) {
  const float a = invstd * bn_weight;
  Coef k;
  k.kg = a;
  if (train) {
    const float inv_m = M > 0 ? fast_div(1.f, float(M)) : 0.f;
    k.kz = -a * invstd * sum_gx * inv_m;
    k.k0 = -a * sum_g * inv_m;
  } else {
    k.kz = 0.f;
    k.k0 = 0.f;
  }
  return k;
}

// Per-channel constants of the backward pass.
struct ChanBwd {
  float mean, invstd, bn_weight, bn_bias;
  Coef k;
};

R21D_HOST_DEVICE R21D_FORCEINLINE ChanBwd load_chan_bwd(const float* mean, const float* invstd, const float* bn_weight,
                                                        const float* bn_bias, const float* coef, int64_t c) {
  ChanBwd cb;
  cb.mean = mean[c];
  cb.invstd = invstd[c];
  cb.bn_weight = bn_weight ? bn_weight[c] : 1.f;
  cb.bn_bias = bn_bias ? bn_bias[c] : 0.f;
  if (coef != nullptr) {
    cb.k.kg = coef[c * 3 + 0];
    cb.k.kz = coef[c * 3 + 1];
    cb.k.k0 = coef[c * 3 + 2];
  } else {
    cb.k.kg = cb.k.kz = cb.k.k0 = 0.f;
  }
  return cb;
}

// dz at one output element, rebuilt from dy, z, r (dz is never stored). In eval (train false,
// running statistics) only k_g * g, PyTorch's dy * act' * bn_weight * invstd: k_z and k_0 are 0 there,
// but k_z * (z - mean) would be 0 * Inf = NaN where z is infinite or NaN, where PyTorch's dz is
// finite. train is kernel-wide (a uniform branch).
R21D_HOST_DEVICE R21D_FORCEINLINE float rebuild_dz(float dy, float z, float r, const ChanBwd& cb, int act, bool train) {
  const float zc = z - cb.mean;
  float xhat;
  const float g = bwd_g(dy, zc, cb.invstd, cb.bn_weight, cb.bn_bias, r, act, xhat);
  if (!train) return cb.k.kg * g;
  return cb.k.kg * g + cb.k.kz * zc + cb.k.k0;
}

// Sum the per-block partials [nb][C][3] of channel c in block order.
R21D_HOST_DEVICE R21D_FORCEINLINE void sum_partials3(const float* partial, int64_t nb, int64_t C, int64_t c,
                                                     float out[3]) {
  out[0] = out[1] = out[2] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const float* q = partial + (b * C + c) * 3;
    out[0] += q[0];
    out[1] += q[1];
    out[2] += q[2];
  }
}

// Backward finalize of channel c from the sums (sum_g, sum_gx, sum_zc) [nb][C][3]
// (partial may be null: all sums 0): coefficient table, dbn_weight = sum_gx, dbn_bias = sum_g,
// dbias = sum of dz = k_g sum_g + k_z sum_zc + k_0 M (eval: k_g sum_g, as rebuild_dz; sum_zc is
// infinite or NaN where z is). Outputs that are null are skipped.
template <typename T>
R21D_HOST_DEVICE R21D_FORCEINLINE void bwd_finalize_channel(const float* partial, int64_t nb, int64_t C, int64_t c,
                                                            int64_t M, bool train, const float* mean,
                                                            const float* invstd, const float* bn_weight, float* coef,
                                                            float* dbn_weight, float* dbn_bias, T* dbias) {
  float s[3] = {0.f, 0.f, 0.f};
  if (partial != nullptr) sum_partials3(partial, nb, C, c, s);
  (void)mean;
  const Coef k = bwd_coef(s[0], s[1], M, invstd[c], bn_weight ? bn_weight[c] : 1.f, train);
  coef[c * 3 + 0] = k.kg;
  coef[c * 3 + 1] = k.kz;
  coef[c * 3 + 2] = k.k0;
  if (dbn_weight != nullptr) dbn_weight[c] = s[1];
  if (dbn_bias != nullptr) dbn_bias[c] = s[0];
  if (dbias != nullptr) dbias[c] = static_cast<T>(train ? k.kg * s[0] + k.kz * s[2] + k.k0 * float(M) : k.kg * s[0]);
}

// dweight element i of [C * KK]: sum of nb partials [nb][C * KK] in block order.
R21D_HOST_DEVICE R21D_FORCEINLINE float sum_dw_partials(const float* partial, int64_t nb, int64_t CKK, int64_t i) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) acc += partial[b * CKK + i];
  return acc;
}

// Tap chunk handled by one dweight thread: TPT consecutive taps (registers: TPT * VEC floats).
template <int VEC>
struct DwTaps {
  static constexpr int value = VEC >= 8 ? 4 : (VEC >= 4 ? 8 : 16);
};

}  // namespace dw3d
}  // namespace r21d
