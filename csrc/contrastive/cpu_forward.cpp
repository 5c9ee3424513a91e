// Forward epilogues of the CPU contrastive losses (math: cpu.h): InfoNCE's online row and column
// log-sum-exp, SigLIP's per-row sums of softplus, over the tiles of cpu_tiles.h.
#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <utility>

#include "common/cpu_exp.h"
#include "contrastive/cpu.h"
#include "contrastive/cpu_tiles.h"

namespace mmfast::contrastive {
namespace {

// ---------------------------------------------------------------------------------------------
// InfoNCE forward: row and column log-sum-exp in one pass over the tiles.
// ---------------------------------------------------------------------------------------------

// Online LSE update of one tile (steps of the forward, after the GEMM):
//   1. S = s U; row max and (if cols) column max of the tile.
//   2. rows: m' = max(m, tile max), l = l e^(m̂ - m̂') + Σ_j e^(S_ij - m̂'), m̂ = shift(m).
//   3. columns: the same along i, vectorized across the tile's columns.
// m is the true running max (it may be ±inf or NaN); the exps are taken against shift(m), m clamped
// to ±FLT_MAX, so +inf - +inf and -inf - -inf never occur (see the file comment).
template <typename acc_t>
inline acc_t shift(acc_t m) {
  return std::min(std::max(m, std::numeric_limits<acc_t>::lowest()), std::numeric_limits<acc_t>::max());
}
#if MMFAST_CONTRASTIVE_AVX2
inline __m256 shift8(__m256 m) {  // NaN stays NaN (max / min return the second operand on NaN)
  return _mm256_min_ps(_mm256_set1_ps(std::numeric_limits<float>::max()),
                       _mm256_max_ps(_mm256_set1_ps(std::numeric_limits<float>::lowest()), m));
}
#endif
__attribute__((target("avx512f"))) inline __m512 shift16(__m512 m) {
  return _mm512_min_ps(_mm512_set1_ps(std::numeric_limits<float>::max()),
                       _mm512_max_ps(_mm512_set1_ps(std::numeric_limits<float>::lowest()), m));
}

// row[j] *= s over a row; returns the row's max and raises colmax[j] to row[j] (colmax may be null).
template <typename acc_t>
acc_t scale_row_max(acc_t* row, int64_t n, acc_t s, acc_t* colmax) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
#if MMFAST_CONTRASTIVE_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256 vs = _mm256_set1_ps(s);
    __m256 vm = _mm256_set1_ps(mx);
    for (; j + 8 <= n; j += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(row + j), vs);
      _mm256_storeu_ps(row + j, v);
      vm = _mm256_max_ps(vm, v);
      if (colmax != nullptr) _mm256_storeu_ps(colmax + j, _mm256_max_ps(_mm256_loadu_ps(colmax + j), v));
    }
    mx = cpu::hmax8(vm);
  }
#endif
  for (; j < n; ++j) {
    row[j] *= s;
    mx = row[j] > mx ? row[j] : mx;
    if (colmax != nullptr) colmax[j] = row[j] > colmax[j] ? row[j] : colmax[j];
  }
  return mx;
}

// Σ_j exp(row[j] - m̂), m̂ = shift(m).
template <typename acc_t>
acc_t sum_exp(const acc_t* row, int64_t n, acc_t m) {
  acc_t sum = 0;
  m = shift(m);
  int64_t j = 0;
#if MMFAST_CONTRASTIVE_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8)
      acc = _mm256_add_ps(acc, cpu::fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vm)));
    sum = cpu::hsum8(acc);
  }
#endif
  for (; j < n; ++j) sum += cpu::fast_exp(row[j] - m);
  return sum;
}

// acc[j] += exp(row[j] - shift(m[j])).
template <typename acc_t>
void add_exp(const acc_t* row, const acc_t* m, acc_t* acc, int64_t n) {
  int64_t j = 0;
#if MMFAST_CONTRASTIVE_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; j + 8 <= n; j += 8) {
      const __m256 e =
          cpu::fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift8(_mm256_loadu_ps(m + j))));
      _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), e));
    }
  }
#endif
  for (; j < n; ++j) acc[j] += cpu::fast_exp(row[j] - shift(m[j]));
}

