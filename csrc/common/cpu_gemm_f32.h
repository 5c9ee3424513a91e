// fp32 GEMM on AVX-512 FMA for the tile products of the CPU kernels, where the operands are already
// laid out for it: B is either row-major (k rows of n contiguous floats) or packed once per call in
// panels of 32 columns, and A is read in place with any row and k strides (so A^T costs nothing).
// Per-call packing is what a BLAS has to do and this does not, which is why it beats MKL's SGEMM on
// the contrastive loss's 256 x 256 x 512 tiles (figures: benchmarks/PERFORMANCE.md).
//
//   C (m x n, row stride ldc) = (accumulate ? C : 0) + alpha * A (m x K) B (K x n)
//   A(r, k) = a[r * lda + k * ka]            row-major A: ka = 1; A = X^T of a row-major X: lda = 1
//   B(k, 32 p + c) = b[p * ps + k * ks + c]  row-major B: ks = ldb, ps = 32; packed: ks = 32, ps = 32 K
//
// Register tile: 8 rows x 32 columns (16 zmm accumulators), one broadcast of A per row and k. Tails:
// rows by 4, 2, 1; a last panel narrower than 32 columns uses masked loads and stores, so neither
// operand is read outside its m x K / K x n block. gemm_f32 splits K in chunks of 256 (a chunk of a
// B panel, 32 KB, is reused from L1/L2 by every row of A) and writes C; gemm_f32_epilogue runs the
// whole K and hands each finished register tile to a caller's epilogue instead (the contrastive
// loss computes its softmax statistics and gradient tile there, never storing the logits).
// Call only when has_avx512f() is true.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace mmfast::cpu {

constexpr int64_t kF32Cols = 32;  // columns per panel: two zmm of accumulators per row

inline bool has_avx512f() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

// Packs B (K x N; element (k, n) at b[k * sk + n * sn]) into 32-column panels [p0, p1), k-major,
// zero-padded to 32 columns: dst[p * K * 32 + k * 32 + c] = B(k, 32 p + c). Panel stride K * 32.
inline int64_t f32_packed_size(int64_t K, int64_t N) { return (N + kF32Cols - 1) / kF32Cols * K * kF32Cols; }
inline void pack_f32(const float* b, int64_t sk, int64_t sn, int64_t K, int64_t N, float* dst, int64_t p0,
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

// e^x for 16 lanes: n = round(x log2 e), r = x - n ln 2 (ln 2 split in two, so r is exact to a few
// ulp for any n), e^r by its degree-6 Taylor polynomial on |r| <= ln2 / 2 (relative error < 2e-7),
// scaled by 2^n with vscalefps (underflow to 0 done by the instruction). x is clamped to
// [-104, 88.7] with the bound first, so a NaN lane stays NaN and -inf gives 0.
__attribute__((target("avx512f"))) inline __m512 exp_f32x16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.7f), _mm512_max_ps(_mm512_set1_ps(-104.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// What a register tile does with its sums (acc = A B over the whole K of the call, rows i .. i + MR
// - 1 and columns j .. j + 31 of the product, lanes past the last column masked off by m0 / m1):
// StoreC writes C (+)= alpha acc; a caller's epilogue may instead consume the tile in registers
// (the contrastive loss turns it into its gradient tile). An epilogue has begin<MR>(i, j), called
// before the K loop, and operator()<MR>(i, j, acc, m0, m1) after it.
// Base of an epilogue that needs nothing before the K loop.
struct NoBegin {
  template <int MR>
  void begin(int64_t, int64_t) const {}
};

struct StoreC {
  float* c;
  int64_t ldc;
  float alpha;
  bool accumulate;
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
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* cr = c + (i + r) * ldc + j;
      const __m512 c0 = accumulate ? _mm512_maskz_loadu_ps(m0, cr) : _mm512_setzero_ps();
      const __m512 c1 = accumulate ? _mm512_maskz_loadu_ps(m1, cr + 16) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(cr, m0, _mm512_fmadd_ps(acc[r][0], va, c0));
      _mm512_mask_storeu_ps(cr + 16, m1, _mm512_fmadd_ps(acc[r][1], va, c1));
    }
  }
};

