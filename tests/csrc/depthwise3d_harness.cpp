// CPU harness of the fused depthwise conv3d + BatchNorm + activation kernels: runs the
// per-thread functions of csrc/depthwise3d.h over the whole index space, the way the CUDA
// kernels do (per-block partials merged in block order, input-centred dx, per-block dweight
// partials), in float32, and writes the results for tests/csrc/test_depthwise3d_harness.py
// to compare with the float64 torch oracle.
//
//   g++ -std=c++17 -O1 -DR21D_CPU_HARNESS -I csrc tests/csrc/depthwise3d_harness.cpp -o harness
//   harness DIR      reads DIR/config.txt and DIR/<name>.bin (raw float32), writes DIR/<out>.bin
//
// config.txt: one "key v1 v2 ..." per line. Keys: geom (N C T H W), kernel, stride, padding,
// dilation (3 each), act (0 none, 1 relu, 2 silu), train, momentum, eps, has_bias, has_bn_weight,
// has_bn_bias, has_running, has_res, nb (blocks for partials), strides (5 each) and buffer
// sizes (elements) of x, out (out, z), res (res, dres), dy: sx bx so bo sr br sdy bdy.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "depthwise3d.h"

using namespace r21d::dw3d;

namespace {

std::map<std::string, std::vector<double>> cfg;

double get(const std::string& k, size_t i = 0) {
  auto it = cfg.find(k);
  if (it == cfg.end() || it->second.size() <= i) {
    std::fprintf(stderr, "harness: missing config key %s[%zu]\n", k.c_str(), i);
    std::exit(2);
  }
  return it->second[i];
}

int64_t geti(const std::string& k, size_t i = 0) { return static_cast<int64_t>(std::llround(get(k, i))); }

Strides5 strides(const std::string& k) { return Strides5{geti(k, 0), geti(k, 1), geti(k, 2), geti(k, 3), geti(k, 4)}; }

std::string dir;

std::vector<float> read(const std::string& name, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  FILE* f = std::fopen((dir + "/" + name + ".bin").c_str(), "rb");
  if (!f) {
    std::fprintf(stderr, "harness: cannot open %s.bin\n", name.c_str());
    std::exit(2);
  }
  const size_t got = std::fread(v.data(), sizeof(float), v.size(), f);
  std::fclose(f);
  if (got != v.size()) {
    std::fprintf(stderr, "harness: %s.bin has %zu floats, expected %lld\n", name.c_str(), got, (long long)n);
    std::exit(2);
  }
  return v;
}

void write(const std::string& name, const std::vector<float>& v) {
  FILE* f = std::fopen((dir + "/" + name + ".bin").c_str(), "wb");
  std::fwrite(v.data(), sizeof(float), v.size(), f);
  std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: harness DIR\n");
    return 2;
  }
  dir = argv[1];
  // divmod (double estimate + exact correction) against integer division, up to 2^52.
  for (int64_t d :
       {int64_t(1), int64_t(3), int64_t(7), int64_t(112), int64_t(12544), int64_t(1) << 31, (int64_t(1) << 31) + 11}) {
    const double rd = 1.0 / double(d);
    for (int64_t a : {int64_t(0), d - 1, d, d + 1, (int64_t(1) << 31) - 1, (int64_t(1) << 40) + 12345,
                      (int64_t(1) << 52) - 1, (int64_t(1) << 52) - d}) {
      int64_t q, r;
      divmod(a, d, rd, q, r);
      if (q != a / d || r != a % d) {
        std::fprintf(stderr, "harness: divmod(%lld, %lld) wrong\n", (long long)a, (long long)d);
        return 3;
      }
    }
  }
  {
    std::ifstream in(dir + "/config.txt");
    std::string line;
    while (std::getline(in, line)) {
      std::istringstream ls(line);
      std::string key;
      if (!(ls >> key)) continue;
      double v;
      while (ls >> v) cfg[key].push_back(v);
    }
  }
  Geom g;
  g.N = geti("geom", 0);
  g.C = geti("geom", 1);
  g.T = geti("geom", 2);
  g.H = geti("geom", 3);
  g.W = geti("geom", 4);
  g.kt = int(geti("kernel", 0));
  g.kh = int(geti("kernel", 1));
  g.kw = int(geti("kernel", 2));
  g.st = int(geti("stride", 0));
  g.sh = int(geti("stride", 1));
  g.sw = int(geti("stride", 2));
  g.pt = int(geti("padding", 0));
  g.ph = int(geti("padding", 1));
  g.pw = int(geti("padding", 2));
  g.dt = int(geti("dilation", 0));
  g.dh = int(geti("dilation", 1));
  g.dw = int(geti("dilation", 2));
  g.To = out_size(g.T, g.kt, g.st, g.pt, g.dt);
  g.Ho = out_size(g.H, g.kh, g.sh, g.ph, g.dh);
  g.Wo = out_size(g.W, g.kw, g.sw, g.pw, g.dw);
  set_extents(g);
  const int act = int(geti("act"));
  const bool train = geti("train") != 0;
  const float momentum = float(get("momentum"));
  const float eps = float(get("eps"));
  const bool has_bias = geti("has_bias") != 0, has_bn_weight = geti("has_bn_weight") != 0,
             has_bn_bias = geti("has_bn_bias") != 0;
  const bool has_running = geti("has_running") != 0, has_res = geti("has_res") != 0;
  const int64_t nb = geti("nb");
  const Strides5 sx = strides("sx"), so = strides("so"), sr = strides("sr"), sdy = strides("sdy");
  const int64_t C = g.C, KK = taps(g);
  const int64_t P = out_positions(g), PI = in_positions(g);
  {
    std::ofstream o(dir + "/out_size.txt");
    o << g.To << " " << g.Ho << " " << g.Wo << "\n";
  }