template <typename acc_t>
void lse_tile(acc_t* S, int64_t ld, int64_t bn, int64_t bm, acc_t s, acc_t* row_m, acc_t* row_l, acc_t* col_m,
              acc_t* col_l, acc_t* col_tmp) {
  if (col_m != nullptr) std::copy(col_m, col_m + bm, col_tmp);
  for (int64_t r = 0; r < bn; ++r) {  // 1. scale, row and column maxima; 2. rows
    acc_t* row = S + r * ld;
    const acc_t m_new = std::max(row_m[r], scale_row_max(row, bm, s, col_m != nullptr ? col_tmp : nullptr));
    row_l[r] = row_l[r] * cpu::fast_exp(shift(row_m[r]) - shift(m_new)) + sum_exp(row, bm, m_new);
    row_m[r] = m_new;
  }
  if (col_m == nullptr) return;
  for (int64_t j = 0; j < bm; ++j) {  // 3. columns
    col_l[j] *= cpu::fast_exp(shift(col_m[j]) - shift(col_tmp[j]));
    col_m[j] = col_tmp[j];
  }
  for (int64_t r = 0; r < bn; ++r) add_exp(S + r * ld, col_m, col_l, bm);
}

// The same online LSE from the logits GEMM's registers (the fp32 sums of the fp32 or the bf16
// kernel, AVX-512), S never stored. Rows keep 16 lanes of state (lane t: the row's columns
// j ≡ t mod 16, each lane its own max and sum), reduced to one (max, log Σ) per row after the row
// block's last tile (row_lanes_done); columns keep the per-chunk (max, sum) as lse_tile does,
// updated once per 8-row register tile. A lane's rescale exp runs only when its max grew. Pointers
// are offset to the tile (rows by i0, columns by j0; the row state is the block's).
struct InfoNceLseTile : cpu::NoBegin {
  float s;
  float* rm;  // (block rows x 16) lane maxima
  float* rl;  // (block rows x 16) lane sums of e^(S - shift(lane max))
  float* cm;  // the chunk's column max and sum, or null for one direction
  float* cl;
  const int64_t* labels;  // l_i
  int64_t j0;             // the tile's first column
  float* tgt;             // t_i = S_{i, l_i}

  template <int MR>
  __attribute__((target("avx512f"))) void operator()(int64_t i, int64_t j, __m512 (&acc)[MR][2], __mmask16 m0,
                                                     __mmask16 m1) {
    const __mmask16 mk[2] = {m0, m1};
    const uint32_t valid = uint32_t(m0) | uint32_t(m1) << 16;
    const __m512 vs = _mm512_set1_ps(s), ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {  // S = s U, -inf past the last column
      acc[r][0] = _mm512_mask_mul_ps(ninf, m0, acc[r][0], vs);
      acc[r][1] = _mm512_mask_mul_ps(ninf, m1, acc[r][1], vs);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const int64_t l = labels[i + r] - j0 - j;  // target column within these 32, if 0 <= l < 32
      if (l >= 0 && l < 32 && (valid >> l & 1u)) tgt[i + r] = acc[r][l / 16][l % 16];
      float* pm = rm + (i + r) * 16;
      float* pl = rl + (i + r) * 16;
      const __m512 m = _mm512_loadu_ps(pm);
      __m512 sum = _mm512_loadu_ps(pl);
      const __m512 mn = _mm512_max_ps(m, _mm512_max_ps(acc[r][0], acc[r][1]));
      const __m512 mns = shift16(mn);
      const __mmask16 grown = _mm512_cmp_ps_mask(mn, m, _CMP_GT_OQ);
      if (grown) sum = _mm512_mask_mul_ps(sum, grown, sum, cpu::exp_f32x16(_mm512_sub_ps(shift16(m), mns)));
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m0, cpu::exp_f32x16(_mm512_sub_ps(acc[r][0], mns))));
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m1, cpu::exp_f32x16(_mm512_sub_ps(acc[r][1], mns))));
      _mm512_storeu_ps(pm, mn);
      _mm512_storeu_ps(pl, sum);
    }
    if (cm == nullptr) return;
    for (int h = 0; h < 2; ++h) {  // lanes past the last column are computed, never stored
      const __m512 m = _mm512_mask_loadu_ps(ninf, mk[h], cm + j + 16 * h);
      __m512 sum = _mm512_maskz_loadu_ps(mk[h], cl + j + 16 * h);
      __m512 mn = m;
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) mn = _mm512_max_ps(mn, acc[r][h]);
      const __m512 mns = shift16(mn);
      const __mmask16 grown = _mm512_mask_cmp_ps_mask(mk[h], mn, m, _CMP_GT_OQ);
      if (grown) sum = _mm512_mask_mul_ps(sum, grown, sum, cpu::exp_f32x16(_mm512_sub_ps(shift16(m), mns)));
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) sum = _mm512_add_ps(sum, cpu::exp_f32x16(_mm512_sub_ps(acc[r][h], mns)));
      _mm512_mask_storeu_ps(cm + j + 16 * h, mk[h], mn);
      _mm512_mask_storeu_ps(cl + j + 16 * h, mk[h], sum);
    }
  }
};

