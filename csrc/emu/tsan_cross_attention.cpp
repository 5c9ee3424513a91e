// ThreadSanitizer driver for the cross-attention kernels under the SIMT emulation, torch-free.
//
// Build: g++ -std=c++17 -O1 -g -fsanitize=thread -pthread -Icsrc csrc/emu/tsan_cross_attention.cpp
// Run:   ./tsan_cross_attention   -> "PASS <case>" / "FAIL <case>: why" per case; exit 1 on a mismatch.
// tests/test_cuda_resources_cross_attention.py builds it with -fsanitize=thread and fails on any
// ThreadSanitizer report (a missing block_sync / warp_sync shows up as a data race on shared
// memory, since every emulated CUDA thread is an OS thread) or on a mismatch with the naive loops
// below.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cross_attention/kernel_bwd.cuh"
#include "cross_attention/kernel_fwd.cuh"

using namespace mmfast;
using namespace mmfast::cross_attention;

namespace {

struct Case {
  const char* name;
  int B, Hq, Hkv, Lq, Lk, D, Dv;
  bool causal, kpm, float_mask;
  float dropout_p;
  int splits;
  bool vec;  // 16-byte cp.async loads (deferred to the wait by the emulation) or eager element stores
};

// Naive attention in double on the rounded inputs; q, k, v, dout contiguous (B, H, L, D).
struct Naive {
  std::vector<double> out, lse, dq, dk, dv, dmask;
};

Naive naive(const Case& c, const Params& p, const std::vector<float>& q, const std::vector<float>& k,
            const std::vector<float>& v, const std::vector<float>& dout, const std::vector<uint8_t>& kpm,
            const std::vector<float>& mask) {
  Naive n;
  n.out.assign(size_t(c.B) * c.Hq * c.Lq * c.Dv, 0.0);
  n.lse.assign(size_t(c.B) * c.Hq * c.Lq, -INFINITY);
  n.dq.assign(size_t(c.B) * c.Hq * c.Lq * c.D, 0.0);
  n.dk.assign(size_t(c.B) * c.Hkv * c.Lk * c.D, 0.0);
  n.dv.assign(size_t(c.B) * c.Hkv * c.Lk * c.Dv, 0.0);
  n.dmask.assign(size_t(c.B) * c.Hq * c.Lq * c.Lk, 0.0);
  std::vector<double> s(c.Lk), pr(c.Lk), dp(c.Lk);
  std::vector<char> ok(c.Lk);
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hq; ++h)
      for (int i = 0; i < c.Lq; ++i) {
        const int g = h / (c.Hq / c.Hkv), bh = b * c.Hq + h;
        const float* qi = &q[(size_t(bh) * c.Lq + i) * c.D];
        double mx = -INFINITY;
        for (int j = 0; j < c.Lk; ++j) {
          const float* kj = &k[((size_t(b) * c.Hkv + g) * c.Lk + j) * c.D];
          double dot = 0;
          for (int d = 0; d < c.D; ++d) dot += double(qi[d]) * kj[d];
          s[j] = dot * p.scale + (c.float_mask ? mask[(size_t(bh) * c.Lq + i) * c.Lk + j] : 0.0);
          ok[j] = !(c.kpm && kpm[size_t(b) * c.Lk + j]) && !(c.causal && j > i + c.Lk - c.Lq);
          if (ok[j]) mx = std::max(mx, s[j]);
        }
        if (mx == -INFINITY) continue;  // empty row: out 0, lse -inf, zero gradients
        double sum = 0;
        for (int j = 0; j < c.Lk; ++j) sum += ok[j] ? std::exp(s[j] - mx) : 0.0;
        const double lse = mx + std::log(sum);
        n.lse[size_t(bh) * c.Lq + i] = lse;
        const float* doi = &dout[(size_t(bh) * c.Lq + i) * c.Dv];
        double delta = 0;
        for (int j = 0; j < c.Lk; ++j) {
          const float* vj = &v[((size_t(b) * c.Hkv + g) * c.Lk + j) * c.Dv];
          pr[j] = ok[j] ? std::exp(s[j] - lse) : 0.0;
          const double z = (p.dropout && !dropout_keep(p, bh, i, j)) ? 0.0 : p.drop_scale;
          double dot = 0;
          for (int d = 0; d < c.Dv; ++d) {
            n.out[(size_t(bh) * c.Lq + i) * c.Dv + d] += pr[j] * z * vj[d];
            dot += double(doi[d]) * vj[d];
            n.dv[((size_t(b) * c.Hkv + g) * c.Lk + j) * c.Dv + d] += pr[j] * z * doi[d];
          }
          dp[j] = dot * z;
          delta += pr[j] * dp[j];
        }
        for (int j = 0; j < c.Lk; ++j) {
          const double ds = pr[j] * (dp[j] - delta);
          n.dmask[(size_t(bh) * c.Lq + i) * c.Lk + j] = ds;
          const float* kj = &k[((size_t(b) * c.Hkv + g) * c.Lk + j) * c.D];
          for (int d = 0; d < c.D; ++d) {
            n.dq[(size_t(bh) * c.Lq + i) * c.D + d] += p.scale * ds * kj[d];
            n.dk[((size_t(b) * c.Hkv + g) * c.Lk + j) * c.D + d] += p.scale * ds * qi[d];
          }
        }
      }
  return n;
}

