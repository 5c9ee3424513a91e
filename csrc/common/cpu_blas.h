// Small building blocks of the CPU kernels (cross-attention, contrastive): row-major GEMM on raw
// pointers (MKL), row max / exp-sum loops (exps: cpu_exp.h), and the dropout counter hash shared by
// every backend.
//
// GEMM: MKL's Fortran entry points (SGEMM, DGEMM, GEMM_BF16BF16F32, GEMM_F16F16F32) are exported by
// the libtorch_cpu of MKL builds; calling them on raw pointers costs ~1 us, where at::mm on
// from_blob views costs several. They are declared weak: on a torch built without MKL the symbols
// are null and the same calls go through at::mm on views (slower, same results).
#pragma once
#include <ATen/ATen.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/cpu_exp.h"
#include "common/cpu_isa.h"

extern "C" {
// C (col-major) = alpha * op(A) op(B) + beta * C, LP64 (int) dimensions.
void SGEMM(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
           const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void DGEMM(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
           const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
void GEMM_BF16BF16F32(const char*, const char*, const int*, const int*, const int*, const float*,
                      const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*,
                      const int*) __attribute__((weak));
void GEMM_F16F16F32(const char*, const char*, const int*, const int*, const int*, const float*,
                    const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*,
                    const int*) __attribute__((weak));
}

namespace mmfast::cpu {

// Accumulation type: float for fp32/bf16/fp16 inputs, double for fp64 (gradcheck).
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Portable path (no MKL): at::mm on strided views of the raw buffers, in the accumulation type.
template <typename T, typename A>
void gemm_fallback(bool ta, bool tb, int64_t M, int64_t N, int64_t K, A alpha, const T* a, int64_t lda,
                   const T* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  auto opt_in = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto opt_acc = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  // Row-major op(A): M x K. Stored A is M x K (lda) or, transposed, K x M (lda).
  at::Tensor ta_ = ta ? at::from_blob(const_cast<T*>(a), {K, M}, {lda, 1}, opt_in).t()
                      : at::from_blob(const_cast<T*>(a), {M, K}, {lda, 1}, opt_in);
  at::Tensor tb_ = tb ? at::from_blob(const_cast<T*>(b), {N, K}, {ldb, 1}, opt_in).t()
                      : at::from_blob(const_cast<T*>(b), {K, N}, {ldb, 1}, opt_in);
  at::Tensor tc = at::from_blob(c, {M, N}, {ldc, 1}, opt_acc);
  at::Tensor prod = at::mm(ta_.to(opt_acc.dtype()), tb_.to(opt_acc.dtype()));
  if (beta == A(0)) {
    tc.copy_(prod.mul_(alpha));
  } else {
    tc.mul_(beta).add_(prod, alpha);
  }
}

// Row-major C[M x N] (ldc) = alpha * op(A)[M x K] @ op(B)[K x N] + beta * C, accumulated in A.
// op(A) = A (stored M x K, row stride lda) or A^T (stored K x M); same for B. Row-major C is the
// column-major C^T = op(B)^T op(A)^T, which is what the Fortran call computes.
template <typename T, typename A = acc_type<T>>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, A alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, A beta, A* c, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<T, float>) {
    if (SGEMM) return SGEMM(&tra, &trb, &m, &n, &k, &alpha, b, &la, a, &lb, &beta, c, &lc);
  } else if constexpr (std::is_same_v<T, double>) {
    if (DGEMM) return DGEMM(&tra, &trb, &m, &n, &k, &alpha, b, &la, a, &lb, &beta, c, &lc);
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (GEMM_BF16BF16F32) {
      return GEMM_BF16BF16F32(&tra, &trb, &m, &n, &k, &alpha, reinterpret_cast<const uint16_t*>(b), &la,
                              reinterpret_cast<const uint16_t*>(a), &lb, &beta, c, &lc);
    }
  } else if constexpr (std::is_same_v<T, at::Half>) {
    if (GEMM_F16F16F32) {
      return GEMM_F16F16F32(&tra, &trb, &m, &n, &k, &alpha, reinterpret_cast<const uint16_t*>(b), &la,
                            reinterpret_cast<const uint16_t*>(a), &lb, &beta, c, &lc);
    }
  }
  gemm_fallback<T, A>(ta, tb, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
inline float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
#endif

// dst[0..n) = bf16(src[0..n)), round to nearest even (finite inputs: p and ds never hold NaN).
inline void to_bf16(const float* src, at::BFloat16* dst, int64_t n) {
  int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
  for (; c + 16 <= n; c += 16) {
    __m256i h[2];
    for (int half = 0; half < 2; ++half) {
      const __m256i x = _mm256_castps_si256(_mm256_loadu_ps(src + c + 8 * half));
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), one);
      h[half] = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, bias), odd), 16);
    }
    // packus interleaves 128-bit lanes: (a0 b0 a1 b1) -> reorder to (a0 a1 b0 b1).
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h[0], h[1]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), packed);
  }
