// The register tiles' epilogue interface, shared by the fp32 (cpu_gemm_f32.h) and bf16
// (cpu_gemm_bf16.h) GEMMs: both hold an MR x 32 tile of fp32 sums in MR x 2 zmm registers and hand
// it to an epilogue object when its K loop is done.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <utility>

namespace mmfast::cpu {

// Lane masks of a tile row's two halves for a panel of cols (1..32) valid columns.
inline std::pair<__mmask16, __mmask16> col_masks(int64_t cols) {
  const __mmask16 m0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32  ? __mmask16(0xFFFF)
                       : cols > 16 ? __mmask16((1u << (cols - 16)) - 1)
                                   : __mmask16(0);
  return {m0, m1};
}

// What a register tile does with its sums (acc = A B over the whole K of the call, rows i .. i + MR
// - 1 and columns j .. j + 31 of the product, lanes past the last column masked off by m0 / m1;
// acc[r][1] is 0 and m1 is 0 for a 16-column tile): StoreC writes C (+)= alpha acc; a caller's
// epilogue may instead consume the tile in registers (the contrastive loss turns it into its
// gradient tile). An epilogue has begin<MR>(i, j), called before the K loop, and
// operator()<MR>(i, j, acc, m0, m1) after it. NoBegin: the base of one that needs nothing before.
struct NoBegin {
  template <int MR>
  void begin(int64_t, int64_t) const {}
};

// C (+)= alpha acc. stream: non-temporal stores where a whole tile row is 64-byte aligned (the
// final write of an output no one reads soon: no read-for-ownership of its lines, no eviction of the
// working set; the caller ends with an sfence before another thread reads C).
struct StoreC {
  float* c;
  int64_t ldc;
  float alpha;
  bool accumulate;
  bool stream = false;
  template <int MR>
  __attribute__((target("avx512f"))) void begin(int64_t i, int64_t j) const {
    if (!accumulate) return;  // C is read after the K loop: start its lines on their way
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(c + (i + r) * ldc + j), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + (i + r) * ldc + j + 16), _MM_HINT_T0);
    }
  }
  template <int MR>
  __attribute__((target("avx512f"))) void operator()(int64_t i, int64_t j, __m512 (&acc)[MR][2], __mmask16 m0,
                                                     __mmask16 m1) const {
    const __m512 va = _mm512_set1_ps(alpha);
    const bool nt =
        stream && m0 == 0xFFFF && (m1 == 0xFFFF || m1 == 0) &&
        ((reinterpret_cast<uintptr_t>(c + i * ldc + j) | static_cast<uintptr_t>(ldc * 4)) % 64 == 0);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* cr = c + (i + r) * ldc + j;
      const __m512 c0 = accumulate ? _mm512_maskz_loadu_ps(m0, cr) : _mm512_setzero_ps();
      const __m512 c1 = accumulate ? _mm512_maskz_loadu_ps(m1, cr + 16) : _mm512_setzero_ps();
      const __m512 x0 = _mm512_fmadd_ps(acc[r][0], va, c0), x1 = _mm512_fmadd_ps(acc[r][1], va, c1);
      if (nt) {
        _mm512_stream_ps(cr, x0);
        if (m1) _mm512_stream_ps(cr + 16, x1);
      } else {
        _mm512_mask_storeu_ps(cr, m0, x0);
        _mm512_mask_storeu_ps(cr + 16, m1, x1);
      }
    }
  }
};

// bf16(alpha acc) into a row-major bf16 C (bit patterns; rounded to nearest even once, from the fp32
// sums), no accumulation: for a product whose only consumer is a bf16 output. Needs AVX512_BF16.
struct StoreBf16 : NoBegin {
  uint16_t* c;
  int64_t ldc;
  float alpha;
  template <int MR>
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void operator()(int64_t i, int64_t j,
                                                                                  __m512 (&acc)[MR][2],
                                                                                  __mmask16 m0,
                                                                                  __mmask16 m1) const {
    const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      uint16_t* cr = c + (i + r) * ldc + j;
      _mm256_mask_storeu_epi16(cr, m0, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][0], va)));
      _mm256_mask_storeu_epi16(cr + 16, m1, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][1], va)));
    }
  }
};