template <class T>
std::vector<T> to_device_type(const std::vector<float>& x) {
  std::vector<T> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = port::from_float<T>(x[i]);
  return out;
}

// Random values rounded to T, returned as floats (what the kernel sees).
template <class T>
std::vector<float> randn(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> dist;
  std::vector<float> x(n);
  for (auto& e : x) e = port::to_float(port::from_float<T>(dist(rng)));
  return x;
}

template <class T>
bool close(const char* what, const std::vector<T>& got, const std::vector<double>& want, double tol,
           std::string& why) {
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = port::to_float(got[i]), w = want[i];
    const bool same_inf = std::isinf(w) && g == w;
    if (!same_inf && !(std::fabs(g - w) <= tol * (1 + std::fabs(w)))) {
      why = std::string(what) + "[" + std::to_string(i) + "] = " + std::to_string(g) + ", want " +
            std::to_string(w);
      return false;
    }
  }
  return true;
}

template <class T, int HD>
bool run_case(const Case& c, std::string& why) {
  std::mt19937 rng(12345);
  const size_t nq = size_t(c.B) * c.Hq * c.Lq, nk = size_t(c.B) * c.Hkv * c.Lk;
  auto q = randn<T>(nq * c.D, rng), k = randn<T>(nk * c.D, rng), v = randn<T>(nk * c.Dv, rng);
  auto dout = randn<T>(nq * c.Dv, rng), mask = randn<float>(nq * c.Lk, rng);
  std::vector<uint8_t> kpm(size_t(c.B) * c.Lk);
  for (size_t i = 0; i < kpm.size(); ++i)
    kpm[i] = (rng() % 3 == 0) || (i < size_t(c.Lk));  // item 0 all padding
  auto qd = to_device_type<T>(q), kd = to_device_type<T>(k), vd = to_device_type<T>(v);
  auto dod = to_device_type<T>(dout);
  std::vector<T> o(nq * c.Dv), dq(nq * c.D), dk(nk * c.D), dv(nk * c.Dv);
  std::vector<float> lse(nq), delta(nq), dmask(nq * c.Lk, 0.f);
  std::vector<float> o_part(size_t(c.splits) * nq * c.Dv), lse_part(size_t(c.splits) * nq);

  Params p{};
  p.q = qd.data(), p.k = kd.data(), p.v = vd.data();
  p.q_sb = int64_t(c.Hq) * c.Lq * c.D, p.q_sh = int64_t(c.Lq) * c.D, p.q_sl = c.D;
  p.k_sb = int64_t(c.Hkv) * c.Lk * c.D, p.k_sh = int64_t(c.Lk) * c.D, p.k_sl = c.D;
  p.v_sb = int64_t(c.Hkv) * c.Lk * c.Dv, p.v_sh = int64_t(c.Lk) * c.Dv, p.v_sl = c.Dv;
  p.o = o.data(), p.o_sb = int64_t(c.Hq) * c.Lq * c.Dv, p.o_sh = int64_t(c.Lq) * c.Dv, p.o_sl = c.Dv,
  p.o_sd = 1;
  p.lse = lse.data();
  if (c.kpm) p.kpm = kpm.data(), p.kpm_sb = c.Lk, p.kpm_sl = 1;
  p.mask_kind = c.float_mask ? kMaskFloat : kMaskNone;
  p.mask = mask.data(), p.m_sb = int64_t(c.Hq) * c.Lq * c.Lk, p.m_sh = int64_t(c.Lq) * c.Lk, p.m_sq = c.Lk,
  p.m_sk = 1;
  p.B = c.B, p.Hq = c.Hq, p.Hkv = c.Hkv, p.Lq = c.Lq, p.Lk = c.Lk, p.D = c.D, p.Dv = c.Dv;
  p.scale = 1.f / std::sqrt(float(c.D));
  p.causal = c.causal;
  p.dropout = c.dropout_p > 0;
  p.drop_threshold = uint32_t(double(c.dropout_p) * 4294967296.0);
  p.drop_scale = 1.f / (1.f - c.dropout_p);
  p.seed_lo = 0x9abcdef0u, p.seed_hi = 0x12345678u;
  p.vec_q = p.vec_k = p.vec_v = p.vec_do = c.vec;
  p.n_splits = c.splits;
  p.blocks_per_split = cdiv(cdiv(c.Lk, FwdCfg<T, HD>::BN), c.splits);
  p.o_part = o_part.data(), p.lse_part = lse_part.data();
  p.dout = dod.data(), p.do_sb = p.o_sb, p.do_sh = p.o_sh, p.do_sl = p.o_sl;
  p.delta = delta.data(), p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  p.dmask = c.float_mask ? dmask.data() : nullptr;

  using F = FwdCfg<T, HD>;
  using Bw = BwdCfg<T, HD>;
  const port::dim3_t block(kThreads);
  auto* fwd = fwd_kernel<T, HD>;  // named first: MMFAST_LAUNCH is a macro, template commas split it
  auto* combine = combine_kernel<T>;
  auto* delta_k = delta_kernel<T>;
  auto* dkdv = dkdv_kernel<T, HD>;
  auto* dq_k = dq_kernel<T, HD>;
  MMFAST_LAUNCH(fwd, port::dim3_t(c.B * c.Hq, cdiv(c.Lq, F::BM), c.splits), block, F::kSmem, 0, p);
  if (c.splits > 1) MMFAST_LAUNCH(combine, port::dim3_t(cdiv(int(nq) * c.Dv, kThreads)), block, 0, 0, p);
  MMFAST_LAUNCH(delta_k, port::dim3_t(cdiv(int(nq), kWarps)), block, 0, 0, p);
  MMFAST_LAUNCH(dkdv, port::dim3_t(c.B * c.Hkv, cdiv(c.Lk, Bw::BN)), block, Bw::kSmemKV, 0, p);
  MMFAST_LAUNCH(dq_k, port::dim3_t(c.B * c.Hq, cdiv(c.Lq, Bw::BM)), block, Bw::kSmemQ, 0, p);

  const Naive n = naive(c, p, q, k, v, dout, kpm, mask);
  const double tol = sizeof(T) == 4 ? 1e-4 : 3e-2;
  bool ok = close("out", o, n.out, tol, why) && close("lse", lse, n.lse, 1e-4, why) &&
            close("dq", dq, n.dq, tol, why) && close("dk", dk, n.dk, tol, why) &&
            close("dv", dv, n.dv, tol, why);
  if (ok && c.float_mask) ok = close("dmask", dmask, n.dmask, tol, why);
  return ok;
}

}  // namespace