  const std::vector<float> x = read("x", geti("bx"));
  const std::vector<float> w = read("w", C * KK);
  const std::vector<float> bias = has_bias ? read("bias", C) : std::vector<float>(C, 0.f);
  const std::vector<float> bn_weight = has_bn_weight ? read("bn_weight", C) : std::vector<float>();
  const std::vector<float> bn_bias = has_bn_bias ? read("bn_bias", C) : std::vector<float>();
  const std::vector<float> rm = has_running ? read("rm", C) : std::vector<float>();
  const std::vector<float> rv = has_running ? read("rv", C) : std::vector<float>();
  const std::vector<float> res = has_res ? read("res", geti("br")) : std::vector<float>();
  const std::vector<float> dy = read("dy", geti("bdy"));
  const float* gp = has_bn_weight ? bn_weight.data() : nullptr;
  const float* bp = has_bn_bias ? bn_bias.data() : nullptr;

  auto conv = [&](int64_t n, int64_t c, int64_t to, int64_t ho, int64_t wo) {
    return conv_point(
        g, to, ho, wo, [&](int64_t ti, int64_t hi, int64_t wi) { return x[offset(sx, n, c, ti, hi, wi)]; },
        [&](int tap) { return w[c * KK + tap]; });
  };
  const int64_t chunk = P > 0 ? (P + nb - 1) / nb : 1;