// Row r's lanes of InfoNceLseTile merged into (max, log Σ), then reset for the next row block.
inline std::pair<float, float> row_lanes_done(float* rm, float* rl) {
  float m = -std::numeric_limits<float>::infinity();
  for (int t = 0; t < 16; ++t) m = std::max(m, rm[t]);
  float sum = 0;
  for (int t = 0; t < 16; ++t) {
    if (rl[t] != 0.f) sum += rl[t] * std::exp(shift(rm[t]) - shift(m));  // empty lanes hold (-inf, 0)
    rm[t] = -std::numeric_limits<float>::infinity();
    rl[t] = 0.f;
  }
  return {m, std::log(sum)};
}

template <typename scalar_t>
LseParts info_nce_lse_t(const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels, double scale,
                        bool cols) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = x.size(0), M = y.size(0);
  const Tiling tl = make_tiling(N, M);
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  at::Tensor row_stat = at::empty({2, N}, acc_opts);
  at::Tensor target = at::zeros({N}, acc_opts);
  const int64_t* lab = labels.data_ptr<int64_t>();
  acc_t* tgt = target.data_ptr<acc_t>();
  // Per-chunk column statistics (max, sum-exp), merged in chunk order below.
  at::Tensor col_m = at::full({cols ? tl.chunks : 0, M}, neg_inf, acc_opts);
  at::Tensor col_l = at::zeros({cols ? tl.chunks : 0, M}, acc_opts);
  std::vector<std::vector<acc_t>> row_m(tl.chunks), row_l(tl.chunks), col_tmp(tl.chunks);
  for (int64_t c = 0; c < tl.chunks; ++c) {
    row_m[c].assign(tl.bn, neg_inf);
    row_l[c].assign(tl.bn, 0);
    col_tmp[c].resize(tl.bm);
  }
  acc_t* rmax = row_stat.data_ptr<acc_t>();
  acc_t* rlog = rmax + N;
  const TileProducts<scalar_t> tp(x, y, /*backward=*/false);
  // fp32 on the AVX-512 kernel, bf16 on the vdpbf16ps kernel: the statistics straight from the
  // logits' registers (fp32 sums in both).
  const bool fused = tp.fused();
  std::vector<std::vector<float>> lane_m(fused ? tl.chunks : 0), lane_l(fused ? tl.chunks : 0);
  for (size_t c = 0; c < lane_m.size(); ++c) {
    lane_m[c].assign(tl.bn * 16, -std::numeric_limits<float>::infinity());
    lane_l[c].assign(tl.bn * 16, 0.f);
  }
  for_each_tile<scalar_t>(
      tp, N, M, tl,
      [&](int64_t c, int64_t i0, int64_t bn, int64_t j0, int64_t bm, acc_t* S) {
        acc_t* cm = cols ? col_m[c].data_ptr<acc_t>() + j0 : nullptr;
        acc_t* cl = cols ? col_l[c].data_ptr<acc_t>() + j0 : nullptr;
        if constexpr (std::is_same_v<acc_t, float>) {
          if (fused) {
            InfoNceLseTile epi{
                {},      static_cast<float>(scale), lane_m[c].data(), lane_l[c].data(), cm, cl, lab + i0, j0,
                tgt + i0};
            tp.logits_epilogue(i0, bn, j0, bm, epi);
            return;
          }
        }
        lse_tile<acc_t>(S, tl.bm, bn, bm, static_cast<acc_t>(scale), row_m[c].data(), row_l[c].data(), cm, cl,
                        col_tmp[c].data());
        for (int64_t r = 0; r < bn; ++r) {  // the target logit, if it lies in this tile
          const int64_t j = lab[i0 + r] - j0;
          if (j >= 0 && j < bm) tgt[i0 + r] = S[r * tl.bm + j];
        }
      },
      [&](int64_t c, int64_t i0, int64_t bn) {
        if constexpr (std::is_same_v<acc_t, float>) {
          if (fused) {
            for (int64_t r = 0; r < bn; ++r)
              std::tie(rmax[i0 + r], rlog[i0 + r]) = row_lanes_done(&lane_m[c][r * 16], &lane_l[c][r * 16]);
            return;
          }
        }
        for (int64_t r = 0; r < bn; ++r) {
          rmax[i0 + r] = row_m[c][r];
          rlog[i0 + r] = std::log(row_l[c][r]);
          row_m[c][r] = neg_inf;
          row_l[c][r] = 0;
        }
      },
      /*logits=*/!fused);
  LseParts out{row_stat[0], row_stat[1], at::Tensor(), at::Tensor(), target};
  if (!cols) return out;
  // merge: m_j = max_c m_cj, l_j = Σ_c l_cj e^(shift(m_cj) - shift(m_j))
  const auto lo = std::numeric_limits<acc_t>::lowest(), hi = std::numeric_limits<acc_t>::max();
  out.col_max = std::get<0>(col_m.max(0));
  const at::Tensor m_shift = out.col_max.clamp(lo, hi);
  at::Tensor l = at::zeros({M}, acc_opts);
  for (int64_t c = 0; c < tl.chunks; ++c) l.add_(col_l[c] * (col_m[c].clamp(lo, hi) - m_shift).exp());
  out.col_log = l.log();
  return out;
}