int main() {
  // The emulation performs cp.async copies at the wait, which hides a tile refilled before every
  // warp is done with it; the element-wise load path (vec = false) stores at once, so it exposes
  // such a missing barrier to ThreadSanitizer. The eager cases have 3+ tiles in every loop (a buffer
  // is refilled) and GQA groups of 3-4 heads (the dk/dv loop refills its query tiles too).
  // name, B, Hq, Hkv, Lq, Lk, D, Dv, causal, kpm, float_mask, dropout_p, splits, vec
  const Case cases[] = {
      {"bf16_d64_gqa_kpm_split", 2, 2, 1, 17, 200, 64, 64, false, true, false, 0.f, 2, true},
      {"bf16_d64_gqa_kpm_eager", 1, 4, 1, 17, 200, 64, 64, false, true, false, 0.f, 1, false},
      {"fp16_d128_causal_mask_dropout", 1, 2, 2, 21, 140, 96, 80, true, false, true, 0.25f, 1, true},
      {"fp16_d128_causal_mask_dropout_eager", 1, 2, 2, 21, 140, 96, 80, true, false, true, 0.25f, 1, false},
      {"fp32_d64_causal_split", 1, 1, 1, 9, 75, 48, 64, true, false, false, 0.f, 3, true},
      {"fp32_d64_causal_eager", 1, 3, 1, 9, 75, 48, 64, true, false, false, 0.f, 1, false},
  };
  int failed = 0;
  for (const Case& c : cases) {
    std::string why;
    const std::string name = c.name;
    bool ok;
    if (name.rfind("bf16", 0) == 0) {
      ok = run_case<port::bf16_t, 64>(c, why);
    } else if (name.rfind("fp16", 0) == 0) {
      ok = run_case<port::half_t, 128>(c, why);
    } else {
      ok = run_case<float, 64>(c, why);
    }
    std::printf(ok ? "PASS %s\n" : "FAIL %s: %s\n", c.name, why.c_str());
    failed += !ok;
  }
  return failed ? 1 : 0;
}
