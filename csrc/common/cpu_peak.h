// The CPU's peak multiply-add rate, measured: the denominator of the benchmarks' floors.
//
// Twelve independent accumulator chains of fused multiply-adds (enough to cover the FMA latency on
// every x86 core in use) run for a fixed count on every intra-op thread at once; the rate is
// FLOPs / wall time. "fp32": vfmadd231ps (16 lanes x 2 FLOPs on AVX-512, 8 x 2 on AVX2 only);
// "bf16": vdpbf16ps (32 products + 32 adds per instruction), 0 where the CPU lacks AVX512_BF16; on a
// CPU with AMX, the rate of a large bf16 GEMM when higher (the AMX tiles are not reachable otherwise).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "common/cpu_isa.h"

namespace mmfast::cpu {
namespace detail {

// Each runner: 12 chains c = op(c), `iters` rounds; returns a lane of the sum so nothing is dead.
__attribute__((target("avx512f"))) inline float run_fp32_avx512(int64_t iters) {
  const __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-3f);
  __m512 c[12];
  for (auto& v : c) v = _mm512_set1_ps(1.f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) c[i] = _mm512_fmadd_ps(a, c[i], b);
  }
  for (int i = 1; i < 12; ++i) c[0] = _mm512_add_ps(c[0], c[i]);
  return _mm512_cvtss_f32(c[0]);
}
__attribute__((target("avx2,fma"))) inline float run_fp32_avx2(int64_t iters) {
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-3f);
  __m256 c[12];
  for (auto& v : c) v = _mm256_set1_ps(1.f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) c[i] = _mm256_fmadd_ps(a, c[i], b);
  }
  for (int i = 1; i < 12; ++i) c[0] = _mm256_add_ps(c[0], c[i]);
  return _mm256_cvtss_f32(c[0]);
}
__attribute__((target("avx512f,avx512bf16"))) inline float run_bf16(int64_t iters) {
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80);  // (1, 1)
  const __m512bh b = (__m512bh)_mm512_set1_epi32(0x3a833a83);  // (1e-3, 1e-3)
  __m512 c[12];
  for (auto& v : c) v = _mm512_setzero_ps();
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) c[i] = _mm512_dpbf16_ps(c[i], a, b);
  }
  for (int i = 1; i < 12; ++i) c[0] = _mm512_add_ps(c[0], c[i]);
  return _mm512_cvtss_f32(c[0]);
}

}  // namespace detail

// bf16 on AMX: the tiles' rate is not reachable from a register loop, so the probe is the best of
// three bf16 GEMMs (at::mm, oneDNN on the AMX tiles) of a size that fills every thread.
inline double amx_bf16_gemm_gflops() {
  constexpr int64_t n = 2048;
  const auto opts = at::TensorOptions().dtype(at::kBFloat16);
  const at::Tensor a = at::ones({n, n}, opts), b = at::ones({n, n}, opts);
  at::mm(a, b);  // warm-up: oneDNN's kernel generation and first-touch pages
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    at::mm(a, b);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * n * n * n / s / 1e9);
  }
  return best;
}

// GFLOP/s of all intra-op threads together for kind "fp32" or "bf16": fp32 from vfmadd231ps, bf16
// from vdpbf16ps (0 without AVX512_BF16) or, on a CPU with AMX, the larger of that and a bf16 GEMM.
inline double peak_gflops(const std::string& kind, int64_t iters) {
  TORCH_CHECK(kind == "fp32" || kind == "bf16", "peak_gflops: kind must be 'fp32' or 'bf16', got '", kind,
              "'");
  const bool bf16 = kind == "bf16", avx512 = isa().avx512;
  const double amx = bf16 && isa().amx_bf16 ? amx_bf16_gemm_gflops() : 0.0;
  if (bf16 && !isa().avx512_bf16) return amx;
  const double flops_per_iter = bf16 ? 12 * 32 * 2 : 12 * (avx512 ? 16 : 8) * 2;  // per thread
  const int threads = at::get_num_threads();
  std::vector<float> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      sink[t] = bf16     ? detail::run_bf16(iters)
                : avx512 ? detail::run_fp32_avx512(iters)
                         : detail::run_fp32_avx2(iters);
    }
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return std::max(amx, flops_per_iter * iters * threads / s / 1e9);
}

}  // namespace mmfast::cpu