// out[c][r] = in[r][c] for an 8 x 8 block of 16-bit values (SSE2 unpacks in three stages).
inline void transpose8x8_u16(const __m128i in[8], __m128i out[8]) {
  __m128i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm_unpacklo_epi16(in[2 * i], in[2 * i + 1]);      // rows 2i, 2i+1: columns 0-3
    t[2 * i + 1] = _mm_unpackhi_epi16(in[2 * i], in[2 * i + 1]);  // columns 4-7
  }
  for (int i = 0; i < 2; ++i) {                                     // rows 4i .. 4i+3
    u[4 * i] = _mm_unpacklo_epi32(t[4 * i], t[4 * i + 2]);          // columns 0, 1
    u[4 * i + 1] = _mm_unpackhi_epi32(t[4 * i], t[4 * i + 2]);      // columns 2, 3
    u[4 * i + 2] = _mm_unpacklo_epi32(t[4 * i + 1], t[4 * i + 3]);  // columns 4, 5
    u[4 * i + 3] = _mm_unpackhi_epi32(t[4 * i + 1], t[4 * i + 3]);  // columns 6, 7
  }
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = _mm_unpacklo_epi64(u[i], u[4 + i]);
    out[2 * i + 1] = _mm_unpackhi_epi64(u[i], u[4 + i]);
  }
}

// An MR x 32 tile of fp32 values v (lanes past the last column masked off by m0, m1) stored as bf16,
// rounded to nearest even: rows i .. i + MR - 1, columns j .. of a row-major g (row stride ldg) and,
// transposed, gt[(j + c) * ldgt + i + r] = v[r][c] (8 x 8 blocks by SSE2 transposes). For an
// epilogue that hands a tile to two bf16 products, one reading it by rows and one by columns.
// Needs AVX512_BF16; called (not inlined) from AVX-512F epilogues.
template <int MR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void store_bf16_tile(
    const __m512 (&v)[MR][2], __mmask16 m0, __mmask16 m1, int64_t i, int64_t j, uint16_t* g, int64_t ldg,
    uint16_t* gt, int64_t ldgt) {
  __m256i h[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    h[r][0] = (__m256i)_mm512_cvtneps_pbh(v[r][0]);
    h[r][1] = (__m256i)_mm512_cvtneps_pbh(v[r][1]);
    _mm256_mask_storeu_epi16(g + (i + r) * ldg + j, m0, h[r][0]);
    _mm256_mask_storeu_epi16(g + (i + r) * ldg + j + 16, m1, h[r][1]);
  }
  const uint32_t valid = uint32_t(m0) | uint32_t(m1) << 16;
  if constexpr (MR == 8) {
    for (int grp = 0; grp < 4; ++grp) {  // columns 8 grp .. 8 grp + 7
      if ((valid >> (8 * grp) & 0xFFu) == 0) continue;
      __m128i in[8], out[8];
      for (int r = 0; r < 8; ++r) {
        in[r] = grp % 2 ? _mm256_extracti128_si256(h[r][grp / 2], 1) : _mm256_castsi256_si128(h[r][grp / 2]);
      }
      transpose8x8_u16(in, out);
      for (int t = 0; t < 8; ++t) {
        const int c = 8 * grp + t;
        if (valid >> c & 1u) _mm_storeu_si128(reinterpret_cast<__m128i*>(gt + (j + c) * ldgt + i), out[t]);
      }
    }
  } else {
    uint16_t rows[MR][32];
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows[r]), h[r][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows[r] + 16), h[r][1]);
    }
    for (int c = 0; c < 32; ++c) {
      if (!(valid >> c & 1u)) continue;
      for (int r = 0; r < MR; ++r) gt[(j + c) * ldgt + i + r] = rows[r][c];
    }
  }
}

}  // namespace mmfast::cpu