// softplus(v) = log(1 + e^v) = max(v, 0) + log1p(e^-|v|).
template <typename T>
inline T softplus_(T v) {
  return std::max(v, T(0)) + std::log1p(cpu::fast_exp(-std::abs(v)));
}

// ---------------------------------------------------------------------------------------------
// SigLIP forward: per-row sums of softplus(V), V_ij = L_ij off the positive pairs, -L_{i, l_i} on them.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
acc_t softplus_sum(const acc_t* u, int64_t n, acc_t s, acc_t b) {
  acc_t sum = 0;
  int64_t j = 0;
#if MMFAST_CONTRASTIVE_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    // softplus(v) = max(v, 0) + log1p(t), t = e^-|v| in (0, 1]: log1p(t) = 2 atanh(z),
    // z = t / (2 + t) <= 1/3, by its odd series to z^13 (truncation < 1e-8 relative).
    const __m256 vs = _mm256_set1_ps(s), vb = _mm256_set1_ps(b), zero = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.f), two = _mm256_set1_ps(2.f);
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      const __m256 v = _mm256_fmadd_ps(vs, _mm256_loadu_ps(u + j), vb);
      const __m256 t = cpu::fast_exp8(_mm256_or_ps(v, sign));  // e^-|v| (NaN stays NaN)
      const __m256 z = _mm256_div_ps(t, _mm256_add_ps(two, t));
      const __m256 z2 = _mm256_mul_ps(z, z);
      __m256 p = _mm256_set1_ps(1.f / 13);
      p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.f / 11));
      p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.f / 9));
      p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.f / 7));
      p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.f / 5));
      p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.f / 3));
      p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.f));
      const __m256 log1p_t = _mm256_mul_ps(_mm256_mul_ps(two, z), p);
      acc = _mm256_add_ps(acc, _mm256_add_ps(_mm256_max_ps(v, zero), log1p_t));
    }
    sum = cpu::hsum8(acc);
  }
#endif
  for (; j < n; ++j) sum += softplus_(s * u[j] + b);
  return sum;
}

// labels: (N,) each row's positive column (-1: none).
template <typename scalar_t>
at::Tensor siglip_rows_t(const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels, double scale,
                         double bias) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = x.size(0);
  const Tiling tl = make_tiling(N, y.size(0));
  at::Tensor rows = at::zeros({N}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* out = rows.data_ptr<acc_t>();
  const acc_t s = scale, b = bias;
  const int64_t* lab = labels.data_ptr<int64_t>();
  const TileProducts<scalar_t> tp(x, y, /*backward=*/false);
  for_each_tile<scalar_t>(
      tp, N, y.size(0), tl,
      [&](int64_t, int64_t i0, int64_t bn, int64_t j0, int64_t bm, acc_t* U) {
        for (int64_t r = 0; r < bn; ++r) {
          const acc_t* u = U + r * tl.bm;
          const int64_t d = lab[i0 + r] < 0 ? -1 : lab[i0 + r] - j0;  // the positive's column, if 0 <= d < bm
          if (d < 0 || d >= bm) {
            out[i0 + r] += softplus_sum(u, bm, s, b);
          } else {
            out[i0 + r] += softplus_sum(u, d, s, b) + softplus_(-(s * u[d] + b)) +
                           softplus_sum(u + d + 1, bm - d - 1, s, b);
          }
        }
      },
      [](int64_t, int64_t, int64_t) {});
  return rows;
}

}  // namespace

LseParts info_nce_lse(const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels, double scale,
                      bool cols) {
  LseParts p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "info_nce_forward",
                                  [&] { p = info_nce_lse_t<scalar_t>(x, y, labels, scale, cols); });
  return p;
}

at::Tensor siglip_rows(const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels, double scale,
                       double bias) {
  at::Tensor rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "siglip_forward",
                                  [&] { rows = siglip_rows_t<scalar_t>(x, y, labels, scale, bias); });
  return rows;
}

}  // namespace mmfast::contrastive
