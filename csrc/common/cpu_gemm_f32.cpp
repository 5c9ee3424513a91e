// The non-template fp32 products of cpu_gemm_f32.h, compiled once for every kernel that calls them.
#include "common/cpu_gemm_f32.h"

namespace mmfast::cpu {

void pack_f32(const float* b, int64_t sk, int64_t sn, int64_t K, int64_t N, float* dst, int64_t p0,
              int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kF32Cols, cols = std::min<int64_t>(kF32Cols, N - n0);
    float* d = dst + p * K * kF32Cols;
    for (int64_t k = 0; k < K; ++k, d += kF32Cols) {
      int64_t c = 0;
      for (; c < cols; ++c) d[c] = b[k * sk + (n0 + c) * sn];
      for (; c < kF32Cols; ++c) d[c] = 0.f;
    }
  }
}

// Elements of a B small enough to stay in L1 (16 KB) beside a row tile of A and C.
constexpr int64_t kSmallB = 4096;

void gemm_f32(int64_t m, int64_t n, int64_t K, float alpha, const float* a, int64_t lda, int64_t ka,
              const float* b, int64_t ks, int64_t ps, float* c, int64_t ldc, bool accumulate, bool stream) {
  constexpr int64_t kc = 256;
  if (K * n <= kSmallB) {  // B stays in L1: A row tile by row tile (each read once), across the panels
    StoreC epi{c, ldc, alpha, accumulate, stream};
    for (int64_t i = 0; i < m; i += 8) {
      for (int64_t j = 0; j < n; j += kF32Cols) {
        detail::f32_panel(std::min<int64_t>(8, m - i), std::min<int64_t>(kF32Cols, n - j), K, a + i * lda,
                          lda, ka, b + (j / kF32Cols) * ps, ks, j, epi, i);
      }
    }
    return;
  }
  for (int64_t j = 0; j < n; j += kF32Cols) {
    const float* bp = b + (j / kF32Cols) * ps;
    for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kc) {  // K = 0 still writes C
      StoreC epi{c, ldc, alpha, accumulate || k0 > 0, stream && k0 + kc >= K};
      detail::f32_panel(m, std::min<int64_t>(kF32Cols, n - j), std::min(kc, K - k0), a + k0 * ka, lda, ka,
                        bp + k0 * ks, ks, j, epi);
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)

namespace {

// One MR x (8 NV) tile of C = alpha A B (+ C when accumulate). MR * NV accumulators + NV B vectors
// + 1 broadcast fit the 16 ymm registers for (6, 2).
template <int MR, int NV>
void avx2_tile(int64_t K, float alpha, const float* a, int64_t sm, int64_t sk, const float* b, int64_t ldb,
               float* c, int64_t ldc, bool accumulate, bool stream) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 bv[NV];
    const float* bk = b + k * ldb;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(bk + 8 * v);
    const float* ak = a + k * sk;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(ak + r * sm);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
  const bool nt = stream && ((reinterpret_cast<uintptr_t>(c) | static_cast<uintptr_t>(ldc * 4)) % 32 == 0);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + 8 * v;
      __m256 x = _mm256_mul_ps(acc[r][v], va);
      if (accumulate) x = _mm256_add_ps(x, _mm256_loadu_ps(cp));
      if (nt) {
        _mm256_stream_ps(cp, x);
      } else {
        _mm256_storeu_ps(cp, x);
      }
    }
  }
}

// Rows [0, rows) (rows <= 6) of one column panel of 8 NV columns.
template <int NV>
void avx2_rows(int64_t rows, int64_t K, float alpha, const float* a, int64_t sm, int64_t sk, const float* b,
               int64_t ldb, float* c, int64_t ldc, bool accumulate, bool stream) {
  switch (rows) {
    case 6:
      return avx2_tile<6, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, accumulate, stream);
    case 5:
      return avx2_tile<5, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, accumulate, stream);
    case 4:
      return avx2_tile<4, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, accumulate, stream);
    case 3:
      return avx2_tile<3, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, accumulate, stream);
    case 2:
      return avx2_tile<2, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, accumulate, stream);
    case 1:
      return avx2_tile<1, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, accumulate, stream);
    default:
      return;
  }
}

}  // namespace

// The 6 rows of A stay in L1 while the tile walks across n.
void gemm_f32_avx2(int64_t m, int64_t n, int64_t K, float alpha, const float* a, int64_t lda, int64_t ka,
                   const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate, bool stream) {
  for (int64_t i = 0; i < m; i += 6) {
    const int64_t rows = std::min<int64_t>(6, m - i);
    for (int64_t j = 0; j < n; j += 16) {
      if (n - j >= 16) {
        avx2_rows<2>(rows, K, alpha, a + i * lda, lda, ka, b + j, ldb, c + i * ldc + j, ldc, accumulate,
                     stream);
      } else {  // 8 columns left
        avx2_rows<1>(rows, K, alpha, a + i * lda, lda, ka, b + j, ldb, c + i * ldc + j, ldc, accumulate,
                     stream);
      }
    }
  }
}

#endif

}  // namespace mmfast::cpu
