// Backward epilogues of the CPU contrastive losses (math: cpu.h): recompute U, form the gradient
// tile G (InfoNCE's softmax part, SigLIP's sigmoid part), then dx += s G y and dy += s Gᵀ x, over the
// tiles of cpu_tiles.h.
#include <ATen/Dispatch.h>

#include <cmath>
#include <vector>

#include "common/cpu_alloc.h"
#include "common/cpu_exp.h"
#include "contrastive/cpu.h"
#include "contrastive/cpu_tiles.h"

namespace mmfast::contrastive {
namespace {

// s * u rounded to acc_t, never fused with what follows: GCC contracts s * u - r into one FMA
// (-ffp-contract=fast, its default with -mfma), which would skip the rounding of S = s U that the
// forward's log-sum-exp saw, and give P = e^(S - r) != 1 where the forward had exactly 1.
template <typename T>
inline T scaled(T s, T u) {
  T p = s * u;
  asm("" : "+x"(p));
  return p;
}

// ΣG U of one row segment, split into the row weights' terms and the column weights'.
template <typename acc_t>
struct GradSums {
  acc_t gu_row = 0, gu_col = 0, g = 0;
  GradSums& operator+=(const GradSums& o) {
    gu_row += o.gu_row;
    gu_col += o.gu_col;
    g += o.g;
    return *this;
  }
};

// InfoNCE's G over a row segment: G_j = w e^(S_j - r) (+ e_j e^(S_j - c_j) for both directions),
// S = s u rounded as in the forward.
template <bool kBoth, typename acc_t>
GradSums<acc_t> softmax_grad(const acc_t* u, acc_t* G, int64_t n, acc_t s, acc_t w, acc_t r, const acc_t* e,
                             const acc_t* c) {
  GradSums<acc_t> t;
  int64_t j = 0;
#if MMFAST_CONTRASTIVE_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256 vs = _mm256_set1_ps(s), vr = _mm256_set1_ps(r), vw = _mm256_set1_ps(w);
    __m256 arow = _mm256_setzero_ps(), acol = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      const __m256 uj = _mm256_loadu_ps(u + j);
      const __m256 sij = _mm256_mul_ps(vs, uj);
      __m256 v = _mm256_mul_ps(vw, cpu::fast_exp8(_mm256_sub_ps(sij, vr)));
      arow = _mm256_fmadd_ps(v, uj, arow);
      if constexpr (kBoth) {
        const __m256 vc =
            _mm256_mul_ps(_mm256_loadu_ps(e + j), cpu::fast_exp8(_mm256_sub_ps(sij, _mm256_loadu_ps(c + j))));
        acol = _mm256_fmadd_ps(vc, uj, acol);
        v = _mm256_add_ps(v, vc);
      }
      _mm256_storeu_ps(G + j, v);
    }
    t.gu_row = cpu::hsum8(arow);
    t.gu_col = cpu::hsum8(acol);
  }
#endif
  for (; j < n; ++j) {
    const acc_t sij = scaled(s, u[j]);
    acc_t v = w * cpu::fast_exp(sij - r);
    t.gu_row += v * u[j];
    if constexpr (kBoth) {
      const acc_t vc = e[j] * cpu::fast_exp(sij - c[j]);
      t.gu_col += vc * u[j];
      v += vc;
    }
    G[j] = v;
  }
  return t;
}

// G for one row segment: columns [j0, j0 + n) of row i (pos: SigLIP's positive pair).
template <typename acc_t>
GradSums<acc_t> grad_row(const GradArgs& g, int64_t i, int64_t j0, const acc_t* u, acc_t* G, int64_t n,
                         bool pos) {
  const acc_t s = g.s, b = g.b;
  const acc_t w = static_cast<const acc_t*>(g.row_w)[i];
  GradSums<acc_t> t;
  int64_t j = 0;
  if (g.siglip) {  // G = w σ(L) on negatives, -w σ(-L) on the positive; σ(v) = 1 / (1 + e^-v)
    const acc_t sign = pos ? -1 : 1;
#if MMFAST_CONTRASTIVE_AVX2
    if constexpr (std::is_same_v<acc_t, float>) {
      const __m256 vs = _mm256_set1_ps(-sign * s), vb = _mm256_set1_ps(-sign * b),
                   vw = _mm256_set1_ps(sign * w);
      const __m256 one = _mm256_set1_ps(1.f);
      __m256 agu = _mm256_setzero_ps(), ags = _mm256_setzero_ps();
      for (; j + 8 <= n; j += 8) {
        const __m256 uj = _mm256_loadu_ps(u + j);
        const __m256 v = _mm256_div_ps(vw, _mm256_add_ps(one, cpu::fast_exp8(_mm256_fmadd_ps(vs, uj, vb))));
        agu = _mm256_fmadd_ps(v, uj, agu);
        ags = _mm256_add_ps(ags, v);
        _mm256_storeu_ps(G + j, v);
      }
      t.gu_row = cpu::hsum8(agu);
      t.g = cpu::hsum8(ags);
    }
#endif
    for (; j < n; ++j) {
      const acc_t v = sign * w / (acc_t(1) + cpu::fast_exp(-sign * (s * u[j] + b)));
      t.gu_row += v * u[j];
      t.g += v;
      G[j] = v;
    }
    return t;
  }
  const acc_t r = static_cast<const acc_t*>(g.row_lse)[i];
  if (g.col_w == nullptr) return softmax_grad<false, acc_t>(u, G, n, s, w, r, nullptr, nullptr);
  const acc_t* e = static_cast<const acc_t*>(g.col_w) + j0;
  return softmax_grad<true, acc_t>(u, G, n, s, w, r, e, static_cast<const acc_t*>(g.col_lse) + j0);
}

