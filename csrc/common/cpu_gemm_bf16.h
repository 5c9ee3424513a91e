// bf16 GEMM with fp32 accumulation on the AVX512_BF16 dot-product unit (vdpbf16ps), for CPUs that
// have it but no AMX (AMD Zen 4 / 5, Intel Cooper Lake). There, vdpbf16ps does 32 multiply-adds per
// instruction at the rate of a 16-lane fp32 FMA: twice the fp32 peak. PyTorch exposes no bf16 x bf16
// -> fp32 GEMM that uses it on such CPUs (MKL's runs at about the fp32 rate, oneDNN's bf16 matmul
// rounds its output to bf16).
//
//   C (m x n, fp32, row stride ldc) = (accumulate ? C : 0) + alpha * A (m x K) B (K x n)
//
// A: bf16, row-major with contiguous k (row stride lda). B: packed once by pack_vnni into panels of
// 32 columns; within a panel, pair q holds rows k = 2q and 2q + 1 of its 32 columns interleaved
// ([c][t] at 2c + t), the operand order of vdpbf16ps. Zero padding fills the last panel and, for an
// odd K, the last pair, so a product never reads outside the packed buffer; A is read only inside
// its m x K block (the odd-K tail loads one bf16, zero-extended).
//
// Register tile: 8 rows x 32 columns of fp32 sums (16 zmm), handed to an epilogue (cpu_tile.h) as
// in the fp32 GEMM: StoreC (fp32 C), StoreBf16 (bf16 C), or a caller's (the contrastive loss's
// fused statistics). bf16 values are passed as uint16_t bit patterns (c10::BFloat16 has the same
// layout), so the header needs no torch include. Call only where the CPU has AVX512_BF16.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/cpu_tile.h"

namespace mmfast::cpu {

constexpr int64_t kVnniCols = 32;  // columns per packed panel: two zmm of fp32 accumulators per row

inline int64_t vnni_pairs(int64_t K) { return (K + 1) / 2; }
// Elements of one panel (the panel stride of pack_vnni's output) and of a whole packed K x N matrix.
inline int64_t vnni_panel_stride(int64_t K) { return vnni_pairs(K) * 2 * kVnniCols; }
inline int64_t vnni_packed_size(int64_t K, int64_t N) {
  return (N + kVnniCols - 1) / kVnniCols * vnni_panel_stride(K);
}

// Packs panels [p0, p1) of B (K x N; element (k, n) at b[k * sk + n * sn]) into dst (laid out for the
// whole matrix, vnni_packed_size(K, N) elements). Callers split the panels across threads.
void pack_vnni(const uint16_t* b, int64_t sk, int64_t sn, int64_t K, int64_t N, uint16_t* dst, int64_t p0,
               int64_t p1);

namespace detail {

// One register tile: rows i .. i + MR - 1, columns j .. j + 31 (lanes masked by m0, m1) over pairs
// [0, pairs) of a packed panel, plus the odd-K tail when `odd` (A's element k = 2 * pairs, B's
// zero-padded last pair). A(r, pair q) is the 32-bit word at a + r * lda + q * qs.
template <int MR, typename Epi>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void vnni_tile(
    int64_t pairs, bool odd, const uint16_t* a, int64_t lda, int64_t qs, const uint16_t* b, int64_t i,
    int64_t j, __mmask16 m0, __mmask16 m1, Epi& epi) {
  __m512 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  epi.template begin<MR>(i, j);
  for (int64_t q = 0; q < pairs; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + q * 2 * kVnniCols);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + q * 2 * kVnniCols + kVnniCols);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + q * qs, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  if (odd) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + pairs * 2 * kVnniCols);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + pairs * 2 * kVnniCols + kVnniCols);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(a[r * lda + pairs * qs]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  epi.template operator()<MR>(i, j, acc, m0, m1);
}

template <int MR, typename Epi>
inline void vnni_rows(int64_t m, int64_t pairs, bool odd, const uint16_t* a, int64_t lda, int64_t qs,
                      const uint16_t* b, int64_t i0, int64_t j, __mmask16 m0, __mmask16 m1, Epi& epi) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) vnni_tile<MR>(pairs, odd, a + i * lda, lda, qs, b, i0 + i, j, m0, m1, epi);
  if constexpr (MR > 1) {
    if (i < m) vnni_rows<MR / 2>(m - i, pairs, odd, a + i * lda, lda, qs, b, i0 + i, j, m0, m1, epi);
  }
}

}  // namespace detail

// The product over all of K (row-major A), each register tile handed to epi: the bf16 form of
// gemm_f32_epilogue.
template <typename Epi>
inline void gemm_bf16_vnni_epilogue(int64_t m, int64_t n, int64_t K, const uint16_t* a, int64_t lda,
                                    const uint16_t* b, int64_t panel_stride, Epi& epi) {
  for (int64_t j = 0; j < n; j += kVnniCols) {
    const auto [m0, m1] = col_masks(std::min<int64_t>(kVnniCols, n - j));
    detail::vnni_rows<8>(m, K / 2, K % 2 != 0, a, lda, 2, b + (j / kVnniCols) * panel_stride, 0, j, m0, m1,
                         epi);
  }
}

// C (+)= alpha A B as described at the top. b points at pair k0 / 2 (k0 even) of panel 0 of a packed
// matrix whose panels are panel_stride elements apart; the product uses its pairs k0 / 2 onwards, so
// a row block of a larger packed B needs no repacking.
void gemm_bf16_vnni(int64_t m, int64_t n, int64_t K, float alpha, const uint16_t* a, int64_t lda,
                    const uint16_t* b, int64_t panel_stride, float* c, int64_t ldc, bool accumulate);

// C (m x n, fp32) (+)= alpha X^T B for X (K x m) packed by pack_vnni (xp, panel stride xps): the
// packed panels hold X's row pairs interleaved, which are exactly the k-pairs of the rows of X^T
// (row r's pair q at xp + (r / 32) xps + 64 q + 2 (r % 32)), so a product over K reads X^T without
// transposing X; the interleaving pack is far cheaper than a transpose.
void gemm_bf16_vnni_xt(int64_t m, int64_t n, int64_t K, float alpha, const uint16_t* xp, int64_t xps,
                       const uint16_t* b, int64_t panel_stride, float* c, int64_t ldc, bool accumulate);

// C (m x n, bf16 bits, row stride ldc) = bf16(alpha A B), rounded once from the fp32 sums: for a
// product whose only consumer is a bf16 output. K is not split in chunks (meant for short K).
void gemm_bf16_vnni_to_bf16(int64_t m, int64_t n, int64_t K, float alpha, const uint16_t* a, int64_t lda,
                            const uint16_t* b, int64_t panel_stride, uint16_t* c, int64_t ldc);

}  // namespace mmfast::cpu