  // ---------------- forward
  std::vector<float> mean(C), invstd(C), nrm, nrv;
  if (train) {
    std::vector<float> partial(nb * C * 3, 0.f);
    for (int64_t b = 0; b < nb; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        Welford wf = {0.f, 0.f, 0.f};
        // two "threads" per block, merged with Chan's formula like the block reduction
        Welford wf2 = {0.f, 0.f, 0.f};
        for (int64_t pos = b * chunk; pos < std::min(P, (b + 1) * chunk); ++pos) {
          const Pos q = decompose(pos, g.eo);
          welford_push(pos % 2 ? wf2 : wf, conv(q.n, c, q.t, q.h, q.w) + bias[c]);
        }
        wf = chan_merge(wf, wf2);
        float* o = &partial[(b * C + c) * 3];
        o[0] = wf.n;
        o[1] = wf.mean;
        o[2] = wf.m2;
      }
    }
    if (has_running) {
      nrm.resize(C);
      nrv.resize(C);
    }
    for (int64_t c = 0; c < C; ++c) {
      fwd_finalize_channel(partial.data(), nb, C, c, P, eps, momentum, has_running ? rm.data() : nullptr,
                           has_running ? rv.data() : nullptr, mean.data(), invstd.data(),
                           has_running ? nrm.data() : nullptr, has_running ? nrv.data() : nullptr);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = rm[c];
      invstd[c] = invstd_of(rv[c], eps);
    }
  }
  const int64_t bo = geti("bo");
  std::vector<float> out(bo, NAN), z(bo, NAN);
  for (int64_t pos = 0; pos < P; ++pos) {
    const Pos q = decompose(pos, g.eo);
    for (int64_t c = 0; c < C; ++c) {
      const float acc = conv(q.n, c, q.t, q.h, q.w);
      const Affine a = bn_fold(mean[c], invstd[c], gp, bp, c, bias[c]);
      const float r = has_res ? res[offset(sr, q.n, c, q.t, q.h, q.w)] : 0.f;
      out[offset(so, q.n, c, q.t, q.h, q.w)] = act_fwd(acc * a.scale + a.shift + r, act);
      z[offset(so, q.n, c, q.t, q.h, q.w)] = acc + bias[c];
    }
  }
  write("out", out);
  write("z", z);
  write("mean", mean);
  write("invstd", invstd);
  if (train && has_running) {
    write("nrm", nrm);
    write("nrv", nrv);
  }

  // ---------------- backward (z, mean, invstd from the forward above)
  auto rat = [&](int64_t n, int64_t c, int64_t t, int64_t h, int64_t ww) {
    return has_res ? res[offset(sr, n, c, t, h, ww)] : 0.f;
  };
  std::vector<float> sums(nb * C * 3, 0.f);
  std::vector<float> dres(has_res ? geti("br") : 0, NAN);
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      const ChanBwd cb = load_chan_bwd(mean.data(), invstd.data(), gp, bp, nullptr, c);
      float* s = &sums[(b * C + c) * 3];
      for (int64_t pos = b * chunk; pos < std::min(P, (b + 1) * chunk); ++pos) {
        const Pos q = decompose(pos, g.eo);
        const float zc = z[offset(so, q.n, c, q.t, q.h, q.w)] - cb.mean;
        float xhat;
        const float gg = bwd_g(dy[offset(sdy, q.n, c, q.t, q.h, q.w)], zc, cb.invstd, cb.bn_weight, cb.bn_bias,
                               rat(q.n, c, q.t, q.h, q.w), act, xhat);
        s[0] += gg;
        s[1] += gg * xhat;
        s[2] += zc;
        if (has_res) dres[offset(sr, q.n, c, q.t, q.h, q.w)] = gg;
      }
    }
  }
  std::vector<float> coef(C * 3), dbn_weight(C), dbn_bias(C), dbias(C);
  for (int64_t c = 0; c < C; ++c) {
    bwd_finalize_channel<float>(sums.data(), nb, C, c, P, train, mean.data(), invstd.data(), gp, coef.data(),
                                dbn_weight.data(), dbn_bias.data(), dbias.data());
  }
  auto dz_at = [&](const ChanBwd& cb, int64_t n, int64_t c, int64_t to, int64_t ho, int64_t wo) {
    return rebuild_dz(dy[offset(sdy, n, c, to, ho, wo)], z[offset(so, n, c, to, ho, wo)], rat(n, c, to, ho, wo), cb,
                      act, train);
  };
  std::vector<float> dx(geti("bx"), NAN);
  for (int64_t pos = 0; pos < PI; ++pos) {
    const Pos q = decompose(pos, g.ei);
    for (int64_t c = 0; c < C; ++c) {
      const ChanBwd cb = load_chan_bwd(mean.data(), invstd.data(), gp, bp, coef.data(), c);
      float acc = 0.f;
      for_each_out_of_in(g, q.t, q.h, q.w, [&](int tap, int64_t to, int64_t ho, int64_t wo) {
        acc += dz_at(cb, q.n, c, to, ho, wo) * w[c * KK + tap];
      });
      dx[offset(sx, q.n, c, q.t, q.h, q.w)] = acc;
    }
  }
  // dweight: per-block partials over position chunks, tap chunks of DwTaps<1> through
  // tap_coords / tap_input (the kernel's path), summed in block order.
  const int tpt = DwTaps<1>::value;
  std::vector<float> dwp(nb * C * KK, 0.f);
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      const ChanBwd cb = load_chan_bwd(mean.data(), invstd.data(), gp, bp, coef.data(), c);
      for (int tap0 = 0; tap0 < KK; tap0 += tpt) {
        for (int64_t pos = b * chunk; pos < std::min(P, (b + 1) * chunk); ++pos) {
          const Pos q = decompose(pos, g.eo);
          const float dz = dz_at(cb, q.n, c, q.t, q.h, q.w);
          for (int j = 0; j < tpt && tap0 + j < KK; ++j) {
            int ka, kb, kc;
            tap_coords(g, tap0 + j, ka, kb, kc);
            int64_t ti, hi, wi;
            if (tap_input(g, q.t, q.h, q.w, ka, kb, kc, ti, hi, wi)) {
              dwp[b * C * KK + c * KK + tap0 + j] += dz * x[offset(sx, q.n, c, ti, hi, wi)];
            }
          }
        }
      }
    }
  }
  std::vector<float> dw(C * KK);
  for (int64_t i = 0; i < C * KK; ++i) dw[i] = sum_dw_partials(dwp.data(), nb, C * KK, i);
  write("dx", dx);
  write("dw", dw);
  write("dbias", dbias);
  write("dbn_weight", dbn_weight);
  write("dbn_bias", dbn_bias);
  if (has_res) write("dres", dres);
  return 0;
}