namespace detail {

constexpr int64_t kPrefetchRows = 24;  // B rows ahead (~400 cycles at 16 cycles per k)

// Rows i .. i + MR - 1, columns j .. j + 31: a points at row i, b at the panel's first k.
template <int MR, typename Epi>
__attribute__((target("avx512f"))) inline void f32_tile(int64_t K, const float* a, int64_t lda, int64_t ka,
                                                        const float* b, int64_t ks, int64_t i, int64_t j,
                                                        __mmask16 m0, __mmask16 m1, Epi& epi) {
  __m512 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  epi.template begin<MR>(i, j);
  if (m0 == 0xFFFF && m1 == 0xFFFF) {
    for (int64_t k = 0; k < K; ++k) {
      // B rows ahead into L1: the first row tile of a panel brings them from memory, the others
      // from L2 (a K x 32 panel chunk does not stay in L1 beside A and C); prefetches past the
      // panel's end touch nothing that matters and never fault.
      _mm_prefetch(reinterpret_cast<const char*>(b + (k + kPrefetchRows) * ks), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b + (k + kPrefetchRows) * ks + 16), _MM_HINT_T0);
      const __m512 b0 = _mm512_loadu_ps(b + k * ks);
      const __m512 b1 = _mm512_loadu_ps(b + k * ks + 16);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * lda + k * ka]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      }
    }
  } else {  // last panel of a row-major B: read only its n columns
    for (int64_t k = 0; k < K; ++k) {
      const __m512 b0 = _mm512_maskz_loadu_ps(m0, b + k * ks);
      const __m512 b1 = _mm512_maskz_loadu_ps(m1, b + k * ks + 16);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * lda + k * ka]);
        acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
      }
    }
  }
  epi.template operator()<MR>(i, j, acc, m0, m1);
}

template <int MR, typename Epi>
inline void f32_rows(int64_t m, int64_t K, const float* a, int64_t lda, int64_t ka, const float* b,
                     int64_t ks, int64_t i0, int64_t j, __mmask16 m0, __mmask16 m1, Epi& epi) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) f32_tile<MR>(K, a + i * lda, lda, ka, b, ks, i0 + i, j, m0, m1, epi);
  if constexpr (MR > 1) {
    if (i < m) f32_rows<MR / 2>(m - i, K, a + i * lda, lda, ka, b, ks, i0 + i, j, m0, m1, epi);
  }
}

inline std::pair<__mmask16, __mmask16> col_masks(int64_t cols) {
  const __mmask16 m0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32  ? __mmask16(0xFFFF)
                       : cols > 16 ? __mmask16((1u << (cols - 16)) - 1)
                                   : __mmask16(0);
  return {m0, m1};
}

}  // namespace detail

// The product over all of K, each register tile handed to epi (whole K: the epilogue needs the
// finished sums; a K x 32 panel of B stays in L2 for K up to a few thousand).
template <typename Epi>
inline void gemm_f32_epilogue(int64_t m, int64_t n, int64_t K, const float* a, int64_t lda, int64_t ka,
                              const float* b, int64_t ks, int64_t ps, Epi& epi) {
  for (int64_t j = 0; j < n; j += kF32Cols) {
    const auto [m0, m1] = detail::col_masks(std::min<int64_t>(kF32Cols, n - j));
    detail::f32_rows<8>(m, K, a, lda, ka, b + (j / kF32Cols) * ps, ks, 0, j, m0, m1, epi);
  }
}

// C (+)= alpha A B with the layouts described at the top.
inline void gemm_f32(int64_t m, int64_t n, int64_t K, float alpha, const float* a, int64_t lda, int64_t ka,
                     const float* b, int64_t ks, int64_t ps, float* c, int64_t ldc, bool accumulate) {
  constexpr int64_t kc = 256;
  for (int64_t j = 0; j < n; j += kF32Cols) {
    const auto [m0, m1] = detail::col_masks(std::min<int64_t>(kF32Cols, n - j));
    const float* bp = b + (j / kF32Cols) * ps;
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      StoreC epi{c, ldc, alpha, accumulate || k0 > 0};
      detail::f32_rows<8>(m, std::min(kc, K - k0), a + k0 * ka, lda, ka, bp + k0 * ks, ks, 0, j, m0, m1, epi);
    }
  }
}

}  // namespace mmfast::cpu
