// bf16 GEMM with fp32 accumulation on the AVX512_BF16 dot-product unit (vdpbf16ps), for CPUs that
// have it but no AMX (AMD Zen 4, Intel Cooper Lake). There, vdpbf16ps does 32 multiply-adds per
// instruction at the rate of a 16-lane fp32 FMA: twice the fp32 peak (measured on Zen 4: 233 vs
// 116 GFLOP/s per core). PyTorch exposes no bf16 x bf16 -> fp32 GEMM that uses it on such CPUs
// (MKL's runs at about the fp32 rate, oneDNN's bf16 matmul rounds its output to bf16).
//
//   C (m x n, fp32, row stride ldc) = (accumulate ? C : 0) + alpha * A (m x K) B (K x n)
//
// A: bf16, row-major with contiguous k (row stride lda). B: packed once by pack_vnni into panels of
// 32 columns; within a panel, pair q holds rows k = 2q and 2q + 1 of its 32 columns interleaved
// ([c][t] at 2c + t), the operand order of vdpbf16ps. Zero padding fills the last panel and, for an
// odd K, the last pair, so a product never reads outside the packed buffer; A is read only inside
// its m x K block (the odd-K tail loads one bf16, zero-extended).
//
// bf16 values are passed as uint16_t bit patterns (c10::BFloat16 has the same layout), so the header
// needs no torch include. Call only when has_avx512_bf16() is true.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace mmfast::cpu {

constexpr int64_t kVnniCols = 32;  // columns per packed panel: two zmm of fp32 accumulators per row

inline bool has_avx512_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

inline int64_t vnni_pairs(int64_t K) { return (K + 1) / 2; }
// Elements of one panel (the panel stride of pack_vnni's output) and of a whole packed K x N matrix.
inline int64_t vnni_panel_stride(int64_t K) { return vnni_pairs(K) * 2 * kVnniCols; }
inline int64_t vnni_packed_size(int64_t K, int64_t N) {
  return (N + kVnniCols - 1) / kVnniCols * vnni_panel_stride(K);
}

// Packs panels [p0, p1) of B (K x N; element (k, n) at b[k * sk + n * sn]) into dst (laid out for the
// whole matrix, vnni_packed_size(K, N) elements). Callers split the panels across threads.
inline void pack_vnni(const uint16_t* b, int64_t sk, int64_t sn, int64_t K, int64_t N, uint16_t* dst,
                      int64_t p0, int64_t p1) {
  const int64_t pairs = vnni_pairs(K);
  for (int64_t p = p0; p < p1; ++p) {
    uint16_t* d = dst + p * vnni_panel_stride(K);
    const int64_t n0 = p * kVnniCols, cols = std::min<int64_t>(kVnniCols, N - n0);
    for (int64_t q = 0; q < pairs; ++q, d += 2 * kVnniCols) {
      const int64_t k = 2 * q;
      const bool odd_tail = k + 1 >= K;
      int64_t c = 0;
      for (; c < cols; ++c) {
        const uint16_t* src = b + k * sk + (n0 + c) * sn;
        d[2 * c] = src[0];
        d[2 * c + 1] = odd_tail ? 0 : src[sk];
      }
      for (; c < kVnniCols; ++c) d[2 * c] = d[2 * c + 1] = 0;
    }
  }
}

namespace detail {

// One register tile: MR rows x 32 columns (n <= 32 valid) over pairs [0, pairs) of a packed panel,
// plus the odd-K tail when `odd` (A's element k = 2 * pairs, B's zero-padded last pair). C is fp32
// (CT = float) or bf16 bits (CT = uint16_t: rounded to nearest even on the store, no accumulate).
template <int MR, typename CT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void vnni_tile(
    int64_t pairs, bool odd, const uint16_t* a, int64_t lda, int64_t qs, const uint16_t* b, CT* c,
    int64_t ldc, int n, float alpha, bool accumulate) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  if (accumulate) {  // C is read after the K loop: start its lines on their way (C may stream from memory)
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 16), _MM_HINT_T0);
    }
  }
  for (int64_t q = 0; q < pairs; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + q * 2 * kVnniCols);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + q * 2 * kVnniCols + kVnniCols);
#pragma GCC unroll 16
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
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(a[r * lda + pairs * qs]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  const __mmask16 m0 = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  const __mmask16 m1 = n >= 32 ? __mmask16(0xFFFF) : n > 16 ? __mmask16((1u << (n - 16)) - 1) : __mmask16(0);
  const __m512 va = _mm512_set1_ps(alpha);
  if constexpr (std::is_same_v<CT, uint16_t>) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      uint16_t* cr = c + r * ldc;
      _mm256_mask_storeu_epi16(cr, m0, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][0], va)));
      _mm256_mask_storeu_epi16(cr + 16, m1, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][1], va)));
    }
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      float* cr = c + r * ldc;
      const __m512 c0 = accumulate ? _mm512_maskz_loadu_ps(m0, cr) : _mm512_setzero_ps();
      const __m512 c1 = accumulate ? _mm512_maskz_loadu_ps(m1, cr + 16) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(cr, m0, _mm512_fmadd_ps(acc[r][0], va, c0));
      _mm512_mask_storeu_ps(cr + 16, m1, _mm512_fmadd_ps(acc[r][1], va, c1));
    }
  }
}

