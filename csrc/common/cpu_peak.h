// The CPU's peak multiply-add rate, measured: the denominator of the benchmarks' floors.
//
// Twelve independent accumulator chains of fused multiply-adds (enough to cover the FMA latency on
// every x86 core in use) run for a fixed count on every intra-op thread at once; the rate is
// FLOPs / wall time. "fp32": vfmadd231ps (16 lanes x 2 FLOPs on AVX-512, 8 x 2 on AVX2 only);
// "bf16": vdpbf16ps (32 products + 32 adds per instruction), 0 where the CPU lacks AVX512_BF16.
#pragma once
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "common/cpu_gemm_bf16.h"

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

// GFLOP/s of all intra-op threads together for kind "fp32" or "bf16".
inline double peak_gflops(const std::string& kind, int64_t iters) {
  const bool avx512 = __builtin_cpu_supports("avx512f");
  double flops_per_iter;  // per thread
  if (kind == "bf16") {
    if (!has_avx512_bf16()) return 0.0;
    flops_per_iter = 12 * 32 * 2;
  } else {
    TORCH_CHECK(kind == "fp32", "peak_gflops: kind must be 'fp32' or 'bf16', got '", kind, "'");
    flops_per_iter = 12 * (avx512 ? 16 : 8) * 2;
  }
  const int threads = at::get_num_threads();
  std::vector<float> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      sink[t] = kind == "bf16" ? detail::run_bf16(iters)
                : avx512       ? detail::run_fp32_avx512(iters)
                               : detail::run_fp32_avx2(iters);
    }
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return flops_per_iter * iters * threads / s / 1e9;
}

}  // namespace mmfast::cpu
