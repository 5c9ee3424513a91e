// The non-template bf16 products of cpu_gemm_bf16.h, compiled once for every kernel that calls them.
#include "common/cpu_gemm_bf16.h"

namespace mmfast::cpu {

void pack_vnni(const uint16_t* b, int64_t sk, int64_t sn, int64_t K, int64_t N, uint16_t* dst, int64_t p0,
               int64_t p1) {
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

// K in chunks of kc: a chunk's part of a panel (kc / 2 pairs x 128 bytes = 16 KB) stays in L1 while
// the rows of A go by; C is re-read per chunk (accumulate after the first).
constexpr int64_t kChunkK = 256;

void gemm_bf16_vnni(int64_t m, int64_t n, int64_t K, float alpha, const uint16_t* a, int64_t lda,
                    const uint16_t* b, int64_t panel_stride, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < n; j += kVnniCols) {
    const auto [m0, m1] = col_masks(std::min<int64_t>(kVnniCols, n - j));
    const uint16_t* bp = b + (j / kVnniCols) * panel_stride;
    for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kChunkK) {  // K = 0 still writes C
      const int64_t kk = std::min(kChunkK, K - k0);
      StoreC epi{c, ldc, alpha, accumulate || k0 > 0};
      detail::vnni_rows<8>(m, kk / 2, kk % 2 != 0, a + k0, lda, 2, bp + k0 * kVnniCols, 0, j, m0, m1, epi);
    }
  }
}

void gemm_bf16_vnni_xt(int64_t m, int64_t n, int64_t K, float alpha, const uint16_t* xp, int64_t xps,
                       const uint16_t* b, int64_t panel_stride, float* c, int64_t ldc, bool accumulate) {
  for (int64_t i0 = 0; i0 < m; i0 += kVnniCols) {
    const int64_t rows = std::min<int64_t>(kVnniCols, m - i0);
    const uint16_t* a = xp + (i0 / kVnniCols) * xps;
    for (int64_t j = 0; j < n; j += kVnniCols) {
      const auto [m0, m1] = col_masks(std::min<int64_t>(kVnniCols, n - j));
      const uint16_t* bp = b + (j / kVnniCols) * panel_stride;
      for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kChunkK) {  // K = 0 still writes C
        const int64_t kk = std::min(kChunkK, K - k0);
        StoreC epi{c + i0 * ldc, ldc, alpha, accumulate || k0 > 0};
        detail::vnni_rows<8>(rows, kk / 2, kk % 2 != 0, a + k0 * kVnniCols, 2, 2 * kVnniCols,
                             bp + k0 * kVnniCols, 0, j, m0, m1, epi);
      }
    }
  }
}

void gemm_bf16_vnni_to_bf16(int64_t m, int64_t n, int64_t K, float alpha, const uint16_t* a, int64_t lda,
                            const uint16_t* b, int64_t panel_stride, uint16_t* c, int64_t ldc) {
  StoreBf16 epi{{}, c, ldc, alpha};
  gemm_bf16_vnni_epilogue(m, n, K, a, lda, b, panel_stride, epi);
}

}  // namespace mmfast::cpu