// G for row i of a tile (columns j0 .. j0 + bm - 1), softmax or sigmoid part plus InfoNCE's target
// term. G may alias u (fp32/fp64: G overwrites the U tile in place).
template <typename acc_t>
GradSums<acc_t> grad_tile_row(const GradArgs& g, int64_t i, int64_t j0, int64_t bm, const acc_t* u,
                              acc_t* G) {
  const int64_t l = g.labels[i] < 0 ? -1 : g.labels[i] - j0;  // target / positive column in this tile
  const bool has_target = l >= 0 && l < bm;
  const acc_t ul = has_target ? u[l] : acc_t(0);  // read before G overwrites it
  GradSums<acc_t> t;
  if (!g.siglip || !has_target) {
    t = grad_row<acc_t>(g, i, j0, u, G, bm, false);
  } else {  // SigLIP's positive pair has z = +1
    t += grad_row<acc_t>(g, i, j0, u, G, l, false);
    t += grad_row<acc_t>(g, i, j0 + l, u + l, G + l, 1, true);
    t += grad_row<acc_t>(g, i, j0 + l + 1, u + l + 1, G + l + 1, bm - l - 1, false);
  }
  if (has_target && !g.siglip) {  // G_{i, l_i} -= c_i (a_i from the row term, e_{l_i} from the column term)
    // The products rounded on their own (as the softmax terms' were): a lone candidate's P = 1
    // then gives exactly 0 in Σ G U too.
    G[l] -= static_cast<const acc_t*>(g.target_w)[i];
    t.gu_row -= scaled(static_cast<const acc_t*>(g.row_w)[i], ul);
    if (g.col_w != nullptr) t.gu_col -= scaled(static_cast<const acc_t*>(g.target_e)[i], ul);
  }
  return t;
}

// InfoNCE's gradient tile (grad_tile_row) computed from the logits GEMM's registers (the fp32 sums
// of the fp32 or the bf16 kernel): U is never stored, G (bn x bm, row stride ldg) is, in fp32 or,
// with kBf16, in bf16 together with Gᵀ (bm x bn, row stride ldgt: grad_y's operand). Same formulas
// and rounding steps as softmax_grad, with 16-lane exps (exp_f32x16). Lanes past the last column
// are zeroed before they reach Σ G U (their u is 0, but w e^(0 - r) overflows to inf when r is very
// negative: inf * 0 = NaN). Pointers are offset to the tile: rows by i0, columns by j0.
template <bool kBf16>
struct InfoNceGradTile : cpu::NoBegin {
  using G_t = std::conditional_t<kBf16, uint16_t, float>;
  float s;
  const float* w;         // a_i
  const float* r;         // row LSE
  const float* e;         // e_j, or null for one direction
  const float* c;         // column LSE (with e)
  const int64_t* labels;  // l_i
  int64_t j0;             // the tile's first column
  const float* ce;        // e_{l_i}: G_{i, l_i} gets a_i (P - 1) + e_{l_i} (Q - 1)
  G_t* G;
  int64_t ldg;
  uint16_t* Gt;                   // with kBf16
  int64_t ldgt;                   //
  double gu_row = 0, gu_col = 0;  // Σ G U over the tile, row and column terms

