// The exponentials of the CPU kernels: one scalar, one AVX2 (8 lanes) and one AVX-512 (16 lanes,
// base e or base 2) implementation, shared by cross-attention and the contrastive losses.
//
// All three reduce x = n + r (in units of ln 2 for base e), evaluate the degree-6 Taylor polynomial
// of the remainder (relative error < 3e-7) and scale by 2^n. NaN policy (docs/numerics.md): every
// exp returns NaN for a NaN input, so a NaN score reaches its row's output. The clamps take x as the
// second operand of min / max, which is the operand those instructions return when it is NaN.
// exp(-inf) = 0 (a masked score contributes nothing).
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace mmfast::cpu {

// Taylor coefficients of e^r, highest degree first: 1/6!, ..., 1/1!, 1/0!.
constexpr float kExpPoly[7] = {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f};
// The same for 2^r = e^(r ln 2): (ln 2)^k / k!.
constexpr float kExp2Poly[7] = {1.5403530393381606e-4f,
                                1.3333558146428443e-3f,
                                9.6181291076284772e-3f,
                                5.5504108664821580e-2f,
                                2.4022650695910071e-1f,
                                6.9314718055994531e-1f,
                                1.f};
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2Hi = 0.693145751953125f;      // ln 2 split in two: n * kLn2Hi is exact for
constexpr float kLn2Lo = 1.428606765330187e-06f;  // |n| < 2^11, so r = x - n ln 2 is exact to a few ulp

// exp(x) for float, branch-free so loops over it vectorize: n rounded to nearest by the
// 1.5 * 2^23 trick, 2^n built in the exponent bits. Inputs below -87.3 flush to 0 (the softmax
// never needs them: they are below exp(max) * 2^-126).
inline float fast_exp(float x) {
  const bool nan = x != x;
  const bool tiny = x < -87.3f;
  const float x_in = x;
  x = tiny || nan ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  const float n = (x * kLog2e + 12582912.f) - 12582912.f;
  const float r = std::fma(n, -kLn2Hi, std::fma(n, -kLn2Lo, x));
  float p = kExpPoly[0];
  for (int k = 1; k < 7; ++k) p = std::fma(p, r, kExpPoly[k]);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return nan ? x_in : tiny ? 0.f : p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }

#if defined(__AVX2__) && defined(__FMA__)
// fast_exp on 8 floats (the same steps; _mm256_round_ps rounds to nearest).
inline __m256 fast_exp8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Lo), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Hi), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
#pragma GCC unroll 6
  for (int k = 1; k < 7; ++k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[k]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

// e^x (kBase2 = false) or 2^x (kBase2 = true) for 16 lanes with AVX-512. The scale by 2^n is
// vscalefps (no exponent-bit arithmetic; it underflows to 0 and overflows to inf by itself).
//   base e: x clamped to [-104, 88.7], n = round(x log2 e), r = x - n ln 2 (two-part ln 2);
//   base 2: x clamped below at -160, n = round(x), r = x - n (exact): 12 instructions for 16
//           lanes, for kernels that keep their scores in log2 units (scaled by log2 e once, in a GEMM).
// Call only where the CPU has AVX-512 (cpu::isa().avx512).
template <bool kBase2 = false>
__attribute__((target("avx512f"))) inline __m512 exp_f32x16(__m512 x) {
  __m512 n, r;
  if constexpr (kBase2) {
    x = _mm512_max_ps(_mm512_set1_ps(-160.f), x);
    n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_sub_ps(x, n);
  } else {
    x = _mm512_min_ps(_mm512_set1_ps(88.7f), _mm512_max_ps(_mm512_set1_ps(-104.f), x));
    n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Hi), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Lo), r);
  }
  constexpr const float* c = kBase2 ? kExp2Poly : kExpPoly;
  __m512 p = _mm512_set1_ps(c[0]);
#pragma GCC unroll 6
  for (int k = 1; k < 7; ++k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[k]));
  return _mm512_scalef_ps(p, n);
}

}  // namespace mmfast::cpu
