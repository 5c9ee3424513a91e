// fp32 GEMM for the tile products of the CPU kernels (cross-attention's blocks, the contrastive
// losses' tiles), where the operands are already laid out for it: B is either row-major (k rows of n
// contiguous floats) or packed once per call in panels of 32 columns, and A is read in place with
// any row and k strides (so A^T costs nothing). Per-call packing is what a BLAS has to do and this
// does not, which is why it beats MKL's SGEMM on these shapes (figures: benchmarks/PERFORMANCE.md).
//
//   C (m x n, row stride ldc) = (accumulate ? C : 0) + alpha * A (m x K) B (K x n)
//   A(r, k) = a[r * lda + k * ka]            row-major A: ka = 1; A = X^T of a row-major X: lda = 1
//   B(k, 32 p + c) = b[p * ps + k * ks + c]  row-major B: ks = ldb, ps = 32; packed: ks = 32, ps = 32 K
//
// AVX-512 register tile: 8 rows x 32 columns (16 zmm accumulators), one broadcast of A per row and
// k. Tails: rows by 4, 2, 1; a last panel of at most 16 columns runs a 16-column tile, and one
// narrower than its tile uses masked loads and stores, so neither operand is read outside its m x K
// / K x n block. gemm_f32 splits K in chunks of 256 (a chunk of a B panel, 32 KB, is reused from
// L1/L2 by every row of A; where all of B fits in L1, each row tile of A runs across every panel
// instead, so A is read once) and writes C; gemm_f32_epilogue runs the whole K and hands each finished
// register tile to a caller's epilogue instead (the contrastive loss computes its softmax statistics
// and gradient tile there, never storing the logits). Call only where the CPU has AVX-512.
//
// gemm_f32_avx2 is the same product on AVX2 for CPUs without AVX-512: 6 x 16 register tiles (12
// ymm accumulators), B row-major, n a multiple of 8.
//
// The header needs no torch include (benchmarks/contrastive_tiles.cpp builds without torch); the
// non-template products are compiled once, in cpu_gemm_f32.cpp.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "common/cpu_tile.h"

namespace mmfast::cpu {

constexpr int64_t kF32Cols = 32;  // columns per panel: two zmm of accumulators per row

// Packs B (K x N; element (k, n) at b[k * sk + n * sn]) into 32-column panels [p0, p1), k-major,
// zero-padded to 32 columns: dst[p * K * 32 + k * 32 + c] = B(k, 32 p + c). Panel stride K * 32.
inline int64_t f32_packed_size(int64_t K, int64_t N) { return (N + kF32Cols - 1) / kF32Cols * K * kF32Cols; }
void pack_f32(const float* b, int64_t sk, int64_t sn, int64_t K, int64_t N, float* dst, int64_t p0,
              int64_t p1);

namespace detail {

constexpr int64_t kPrefetchRows = 24;  // B rows ahead (~400 cycles at 16 cycles per k)

// Rows i .. i + MR - 1, columns j .. j + 16 NV - 1: a points at row i, b at the panel's first k.
template <int MR, int NV, typename Epi>
__attribute__((target("avx512f"))) inline void f32_tile(int64_t K, const float* a, int64_t lda, int64_t ka,
                                                        const float* b, int64_t ks, int64_t i, int64_t j,
                                                        __mmask16 m0, __mmask16 m1, Epi& epi) {
  static_assert(NV == 1 || NV == 2, "a tile is 16 or 32 columns wide");
  __m512 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  epi.template begin<MR>(i, j);
  if (m0 == 0xFFFF && (NV == 1 || m1 == 0xFFFF)) {
    for (int64_t k = 0; k < K; ++k) {
      // B rows ahead into L1: the first row tile of a panel brings them from memory, the others
      // from L2 (a K x 32 panel chunk does not stay in L1 beside A and C); prefetches past the
      // panel's end touch nothing that matters and never fault.
      _mm_prefetch(reinterpret_cast<const char*>(b + (k + kPrefetchRows) * ks), _MM_HINT_T0);
      if constexpr (NV == 2)
        _mm_prefetch(reinterpret_cast<const char*>(b + (k + kPrefetchRows) * ks + 16), _MM_HINT_T0);
      const __m512 b0 = _mm512_loadu_ps(b + k * ks);
      const __m512 b1 = NV == 2 ? _mm512_loadu_ps(b + k * ks + 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * lda + k * ka]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        if constexpr (NV == 2) acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      }
    }
  } else {  // last panel of a row-major B: read only its n columns
    for (int64_t k = 0; k < K; ++k) {
      const __m512 b0 = _mm512_maskz_loadu_ps(m0, b + k * ks);
      const __m512 b1 = NV == 2 ? _mm512_maskz_loadu_ps(m1, b + k * ks + 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * lda + k * ka]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        if constexpr (NV == 2) acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      }
    }
  }
  epi.template operator()<MR>(i, j, acc, m0, m1);
}

template <int MR, int NV, typename Epi>
inline void f32_rows(int64_t m, int64_t K, const float* a, int64_t lda, int64_t ka, const float* b,
                     int64_t ks, int64_t i0, int64_t j, __mmask16 m0, __mmask16 m1, Epi& epi) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) f32_tile<MR, NV>(K, a + i * lda, lda, ka, b, ks, i0 + i, j, m0, m1, epi);
  if constexpr (MR > 1) {
    if (i < m) f32_rows<MR / 2, NV>(m - i, K, a + i * lda, lda, ka, b, ks, i0 + i, j, m0, m1, epi);
  }
}

// Rows [i0, i0 + m) of one panel of cols <= 32 columns (a points at row i0): a 16-column tile where
// that is enough.
template <typename Epi>
inline void f32_panel(int64_t m, int64_t cols, int64_t K, const float* a, int64_t lda, int64_t ka,
                      const float* b, int64_t ks, int64_t j, Epi& epi, int64_t i0 = 0) {
  const auto [m0, m1] = col_masks(cols);
  if (cols <= 16) return f32_rows<8, 1>(m, K, a, lda, ka, b, ks, i0, j, m0, m1, epi);
  f32_rows<8, 2>(m, K, a, lda, ka, b, ks, i0, j, m0, m1, epi);
}

}  // namespace detail

// The product over all of K, each register tile handed to epi (whole K: the epilogue needs the
// finished sums; a K x 32 panel of B stays in L2 for K up to a few thousand).
template <typename Epi>
inline void gemm_f32_epilogue(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, int64_t ka,
                              const float* b, int64_t ks, int64_t ps, Epi& epi) {
  for (int64_t j = 0; j < n; j += kF32Cols) {
    detail::f32_panel(m, std::min<int64_t>(kF32Cols, n - j), K, a, lda, ka, b + (j / kF32Cols) * ps, ks, j,
                      epi);
  }
}

// C (+)= alpha A B with the layouts described at the top; stream: see StoreC.
void gemm_f32(int64_t m, int64_t n, int64_t K, float alpha, const float* a, int64_t lda, int64_t ka,
              const float* b, int64_t ks, int64_t ps, float* c, int64_t ldc, bool accumulate,
              bool stream = false);

// The same on AVX2 (6 x 16 tiles): row-major B (row stride ldb), n a multiple of 8.
void gemm_f32_avx2(int64_t m, int64_t n, int64_t K, float alpha, const float* a, int64_t lda, int64_t ka,
                   const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate, bool stream = false);

}  // namespace mmfast::cpu