  template <int MR>
  __attribute__((target("avx512f"))) void operator()(int64_t i, int64_t j, __m512 (&acc)[MR][2], __mmask16 m0,
                                                     __mmask16 m1) {
    const __mmask16 mk[2] = {m0, m1};
    const __m512 vs = _mm512_set1_ps(s);
    __m512 ve[2] = {}, vc[2] = {};  // read only with e
    if (e != nullptr) {
      for (int h = 0; h < 2; ++h) {
        ve[h] = _mm512_maskz_loadu_ps(mk[h], e + j + 16 * h);
        vc[h] = _mm512_maskz_loadu_ps(mk[h], c + j + 16 * h);
      }
    }
    __m512 grow = _mm512_setzero_ps(), gcol = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r_ = 0; r_ < MR; ++r_) {
      const int64_t row = i + r_;
      const __m512 vw = _mm512_set1_ps(w[row]), vr = _mm512_set1_ps(r[row]);
      const int64_t l = labels[row] < 0 ? -1 : labels[row] - j0 - j;  // target column within these 32
      for (int h = 0; h < 2; ++h) {
        // the target lane, where the term becomes a (P - 1) (and e (Q - 1)) before it is summed
        const __mmask16 tl = l >= 16 * h && l < 16 * h + 16 ? __mmask16(mk[h] & (1u << (l - 16 * h))) : 0;
        const __m512 u = acc[r_][h];  // masked lanes hold 0 (B was read masked)
        const __m512 sij = _mm512_mul_ps(vs, u);
        __m512 v = _mm512_maskz_mul_ps(mk[h], vw, cpu::exp_f32x16(_mm512_sub_ps(sij, vr)));
        v = _mm512_mask_sub_ps(v, tl, v, vw);
        grow = _mm512_fmadd_ps(v, u, grow);
        if (e != nullptr) {
          __m512 vce = _mm512_maskz_mul_ps(mk[h], ve[h], cpu::exp_f32x16(_mm512_sub_ps(sij, vc[h])));
          vce = _mm512_mask_sub_ps(vce, tl, vce, _mm512_set1_ps(ce[row]));
          gcol = _mm512_fmadd_ps(vce, u, gcol);
          v = _mm512_add_ps(v, vce);
        }
        if constexpr (kBf16) {
          acc[r_][h] = v;  // stored below, rows and columns at once
        } else {
          _mm512_mask_storeu_ps(G + row * ldg + j + 16 * h, mk[h], v);
        }
      }
    }
    if constexpr (kBf16) cpu::store_bf16_tile<MR>(acc, m0, m1, i, j, G, ldg, Gt, ldgt);
    gu_row += static_cast<double>(_mm512_reduce_add_ps(grow));
    gu_col += static_cast<double>(_mm512_reduce_add_ps(gcol));
  }
};