#endif
  for (; c < n; ++c) dst[c] = static_cast<at::BFloat16>(src[c]);
}

#if defined(__AVX2__) && defined(__FMA__)
// The float forms of row_max and exp_sub_sum with AVX-512 (16 lanes, masked tail), taken where the
// CPU has it: the generic kernel's softmax is a large share of its time where its products run on
// AMX tiles.
__attribute__((target("avx512f"))) inline float row_max_z(const float* s, int64_t n, float init) {
  __m512 m = _mm512_set1_ps(init);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + c));
  if (c < n) {
    const __mmask16 k = __mmask16((1u << (n - c)) - 1);
    m = _mm512_mask_max_ps(m, k, m, _mm512_maskz_loadu_ps(k, s + c));
  }
  return _mm512_reduce_max_ps(m);
}
__attribute__((target("avx512f"))) inline float exp_sub_sum_z(float* s, int64_t n, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 e = exp_f32x16(_mm512_sub_ps(_mm512_loadu_ps(s + c), vm));
    _mm512_storeu_ps(s + c, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (c < n) {
    const __mmask16 k = __mmask16((1u << (n - c)) - 1);
    const __m512 e = exp_f32x16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + c), vm));
    _mm512_mask_storeu_ps(s + c, k, e);
    acc = _mm512_mask_add_ps(acc, k, acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

// max(init, s[0..n)). (A NaN element may be dropped here: exp_sub_sum carries it into the sum.)
template <typename A>
inline A row_max(const A* s, int64_t n, A init) {
  int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<A, float>) {
    if (isa().avx512) return row_max_z(s, n, init);
    __m256 m = _mm256_set1_ps(init);
    for (; c + 8 <= n; c += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + c));
    init = hmax8(m);
  }
#endif
  for (; c < n; ++c) init = std::max(init, s[c]);
  return init;
}

// s[c] = exp(s[c] - m) in place; returns the sum of the new values.
template <typename A>
inline A exp_sub_sum(A* s, int64_t n, A m) {
  int64_t c = 0;
  A sum = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<A, float>) {
    if (isa().avx512) return exp_sub_sum_z(s, n, m);
    const __m256 vm = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (; c + 8 <= n; c += 8) {
      const __m256 e = fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + c), vm));
      _mm256_storeu_ps(s + c, e);
      acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
  }
#endif
  for (; c < n; ++c) {
    s[c] = fast_exp(s[c] - m);
    sum += s[c];
  }
  return sum;
}

// Dropout keep test (mmfast/reference/dropout.py), uint32 arithmetic:
//   x = fmix(fmix(seed_lo ^ row * 0x9E3779B1 ^ col * 0x85EBCA77) ^ seed_hi); keep iff x >= threshold.
inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}
inline uint32_t dropout_hash(uint64_t seed, uint32_t row, uint32_t col) {
  const uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(seed >> 32);
  return fmix32(fmix32(lo ^ (row * 0x9E3779B1u) ^ (col * 0x85EBCA77u)) ^ hi);
}
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace mmfast::cpu