template <int MR, typename CT>
inline void vnni_rows(int64_t m, int64_t pairs, bool odd, const uint16_t* a, int64_t lda, int64_t qs,
                      const uint16_t* b, CT* c, int64_t ldc, int n, float alpha, bool accumulate) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR)
    vnni_tile<MR, CT>(pairs, odd, a + i * lda, lda, qs, b, c + i * ldc, ldc, n, alpha, accumulate);
  if constexpr (MR > 1) {
    if (i < m)
      vnni_rows<MR / 2, CT>(m - i, pairs, odd, a + i * lda, lda, qs, b, c + i * ldc, ldc, n, alpha,
                            accumulate);
  }
}

}  // namespace detail

// C (+)= alpha A B as described at the top. b points at pair k0 / 2 (k0 even) of panel 0 of a packed
// matrix whose panels are panel_stride elements apart; the product uses its pairs k0 / 2 onwards, so
// a row block of a larger packed B needs no repacking.
inline void gemm_bf16_vnni(int64_t m, int64_t n, int64_t K, float alpha, const uint16_t* a, int64_t lda,
                           const uint16_t* b, int64_t panel_stride, float* c, int64_t ldc, bool accumulate) {
  // K in chunks of kc: a chunk's part of a panel (kc / 2 pairs x 128 bytes = 16 KB) stays in L1 while
  // the rows of A go by; C is re-read per chunk (accumulate after the first).
  constexpr int64_t kc = 256;
  for (int64_t j = 0; j < n; j += kVnniCols) {
    const int cols = static_cast<int>(std::min<int64_t>(kVnniCols, n - j));
    const uint16_t* bp = b + (j / kVnniCols) * panel_stride;
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const int64_t kk = std::min(kc, K - k0);
      detail::vnni_rows<8, float>(m, kk / 2, kk % 2 != 0, a + k0, lda, 2, bp + k0 * kVnniCols, c + j, ldc,
                                  cols, alpha, accumulate || k0 > 0);
    }
  }
}

// C (m x n, fp32) (+)= alpha X^T B for X (K x m) packed by pack_vnni (xp, panel stride xps): the
// packed panels hold X's row pairs interleaved, which are exactly the k-pairs of the rows of X^T
// (row r's pair q at xp + (r / 32) xps + 64 q + 2 (r % 32)), so a product over K reads X^T without
// transposing X; the interleaving pack is far cheaper than a transpose.
inline void gemm_bf16_vnni_xt(int64_t m, int64_t n, int64_t K, float alpha, const uint16_t* xp, int64_t xps,
                              const uint16_t* b, int64_t panel_stride, float* c, int64_t ldc,
                              bool accumulate) {
  constexpr int64_t kc = 256;
  for (int64_t i0 = 0; i0 < m; i0 += kVnniCols) {
    const int64_t rows = std::min<int64_t>(kVnniCols, m - i0);
    const uint16_t* a = xp + (i0 / kVnniCols) * xps;
    for (int64_t j = 0; j < n; j += kVnniCols) {
      const int cols = static_cast<int>(std::min<int64_t>(kVnniCols, n - j));
      const uint16_t* bp = b + (j / kVnniCols) * panel_stride;
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t kk = std::min(kc, K - k0);
        detail::vnni_rows<8, float>(rows, kk / 2, kk % 2 != 0, a + k0 * kVnniCols, 2, 2 * kVnniCols,
                                    bp + k0 * kVnniCols, c + i0 * ldc + j, ldc, cols, alpha,
                                    accumulate || k0 > 0);
      }
    }
  }
}

// C (m x n, bf16 bits, row stride ldc) = bf16(alpha A B), rounded once from the fp32 sums: for a
// product whose only consumer is a bf16 output. K is not split in chunks (meant for short K).
inline void gemm_bf16_vnni_to_bf16(int64_t m, int64_t n, int64_t K, float alpha, const uint16_t* a,
                                   int64_t lda, const uint16_t* b, int64_t panel_stride, uint16_t* c,
                                   int64_t ldc) {
  for (int64_t j = 0; j < n; j += kVnniCols) {
    const int cols = static_cast<int>(std::min<int64_t>(kVnniCols, n - j));
    detail::vnni_rows<8, uint16_t>(m, K / 2, K % 2 != 0, a, lda, 2, b + (j / kVnniCols) * panel_stride, c + j,
                                   ldc, cols, alpha, false);
  }
}

}  // namespace mmfast::cpu