// (dx, dy) in the accumulation dtype and Σ G U (row and column terms), Σ G over all tiles.
//
// Schedule: the columns are cut into as many chunks as the rows (whole column blocks), and the tiles
// run in T = chunks phases: in phase p, row chunk c takes column chunk (c + p) mod T. Within a phase
// no two threads share a row of dx or a row of dy, so both are written in place, with no per-thread
// partial dy and no merge, and every element is summed in the same order on every run.
template <typename scalar_t>
TileGrads tile_grads_t(const at::Tensor& x, const at::Tensor& y, const GradArgs& g) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = x.size(0), M = y.size(0), D = x.size(1);
  const Tiling tl = make_tiling(N, M);
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // dx and dy are not zeroed: the first product into each block overwrites it. They come from the
  // huge-page block cache: a training step gets back the previous step's blocks.
  at::Tensor dx = cpu::empty_hugepage({N, D}, acc_opts);
  at::Tensor dy = cpu::empty_hugepage({M, D}, acc_opts);
  // Whether a row block of dx / a column block of dy has had its first product (which overwrites).
  // A flag is only touched by the thread that owns its block in the current phase.
  std::vector<char> dx_started((N + tl.bn - 1) / tl.bn, 0), dy_started((M + tl.bm - 1) / tl.bm, 0);
  std::vector<GradSums<double>> sums(tl.chunks);
  const TileProducts<scalar_t> tp(x, y, /*backward=*/true);
  // Per-chunk buffers: G in the input dtype for bf16/fp16 (so their GEMMs run on low-precision units;
  // for fp32/fp64 G overwrites the U tile in place), Gᵀ for the vdpbf16ps kernel, one fp32 G row.
  constexpr bool in_place = std::is_same_v<scalar_t, acc_t>;
  std::vector<std::vector<scalar_t>> gbuf(tl.chunks), gtbuf(tl.chunks);
  std::vector<std::vector<acc_t>> row_tmp(tl.chunks);
  // fp32 kernel: each thread's x_blk packed for grad_y, and the row block it holds.
  const bool pack_x = std::is_same_v<scalar_t, float> && tp.avx512();
  std::vector<std::vector<float>> xblk(tl.chunks);
  std::vector<int64_t> xblk_i0(tl.chunks, -1);
  for (int64_t c = 0; c < tl.chunks; ++c) {
    if (pack_x) xblk[c].resize(tp.x_block_size(tl.bn));
    if (!in_place) gbuf[c].resize(tl.bn * tl.bm);
    if (tp.vnni()) gtbuf[c].resize(tl.bm * tl.bn);
    row_tmp[c].resize(tl.bm);
  }
  acc_t* dx_ptr = dx.data_ptr<acc_t>();
  // InfoNCE on the fp32 AVX-512 or the bf16 vdpbf16ps kernel: G straight from the logits' registers.
  const bool fused = tp.fused() && !g.siglip;
  acc_t* dy_ptr = dy.data_ptr<acc_t>();
  for_each_tile_phased<scalar_t>(
      N, M, tl, [&](int64_t c, int64_t i0, int64_t bn, int64_t j0, int64_t bm, acc_t* U) {
        scalar_t* Gout = in_place ? reinterpret_cast<scalar_t*>(U) : gbuf[c].data();
        scalar_t* Gt = gtbuf[c].data();
        if (fused) {
          if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>) {
            constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
            using G_t = typename InfoNceGradTile<kBf16>::G_t;
            const float* e = static_cast<const float*>(g.col_w);
            InfoNceGradTile<kBf16> epi{{},
                                       static_cast<float>(g.s),
                                       static_cast<const float*>(g.row_w) + i0,
                                       static_cast<const float*>(g.row_lse) + i0,
                                       e != nullptr ? e + j0 : nullptr,
                                       e != nullptr ? static_cast<const float*>(g.col_lse) + j0 : nullptr,
                                       g.labels + i0,
                                       j0,
                                       e != nullptr ? static_cast<const float*>(g.target_e) + i0 : nullptr,
                                       reinterpret_cast<G_t*>(Gout),
                                       tl.bm,
                                       reinterpret_cast<uint16_t*>(Gt),
                                       tl.bn};
            tp.logits_epilogue(i0, bn, j0, bm, epi);
            sums[c].gu_row += epi.gu_row;
            sums[c].gu_col += epi.gu_col;
          }
        } else {
          tp.logits(i0, bn, j0, bm, U, tl.bm);
          for (int64_t r = 0; r < bn; ++r) {
            const acc_t* u = U + r * tl.bm;
            acc_t* G = in_place ? U + r * tl.bm : row_tmp[c].data();
            const auto t = grad_tile_row<acc_t>(g, i0 + r, j0, bm, u, G);
            sums[c] += GradSums<double>{t.gu_row, t.gu_col, t.g};
            if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
              cpu::to_bf16(G, Gout + r * tl.bm, bm);
            } else if constexpr (!in_place) {
              std::copy(G, G + bm, Gout + r * tl.bm);
            }
            if (tp.vnni()) {  // Gᵀ column r
              for (int64_t j = 0; j < bm; ++j) Gt[j * tl.bn + r] = Gout[r * tl.bm + j];
            }
          }
        }
        char& dx_on = dx_started[i0 / tl.bn];
        char& dy_on = dy_started[j0 / tl.bm];
        tp.grad_x(i0, bn, j0, bm, Gout, tl.bm, static_cast<acc_t>(g.s), dx_ptr, dx_on != 0);
        if (pack_x && xblk_i0[c] != i0) {
          tp.pack_x_block(i0, bn, xblk[c].data());
          xblk_i0[c] = i0;
        }
        tp.grad_y(i0, bn, j0, bm, Gout, tl.bm, Gt, tl.bn, pack_x ? xblk[c].data() : nullptr,
                  static_cast<acc_t>(g.s), dy_ptr, dy_on != 0);
        dx_on = dy_on = 1;
      });
  GradSums<double> total;
  for (int64_t c = 0; c < tl.chunks; ++c) total += sums[c];
  return {dx, dy, total.gu_row, total.gu_col, total.g};
}

}  // namespace

TileGrads tile_grads(const at::Tensor& x, const at::Tensor& y, const GradArgs& g) {
  TileGrads t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "contrastive_backward",
                                  [&] { t = tile_grads_t<scalar_t>(x, y, g); });
  return t;
}

}  // namespace mmfast::contrastive
