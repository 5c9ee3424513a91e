// Contrastive losses (InfoNCE / CLIP, SigLIP) on the CPU, without ever building the N x M logits.
// Schemas are declared here (the CPU file always compiles); the CUDA file registers its own
// implementations of the same ops.
//
// Notation: x = image features (N x D), y = text features (M x D), s = logit scale, b = logit bias,
// U = x yᵀ (raw dot products), S = s U (logits).
//
// InfoNCE (https://arxiv.org/abs/1807.03748, CLIP https://arxiv.org/abs/2103.00020):
//   r_i = logsumexp_j S_ij (row LSE),  c_j = logsumexp_i S_ij (column LSE),  t_i = S_{i, l_i}
//   (the forward keeps each LSE as the pair (max, log Σ exp(S - max)) and forms the loss as
//   (max - t) + log Σ; it hands the backward r = max + log Σ)
//   image loss  L_img[i] = r_i - t_i;   text loss  L_txt[j] = c_j - t_{inv_j}   (inv = labels⁻¹)
//   "both": row i = (L_img[i] + L_txt[i]) / 2.  "text" is "image" with x and y swapped.
//   With a_i = dLoss/dL_img[i] and e_j = dLoss/dL_txt[j] (from grad_loss and the reduction):
//     G_ij = a_i exp(S_ij - r_i) + e_j exp(S_ij - c_j) - [j == l_i] (a_i + e_j)     (= dLoss/dS_ij)
//     dx = s G y,   dy = s Gᵀ x,   ds = Σ_ij G_ij U_ij  (kept as the a and the e terms' shares).
//   The target logit t_i and the target term of G are taken from the same tile element as the
//   softmax (so P_ii - 1 is formed before the GEMMs: no cancellation between two large terms), and
//   the backward rounds S = s U exactly as the forward did (never fused into an FMA with the
//   subtraction of r_i), so where the exact gradient is 0 (one candidate: P = 1) it is 0.
//   Non-finite logits (NUMERICS.md): the running maxima are clamped to ±FLT_MAX, so a row or
//   column holding +inf gets the log-sum-exp +inf (never inf - inf = NaN), one of only -inf gets
//   -inf, and a NaN stays in the rows and columns that hold it.
//
// SigLIP (https://arxiv.org/abs/2303.15343): L_ij = s U_ij + b, z_ij = 1 at the positive pairs
// (j = l_i; default i = j; l_i = -1: none), z_ij = -1 elsewhere:
//   loss_ij = -log σ(z_ij L_ij) = softplus(-z_ij L_ij);  row i = Σ_j loss_ij
//   dLoss/dL_ij = G_ij = -w_i z_ij σ(-z_ij L_ij);  dx = s G y,  dy = s Gᵀ x,  ds = Σ G U,  db = Σ G.
//
// Algorithm (4 GEMM-equivalents for forward + backward, memory O((N + M) D) + per-thread tiles):
//   The rows are cut into one contiguous chunk per thread; a thread walks its row blocks (BN rows)
//   and, for each, every column block (BM columns):
//   forward   1. U = x_blk y_blkᵀ (one tile GEMM, fp32 accumulation; bf16/fp16 inputs stay in their
//                dtype for the GEMM), S = s U.
//             2. InfoNCE: online max / sum-exp per row (owned by the thread) and per column (a
//                per-thread partial, merged in thread order after the pass); the target logit
//                t_i = S_{i, l_i} when it lies in the tile. SigLIP: row sums.
//   backward  1. recompute U (GEMM), 2. G from U and the saved LSEs, 3. dx_blk += s G y_blk (GEMM),
//                4. dy_blk += s Gᵀ x_blk (GEMM). The columns are cut into chunks too, and the tiles
//                run in phases, each thread on its own row chunk and, in phase p, column chunk
//                (c + p) mod T: dx and dy rows are written in place by one thread at a time. No
//                atomics, no partial copies of dy: for a given thread count the result is the same
//                run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "common/cpu_alloc.h"
#include "common/cpu_blas.h"
#include "common/cpu_gemm_bf16.h"
#include "common/cpu_gemm_f32.h"

// loss: 0 = InfoNCE, 1 = SigLIP; direction: 0 = both, 1 = image, 2 = text;
// reduction: 0 = mean, 1 = sum, 2 = none. scale, bias: 0-dim floating tensors (bias unused by
// InfoNCE). labels: (N,) int64 ((M,) for direction text) or absent (arange); SigLIP: each image's
// positive text, -1 for none, at most one image per text.
// Statistics, one layout on every backend (cpu, cuda, triton, reference): row_stat = the rows'
// log-sum-exp of S (N,), col_stat = the columns' (M,), in the accumulation dtype (fp32; fp64 for
// fp64 input), each empty (0,) when the direction does not read it (image: no col_stat, text: no
// row_stat; SigLIP: both empty). A max is folded into the log-sum-exp and merging two is logaddexp;
// the backward's exp(S - lse) then carries lse's rounding, which is no larger than that of the fp32
// logit S itself.
//
// Block primitives (one tile-block of a larger logits matrix, for losses over logits that no
// process holds whole: the ring of mmfast.nn.ClipLoss):
//   contrastive_block_forward: labels (n,) in [-1, m) = each row's target column in this block (-1:
//     elsewhere; absent: no targets). InfoNCE -> (row_lse (n,), col_lse (m,), target (n,) = S_{i, l_i}
//     or 0). SigLIP -> (rows (n,) = Σ_j softplus(-z_ij L_ij), (0,), (0,)).
//   contrastive_block_backward: G from external final statistics and per-row / per-column loss
//     weights a (n,) and e (m,) (e empty: no column term; SigLIP: rows only) -> (dx (n, D), dy (m, D)
//     in the accumulation dtype, dscale (2,) = [Σ of the a terms' G U, Σ of the e terms' G U],
//     dbias () = Σ G (SigLIP; 0 for InfoNCE)).
TORCH_LIBRARY_FRAGMENT(mmfast, m) {
  m.def(
      "contrastive_forward(Tensor x, Tensor y, Tensor scale, Tensor bias, Tensor? labels, int loss, "
      "int direction, int reduction) -> (Tensor loss, Tensor row_stat, Tensor col_stat)");
  m.def(
      "contrastive_backward(Tensor grad_loss, Tensor x, Tensor y, Tensor scale, Tensor bias, "
      "Tensor? labels, Tensor row_stat, Tensor col_stat, int loss, int direction, int reduction) "
      "-> (Tensor dx, Tensor dy, Tensor dscale, Tensor dbias)");
  m.def(
      "contrastive_block_forward(Tensor x, Tensor y, Tensor scale, Tensor bias, Tensor? labels, "
      "int loss) -> (Tensor row, Tensor col, Tensor target)");
  m.def(
      "contrastive_block_backward(Tensor x, Tensor y, Tensor scale, Tensor bias, Tensor? labels, "
      "Tensor row_lse, Tensor col_lse, Tensor row_weight, Tensor col_weight, int loss) "
      "-> (Tensor dx, Tensor dy, Tensor dscale, Tensor dbias)");
}

namespace mmfast {
namespace contrastive {
namespace {

enum Loss : int64_t { kInfoNce = 0, kSigLip = 1 };
enum Direction : int64_t { kBoth = 0, kImage = 1, kText = 2 };
enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

constexpr int64_t kBlockRows = 256;  // BN: rows of a tile (image features)
constexpr int64_t kBlockCols = 256;  // BM: columns of a tile (text features)

using cpu::acc_type;  // float for fp32 / bf16 / fp16, double for fp64

// ---------------------------------------------------------------------------------------------
// Elementwise math. The loops over a tile's elements are written out with AVX2 intrinsics for float
// (compilers leave the scalar forms unvectorized: the exp's rounding and bit tricks defeat them, and
// they cost as much as the tile GEMMs), with a scalar tail and scalar code for double.
// exp: cpu::fast_exp / fast_exp8 (relative error < 3e-7); exp8 keeps NaN, so a NaN feature gives a
// NaN loss and NaN gradients instead of a clamped number.
// ---------------------------------------------------------------------------------------------
inline float exp_(float x) { return cpu::fast_exp(x); }
inline double exp_(double x) { return std::exp(x); }

#if defined(__AVX2__) && defined(__FMA__)
#define MMFAST_CONTRASTIVE_AVX2 1
inline __m256 exp8(__m256 x) {
  return _mm256_blendv_ps(cpu::fast_exp8(x), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
#else
#define MMFAST_CONTRASTIVE_AVX2 0
#endif

// softplus(v) = log(1 + e^v) = max(v, 0) + log1p(e^-|v|).
template <typename T>
inline T softplus_(T v) {
  return std::max(v, T(0)) + std::log1p(exp_(-std::abs(v)));
}

// ---------------------------------------------------------------------------------------------
// The three tile products, on raw pointers (a tile is ~1 ms of work; ATen calls per tile would add
// allocations and dispatch). x (N x D) and y (M x D) are contiguous.
//   logits: U (bn x bm, row stride ldu) = x_blk y_blkᵀ
//   grad_x: dx_blk (bn x D) += s G y_blk          G: bn x bm in the input dtype, row stride ldg
//   grad_y: dy_blk (bm x D) += s Gᵀ x_blk
// fp32 on a CPU with AVX-512 runs the FMA kernel of common/cpu_gemm_f32.h: yᵀ is packed once per
// call (the size of y), and for the backward y as well (grad_x's B: a panel of a row-major y block
// has its rows D floats apart, which crowds a few L1 sets; packed, the loss runs ~2-3% faster).
// grad_y's B, x_blk, has the same problem and is packed per row block into a per-thread buffer
// (pack_x_block: the size of one block, not of x); its A, Gᵀ, is read straight from G (row stride
// 1). bf16 on a CPU with AVX512_BF16 runs the vdpbf16ps kernel (common/cpu_gemm_bf16.h) on
// operands packed once per call (yᵀ for logits, y and x for the gradients; each the size of the
// input), and grad_y then reads Gᵀ, which the caller writes beside G. Everything else goes to MKL
// (cpu::gemm: SGEMM / DGEMM, or bf16/fp16 x bf16/fp16 -> fp32; on a CPU with AMX, MKL's bf16 GEMM
// runs on the tiles). The path is the one common/cpu_isa.h picks per dtype (mmfast.cpu_options
// forces one: gemm="avx2" or "blas" puts fp32 on MKL, "amx" or "blas" puts bf16 on MKL).
// ---------------------------------------------------------------------------------------------
inline bool vnni_enabled() { return cpu::gemm_for(at::kBFloat16) == cpu::Gemm::kAvx512Bf16; }
inline bool avx512_enabled() { return cpu::gemm_for(at::kFloat) == cpu::Gemm::kAvx512; }

template <typename scalar_t>
class TileProducts {
 public:
  using acc_t = acc_type<scalar_t>;
  static constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
  static constexpr bool kF32 = std::is_same_v<scalar_t, float>;

  TileProducts(const at::Tensor& x, const at::Tensor& y, bool backward)
      : x_(x.data_ptr<scalar_t>()), y_(y.data_ptr<scalar_t>()), N_(x.size(0)), M_(y.size(0)), D_(x.size(1)) {
    if constexpr (kF32) {
      avx512_ = avx512_enabled();
      if (avx512_) {
        yt_f32_ = pack32(y_, 1, D_, D_, M_);                    // yᵀ: K = D, columns = texts
        if (backward) y_rows_f32_ = pack32(y_, D_, 1, M_, D_);  // y: K = texts, columns = D
      }
    }
    if constexpr (kBf16) {
      vnni_ = vnni_enabled();
      if (vnni_) {
        yt_ = pack(raw(y_), 1, D_, D_, M_);  // yᵀ: K = D, columns = texts
        if (backward) {
          y_rows_ = pack(raw(y_), D_, 1, M_, D_);  // y: K = texts, columns = D
          x_rows_ = pack(raw(x_), D_, 1, N_, D_);  // x: K = images, columns = D
        }
      }
    }
  }
  bool vnni() const { return vnni_; }

  void logits(int64_t i0, int64_t bn, int64_t j0, int64_t bm, acc_t* U, int64_t ldu) const {
    if constexpr (kF32) {
      if (avx512_) {  // j0 is a multiple of the column block, so of the panel width
        cpu::gemm_f32(bn, bm, D_, 1.f, x_ + i0 * D_, D_, 1, yt_f32_.data_ptr<float>() + j0 * D_,
                      cpu::kF32Cols, D_ * cpu::kF32Cols, U, ldu, false);
        return;
      }
    }
    if constexpr (kBf16) {
      if (vnni_) {  // j0 is a multiple of the column block, so of the panel width
        const int64_t ps = cpu::vnni_panel_stride(D_);
        cpu::gemm_bf16_vnni(bn, bm, D_, 1.f, raw(x_ + i0 * D_), D_, yt_.get() + j0 / cpu::kVnniCols * ps, ps,
                            U, ldu, false);
        return;
      }
    }
    cpu::gemm<scalar_t>(false, true, bn, bm, D_, acc_t(1), x_ + i0 * D_, D_, y_ + j0 * D_, D_, acc_t(0), U,
                        ldu);
  }
  // fp32 on the AVX-512 kernel only: the logits tile handed to epi in registers (see InfoNceGradTile).
  template <typename Epi>
  void logits_epilogue(int64_t i0, int64_t bn, int64_t j0, int64_t bm, Epi& epi) const {
    if constexpr (kF32) {
      cpu::gemm_f32_epilogue(bn, bm, D_, x_ + i0 * D_, D_, 1, yt_f32_.data_ptr<float>() + j0 * D_,
                             cpu::kF32Cols, D_ * cpu::kF32Cols, epi);
    }
  }
  bool avx512() const { return avx512_; }
  void grad_x(int64_t i0, int64_t bn, int64_t j0, int64_t bm, const scalar_t* G, int64_t ldg, acc_t s,
              acc_t* dx, bool accumulate) const {
    if constexpr (kF32) {
      if (avx512_) {  // B = y_blk, packed: k row j0 of every panel
        cpu::gemm_f32(bn, D_, bm, s, G, ldg, 1, y_rows_f32_.data_ptr<float>() + j0 * cpu::kF32Cols,
                      cpu::kF32Cols, M_ * cpu::kF32Cols, dx + i0 * D_, D_, accumulate);
        return;
      }
    }
    if constexpr (kBf16) {
      if (vnni_) {  // j0 is even: the packed rows of y start at pair j0 / 2
        cpu::gemm_bf16_vnni(bn, D_, bm, s, raw(G), ldg, y_rows_.get() + j0 * cpu::kVnniCols,
                            cpu::vnni_panel_stride(M_), dx + i0 * D_, D_, accumulate);
        return;
      }
    }
    cpu::gemm<scalar_t>(false, false, bn, D_, bm, s, G, ldg, y_ + j0 * D_, D_, acc_t(accumulate ? 1 : 0),
                        dx + i0 * D_, D_);
  }
  // fp32 on the AVX-512 kernel: x_blk (bn rows from i0) packed into xp, grad_y's B (the caller's
  // per-thread buffer of x_block_size(bn) floats, packed once per row block).
  int64_t x_block_size(int64_t bn) const { return cpu::f32_packed_size(bn, D_); }
  void pack_x_block(int64_t i0, int64_t bn, float* xp) const {
    if constexpr (kF32)
      cpu::pack_f32(x_ + i0 * D_, D_, 1, bn, D_, xp, 0, (D_ + cpu::kF32Cols - 1) / cpu::kF32Cols);
  }
  // G (bn x bm, ldg) feeds MKL and the fp32 kernel (with xp, x_blk packed by pack_x_block); Gᵀ
  // (bm x bn, ldgt) the vdpbf16ps kernel.
  void grad_y(int64_t i0, int64_t bn, int64_t j0, int64_t bm, const scalar_t* G, int64_t ldg,
              const scalar_t* Gt, int64_t ldgt, const float* xp, acc_t s, acc_t* dy, bool accumulate) const {
    if constexpr (kF32) {
      if (avx512_) {  // A = Gᵀ read from G (row stride 1, k stride ldg), B = x_blk packed in xp
        cpu::gemm_f32(bm, D_, bn, s, G, 1, ldg, xp, cpu::kF32Cols, bn * cpu::kF32Cols, dy + j0 * D_, D_,
                      accumulate);
        return;
      }
    }
    if constexpr (kBf16) {
      if (vnni_) {  // i0 is even (a multiple of the row block)
        cpu::gemm_bf16_vnni(bm, D_, bn, s, raw(Gt), ldgt, x_rows_.get() + i0 * cpu::kVnniCols,
                            cpu::vnni_panel_stride(N_), dy + j0 * D_, D_, accumulate);
        return;
      }
    }
    cpu::gemm<scalar_t>(true, false, bm, D_, bn, s, G, ldg, x_ + i0 * D_, D_, acc_t(accumulate ? 1 : 0),
                        dy + j0 * D_, D_);
  }

 private:
  static const uint16_t* raw(const scalar_t* p) { return reinterpret_cast<const uint16_t*>(p); }
  // B (K x cols; element (k, n) at b[k * sk + n * sn]) packed for gemm_bf16_vnni, panels in parallel.
  static std::unique_ptr<uint16_t[]> pack(const uint16_t* b, int64_t sk, int64_t sn, int64_t K,
                                          int64_t cols) {
    std::unique_ptr<uint16_t[]> dst(new uint16_t[cpu::vnni_packed_size(K, cols)]);
    const int64_t panels = (cols + cpu::kVnniCols - 1) / cpu::kVnniCols;
    at::parallel_for(0, panels, 1,
                     [&](int64_t p0, int64_t p1) { cpu::pack_vnni(b, sk, sn, K, cols, dst.get(), p0, p1); });
    return dst;
  }
  // The same for gemm_f32 (fp32 only; the caller's scalar_t is float), on 2 MB pages: the logits
  // and grad_x products stream these panels from memory, and on 4 KB pages their TLB misses slow
  // those products by ~5% (per-product replay: benchmarks/contrastive_tiles.cpp; the vdpbf16ps packs
  // measured slower on 2 MB pages and stay on ordinary ones). From the huge-page block cache, so
  // the backward reuses the forward's block and a training loop takes no page faults.
  static at::Tensor pack32(const scalar_t* b, int64_t sk, int64_t sn, int64_t K, int64_t cols) {
    const float* f = reinterpret_cast<const float*>(b);
    at::Tensor dst =
        cpu::empty_hugepage({cpu::f32_packed_size(K, cols)}, at::TensorOptions().dtype(at::kFloat));
    float* d = dst.data_ptr<float>();
    const int64_t panels = (cols + cpu::kF32Cols - 1) / cpu::kF32Cols;
    at::parallel_for(0, panels, 1,
                     [&](int64_t p0, int64_t p1) { cpu::pack_f32(f, sk, sn, K, cols, d, p0, p1); });
    return dst;
  }

  const scalar_t* x_;
  const scalar_t* y_;
  int64_t N_, M_, D_;
  bool vnni_ = false, avx512_ = false;
  std::unique_ptr<uint16_t[]> yt_, y_rows_, x_rows_;
  at::Tensor yt_f32_, y_rows_f32_;
};

// How the rows are cut: one contiguous chunk of row blocks per thread. The forward and the backward
// use the same tiles, so each logit is computed by the same GEMM call (same shapes, same summation
// order, whichever library runs it) in both: the backward reproduces the forward's S bit for bit.
struct Tiling {
  int64_t bn, bm, chunks, rows_per_chunk;
};
Tiling make_tiling(int64_t N, int64_t M) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Smaller row blocks when N is small, so every thread gets rows (multiples of 16 rows).
  int64_t bn = std::min<int64_t>(kBlockRows, (N + threads - 1) / threads);
  bn = std::max<int64_t>(16, (bn + 15) / 16 * 16);
  const int64_t row_blocks = (N + bn - 1) / bn;
  const int64_t chunks = std::min(threads, row_blocks);
  const int64_t rows_per_chunk = (row_blocks + chunks - 1) / chunks * bn;
  // Column blocks narrow enough for every thread to get a column chunk in each phase of the backward
  // (a multiple of 32, the width of the packed panels that a block must start on).
  const int64_t bm =
      std::min({kBlockCols, M, std::max<int64_t>(32, ((M + chunks - 1) / chunks + 31) / 32 * 32)});
  return {bn, bm, chunks, rows_per_chunk};
}

// Calls fn(chunk, i0, bn_actual, j0, bm_actual, U) for every tile of U = x yᵀ: U points to the
// thread's BN x BM acc-dtype workspace (row-major, ld = BM) holding the tile in its top-left corner
// (with logits = false, fn computes the tile itself and U is only the workspace). Chunks run in
// parallel; per_row_block(chunk, i0, bn) runs after each row block's last tile.
template <typename scalar_t, typename TileFn, typename RowFn>
void for_each_tile(const TileProducts<scalar_t>& tp, int64_t N, int64_t M, const Tiling& tl, TileFn&& fn,
                   RowFn&& per_row_block, bool logits = true) {
  using acc_t = acc_type<scalar_t>;
  at::parallel_for(0, tl.chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> U(tl.bn * tl.bm);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r_end = std::min(N, (c + 1) * tl.rows_per_chunk);
      for (int64_t i0 = c * tl.rows_per_chunk; i0 < r_end; i0 += tl.bn) {
        const int64_t bn = std::min(tl.bn, N - i0);
        for (int64_t j0 = 0; j0 < M; j0 += tl.bm) {
          const int64_t bm = std::min(tl.bm, M - j0);
          if (logits) tp.logits(i0, bn, j0, bm, U.data(), tl.bm);
          fn(c, i0, bn, j0, bm, U.data());
        }
        per_row_block(c, i0, bn);
      }
    }
  });
}

// Calls fn(chunk, i0, bn, j0, bm, U) for every tile, in tl.chunks phases: in phase p, row chunk c
// takes the column chunk (c + p) mod T (T = tl.chunks; column chunk q holds the column blocks
// [q B / T, (q + 1) B / T) of the B blocks). U is the thread's BN x BM workspace; fn computes the
// tile. Each phase is one parallel_for, so a phase's writes are done before the next starts.
template <typename scalar_t, typename TileFn>
void for_each_tile_phased(int64_t N, int64_t M, const Tiling& tl, TileFn&& fn) {
  using acc_t = acc_type<scalar_t>;
  const int64_t T = tl.chunks, col_blocks = (M + tl.bm - 1) / tl.bm;
  std::vector<std::vector<acc_t>> U(T);
  for (int64_t p = 0; p < T; ++p) {
    at::parallel_for(0, T, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        U[c].resize(tl.bn * tl.bm);
        const int64_t q = (c + p) % T;
        const int64_t j_begin = q * col_blocks / T * tl.bm;
        const int64_t j_end = std::min(M, (q + 1) * col_blocks / T * tl.bm);
        const int64_t r_end = std::min(N, (c + 1) * tl.rows_per_chunk);
        for (int64_t i0 = c * tl.rows_per_chunk; i0 < r_end; i0 += tl.bn) {
          for (int64_t j0 = j_begin; j0 < j_end; j0 += tl.bm) {
            fn(c, i0, std::min(tl.bn, N - i0), j0, std::min(tl.bm, M - j0), U[c].data());
          }
        }
      }
    });
  }
}

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
    for (; j + 8 <= n; j += 8) acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vm)));
    sum = cpu::hsum8(acc);
  }
#endif
  for (; j < n; ++j) sum += exp_(row[j] - m);
  return sum;
}

// acc[j] += exp(row[j] - shift(m[j])).
template <typename acc_t>
void add_exp(const acc_t* row, const acc_t* m, acc_t* acc, int64_t n) {
  int64_t j = 0;
#if MMFAST_CONTRASTIVE_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), shift8(_mm256_loadu_ps(m + j))));
      _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), e));
    }
  }
#endif
  for (; j < n; ++j) acc[j] += exp_(row[j] - shift(m[j]));
}

template <typename acc_t>
void lse_tile(acc_t* S, int64_t ld, int64_t bn, int64_t bm, acc_t s, acc_t* row_m, acc_t* row_l, acc_t* col_m,
              acc_t* col_l, acc_t* col_tmp) {
  if (col_m != nullptr) std::copy(col_m, col_m + bm, col_tmp);
  for (int64_t r = 0; r < bn; ++r) {  // 1. scale, row and column maxima; 2. rows
    acc_t* row = S + r * ld;
    const acc_t m_new = std::max(row_m[r], scale_row_max(row, bm, s, col_m != nullptr ? col_tmp : nullptr));
    row_l[r] = row_l[r] * exp_(shift(row_m[r]) - shift(m_new)) + sum_exp(row, bm, m_new);
    row_m[r] = m_new;
  }
  if (col_m == nullptr) return;
  for (int64_t j = 0; j < bm; ++j) {  // 3. columns
    col_l[j] *= exp_(shift(col_m[j]) - shift(col_tmp[j]));
    col_m[j] = col_tmp[j];
  }
  for (int64_t r = 0; r < bn; ++r) add_exp(S + r * ld, col_m, col_l, bm);
}

// The same online LSE from the logits GEMM's registers (fp32, AVX-512), S never stored. Rows keep
// 16 lanes of state (lane t: the row's columns j ≡ t mod 16, each lane its own max and sum),
// reduced to one (max, log Σ) per row after the row block's last tile (row_lanes_done); columns
// keep the per-chunk (max, sum) as lse_tile does, updated once per 8-row register tile. A lane's
// rescale exp runs only when its max grew. Pointers are offset to the tile (rows by i0, columns
// by j0; the row state is the block's).
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

// The forward's statistics, in the accumulation dtype: each log-sum-exp as (max, log Σ exp(S -
// shift(max))) over rows (N) and, with cols, columns (M); target logits t_i = S_{i, l_i} (0 where
// l_i = -1 or out of [0, M)).
struct LseParts {
  at::Tensor row_max, row_log, col_max, col_log, target;
  at::Tensor row_lse() const { return row_max + row_log; }
  at::Tensor col_lse() const { return col_max + col_log; }
};

template <typename scalar_t>
LseParts info_nce_lse(const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels, double scale,
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
  // fp32 on the AVX-512 kernel: the statistics straight from the logits' registers.
  const bool fused = std::is_same_v<scalar_t, float> && tp.avx512();
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
        if constexpr (std::is_same_v<scalar_t, float>) {
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
        if constexpr (std::is_same_v<scalar_t, float>) {
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
      const __m256 t = exp8(_mm256_or_ps(v, sign));  // e^-|v| (NaN stays NaN)
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
at::Tensor siglip_rows(const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels, double scale,
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

// ---------------------------------------------------------------------------------------------
// Backward: recompute U, G (softmax or sigmoid part), then dx += s G y and dy += s Gᵀ x.
// ---------------------------------------------------------------------------------------------
struct GradArgs {
  double s, b;
  const void* row_w;      // (N,) a_i (InfoNCE image weights) or w_i (SigLIP)
  const void* col_w;      // (M,) e_j or null (InfoNCE text weights)
  const void* row_lse;    // (N,) r_i (InfoNCE only)
  const void* col_lse;    // (M,) c_j or null
  const int64_t* labels;  // (N,) InfoNCE targets l_i / SigLIP positives (-1: none in this matrix)
  const void* target_w;   // (N,) InfoNCE c_i = a_i + e_{l_i}: G_{i, l_i} -= c_i
  const void* target_e;   // (N,) InfoNCE e_{l_i} (the column term's share of c_i, for Σ G U)
  bool siglip;
};

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
      __m256 v = _mm256_mul_ps(vw, exp8(_mm256_sub_ps(sij, vr)));
      arow = _mm256_fmadd_ps(v, uj, arow);
      if constexpr (kBoth) {
        const __m256 vc =
            _mm256_mul_ps(_mm256_loadu_ps(e + j), exp8(_mm256_sub_ps(sij, _mm256_loadu_ps(c + j))));
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
    acc_t v = w * exp_(sij - r);
    t.gu_row += v * u[j];
    if constexpr (kBoth) {
      const acc_t vc = e[j] * exp_(sij - c[j]);
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
        const __m256 v = _mm256_div_ps(vw, _mm256_add_ps(one, exp8(_mm256_fmadd_ps(vs, uj, vb))));
        agu = _mm256_fmadd_ps(v, uj, agu);
        ags = _mm256_add_ps(ags, v);
        _mm256_storeu_ps(G + j, v);
      }
      t.gu_row = cpu::hsum8(agu);
      t.g = cpu::hsum8(ags);
    }
#endif
    for (; j < n; ++j) {
      const acc_t v = sign * w / (acc_t(1) + exp_(-sign * (s * u[j] + b)));
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

// InfoNCE's gradient tile (grad_tile_row for fp32) computed from the logits GEMM's registers: U is
// never stored, G (bn x bm, row stride ldg) is. Same formulas and rounding steps as softmax_grad,
// with 16-lane exps (exp_f32x16). Lanes past the last column are zeroed before they reach Σ G U
// (their u is 0, but w e^(0 - r) overflows to inf when r is very negative: inf * 0 = NaN).
// Pointers are offset to the tile: rows by i0, columns by j0.
struct InfoNceGradTile : cpu::NoBegin {
  float s;
  const float* w;         // a_i
  const float* r;         // row LSE
  const float* e;         // e_j, or null for one direction
  const float* c;         // column LSE (with e)
  const int64_t* labels;  // l_i
  int64_t j0;             // the tile's first column
  const float* ce;        // e_{l_i}: G_{i, l_i} gets a_i (P - 1) + e_{l_i} (Q - 1)
  float* G;
  int64_t ldg;
  double gu_row = 0, gu_col = 0;  // Σ G U over the tile, row and column terms

  template <int MR>
  __attribute__((target("avx512f"))) void operator()(int64_t i, int64_t j, __m512 (&acc)[MR][2], __mmask16 m0,
                                                     __mmask16 m1) {
    const __mmask16 mk[2] = {m0, m1};
    const __m512 vs = _mm512_set1_ps(s);
    __m512 ve[2], vc[2];
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
        _mm512_mask_storeu_ps(G + row * ldg + j + 16 * h, mk[h], v);
      }
    }
    gu_row += static_cast<double>(_mm512_reduce_add_ps(grow));
    gu_col += static_cast<double>(_mm512_reduce_add_ps(gcol));
  }
};

struct TileGrads {
  at::Tensor dx, dy;  // accumulation dtype
  double gu_row, gu_col, g;
};

// (dx, dy) in the accumulation dtype and Σ G U (row and column terms), Σ G over all tiles.
//
// Schedule: the columns are cut into as many chunks as the rows (whole column blocks), and the tiles
// run in T = chunks phases: in phase p, row chunk c takes column chunk (c + p) mod T. Within a phase
// no two threads share a row of dx or a row of dy, so both are written in place, with no per-thread
// partial dy and no merge, and every element is summed in the same order on every run.
template <typename scalar_t>
TileGrads tile_grads(const at::Tensor& x, const at::Tensor& y, const GradArgs& g) {
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
  // fp32 InfoNCE on the AVX-512 kernel: G straight from the logits' registers.
  const bool fused = std::is_same_v<scalar_t, float> && tp.avx512() && !g.siglip;
  acc_t* dy_ptr = dy.data_ptr<acc_t>();
  for_each_tile_phased<scalar_t>(
      N, M, tl, [&](int64_t c, int64_t i0, int64_t bn, int64_t j0, int64_t bm, acc_t* U) {
        scalar_t* Gout = in_place ? reinterpret_cast<scalar_t*>(U) : gbuf[c].data();
        scalar_t* Gt = gtbuf[c].data();
        if (fused) {
          if constexpr (std::is_same_v<scalar_t, float>) {
            const float* e = static_cast<const float*>(g.col_w);
            InfoNceGradTile epi{{},
                                static_cast<float>(g.s),
                                static_cast<const float*>(g.row_w) + i0,
                                static_cast<const float*>(g.row_lse) + i0,
                                e != nullptr ? e + j0 : nullptr,
                                e != nullptr ? static_cast<const float*>(g.col_lse) + j0 : nullptr,
                                g.labels + i0,
                                j0,
                                e != nullptr ? static_cast<const float*>(g.target_e) + i0 : nullptr,
                                U,
                                tl.bm};
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

// ---------------------------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------------------------
at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_features(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "contrastive: x and y must be 2-D (N x D, M x D), got ",
              x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.size(1) == y.size(1), "contrastive: x has D=", x.size(1), " but y has D=", y.size(1));
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "contrastive: x is ", x.scalar_type(), " but y is ",
              y.scalar_type());
  TORCH_CHECK(x.size(0) > 0 && y.size(0) > 0 && x.size(1) > 0, "contrastive: empty input ", x.sizes(), ", ",
              y.sizes());
}

void check_labels(const std::optional<at::Tensor>& labels, int64_t rows) {
  if (!labels.has_value()) return;
  TORCH_CHECK(labels->scalar_type() == at::kLong, "contrastive: labels must be int64");
  TORCH_CHECK(labels->dim() == 1 && labels->size(0) == rows, "contrastive: labels must have shape (", rows,
              ",), got ", labels->sizes());
}

void check_inputs(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& labels,
                  int64_t loss, int64_t direction, int64_t reduction) {
  check_features(x, y);
  TORCH_CHECK(loss == kInfoNce || loss == kSigLip, "contrastive: loss must be 0 or 1, got ", loss);
  TORCH_CHECK(direction >= kBoth && direction <= kText, "contrastive: direction must be 0, 1 or 2");
  TORCH_CHECK(reduction >= kMean && reduction <= kNone, "contrastive: reduction must be 0, 1 or 2");
  TORCH_CHECK((direction == kImage && loss == kInfoNce) || x.size(0) == y.size(0) || direction == kText,
              "contrastive: this loss and direction need N == M, got ", x.size(0), " and ", y.size(0));
  check_labels(labels, loss == kInfoNce && direction == kText ? y.size(0) : x.size(0));
}

// Each row's target column (default arange), checked to lie in [lo, classes): lo = 0 for InfoNCE's
// targets, -1 where a row may have none (SigLIP's positives, the blocks).
at::Tensor targets(const std::optional<at::Tensor>& labels, int64_t n, int64_t classes,
                   const at::Tensor& like, int64_t lo = 0) {
  if (!labels.has_value()) {
    TORCH_CHECK(n <= classes, "contrastive: default labels need at least as many columns (", classes,
                ") as rows (", n, ")");
    return at::arange(n, like.options().dtype(at::kLong));
  }
  const at::Tensor t = labels->contiguous();
  TORCH_CHECK(n == 0 || (t.min().item<int64_t>() >= lo && t.max().item<int64_t>() < classes),
              "contrastive: labels must lie in [", lo, ", ", classes, ")");
  return t;
}
at::Tensor inverse_permutation(const at::Tensor& perm) {
  TORCH_CHECK(at::bincount(perm, {}, perm.size(0)).eq(1).all().item<bool>(),
              "contrastive: labels must be a permutation of 0..N-1 for direction both");
  at::Tensor inv = at::empty_like(perm);
  inv.index_put_({perm}, at::arange(perm.size(0), perm.options()));
  return inv;
}

// Per-row weight of a loss vector of length n under `reduction`: g_i, g / n or g, times `factor`.
at::Tensor row_weights(const at::Tensor& grad_loss, int64_t n, int64_t reduction, double factor,
                       at::ScalarType acc) {
  at::Tensor g = grad_loss.to(acc);
  if (reduction == kNone) return (g * factor).contiguous();
  if (reduction == kMean) g = g / static_cast<double>(n);
  return (g * factor).reshape({1}).expand({n}).contiguous();
}

at::Tensor reduce(const at::Tensor& rows, int64_t reduction, double mean_divisor) {
  if (reduction == kNone) return rows;
  if (reduction == kSum) return rows.sum();
  return rows.sum() / mean_divisor;
}

// One log-sum-exp statistic: (n,) in the accumulation dtype, checked against its expected length.
at::Tensor stat(const at::Tensor& t, int64_t n, at::ScalarType acc, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "contrastive: ", name, " must have shape (", n, ",), got ",
              t.sizes());
  return t.to(acc).contiguous();
}

// The backward of the whole loss or of a block. x (n x D), y (m x D) contiguous; tgt (n,) targets
// (-1: none); row_w (n,) and col_w (m,) or undefined; row_lse (n,), col_lse (m,) or undefined.
TileGrads run_grads(const at::Tensor& x, const at::Tensor& y, double s, double b, const at::Tensor& tgt,
                    const at::Tensor& row_w, const at::Tensor& col_w, const at::Tensor& row_lse,
                    const at::Tensor& col_lse, bool siglip) {
  const bool cols = col_w.defined();
  // c_i = a_i + e_{l_i} and its column share e_{l_i} (0 where l_i = -1: never read).
  const at::Tensor ce = cols ? col_w.index_select(0, tgt.clamp_min(0)) : at::Tensor();
  const at::Tensor cw = cols ? (row_w + ce).contiguous() : row_w;
  GradArgs g{s,
             b,
             row_w.data_ptr(),
             cols ? col_w.data_ptr() : nullptr,
             row_lse.defined() ? row_lse.data_ptr() : nullptr,
             cols ? col_lse.data_ptr() : nullptr,
             tgt.data_ptr<int64_t>(),
             cw.data_ptr(),
             cols ? ce.data_ptr() : nullptr,
             siglip};
  TileGrads t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "contrastive_backward",
                                  [&] { t = tile_grads<scalar_t>(x, y, g); });
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& bias,
    const std::optional<at::Tensor>& labels, int64_t loss, int64_t direction, int64_t reduction) {
  check_inputs(x_in, y_in, labels, loss, direction, reduction);
  const bool swap = loss == kInfoNce && direction == kText;  // "text" = "image" with x and y swapped
  const at::Tensor x = (swap ? y_in : x_in).contiguous();
  const at::Tensor y = (swap ? x_in : y_in).contiguous();
  const double s = scale.item<double>();
  const auto acc = acc_dtype(x);
  const at::Tensor empty = at::empty({0}, x.options().dtype(acc));
  if (loss == kSigLip) {
    const at::Tensor tgt = targets(labels, x.size(0), y.size(0), x, -1);
    at::Tensor rows;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "siglip_forward",
                                    [&] { rows = siglip_rows<scalar_t>(x, y, tgt, s, bias.item<double>()); });
    return {reduce(rows, reduction, x.size(0)), empty, empty.clone()};
  }
  const bool both = direction == kBoth;
  const at::Tensor tgt = targets(labels, x.size(0), y.size(0), x);
  const at::Tensor inv = both ? inverse_permutation(tgt) : at::Tensor();
  LseParts p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "info_nce_forward",
                                  [&] { p = info_nce_lse<scalar_t>(x, y, tgt, s, both); });
  at::Tensor rows = (p.row_max - p.target) + p.row_log;  // lse - t = (max - t) + log Σ
  if (both) rows = 0.5 * (rows + ((p.col_max - p.target.index_select(0, inv)) + p.col_log));
  const at::Tensor out = reduce(rows, reduction, rows.size(0));
  if (swap) return {out, empty, p.row_lse()};  // the swapped problem's rows are the columns
  return {out, p.row_lse(), both ? p.col_lse() : empty};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_backward(
    const at::Tensor& grad_loss, const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale,
    const at::Tensor& bias, const std::optional<at::Tensor>& labels, const at::Tensor& row_stat,
    const at::Tensor& col_stat, int64_t loss, int64_t direction, int64_t reduction) {
  check_inputs(x_in, y_in, labels, loss, direction, reduction);
  const bool swap = loss == kInfoNce && direction == kText;
  const at::Tensor x = (swap ? y_in : x_in).contiguous();
  const at::Tensor y = (swap ? x_in : y_in).contiguous();
  const int64_t N = x.size(0), M = y.size(0);
  const auto acc = acc_dtype(x);
  const bool nce = loss == kInfoNce, both = nce && direction == kBoth;
  // Per-row weights: a_i (and e_j for "both"; each direction counts half), or SigLIP's w_i.
  const at::Tensor row_w = row_weights(grad_loss, N, reduction, both ? 0.5 : 1.0, acc);
  const at::Tensor col_w = both ? row_w : at::Tensor();
  const at::Tensor rlse =
      nce ? stat(swap ? col_stat : row_stat, N, acc, swap ? "col_stat" : "row_stat") : at::Tensor();
  const at::Tensor clse = both ? stat(col_stat, M, acc, "col_stat") : at::Tensor();
  const at::Tensor tgt = targets(labels, N, M, x, nce ? 0 : -1);
  const TileGrads t = run_grads(x, y, scale.item<double>(), nce ? 0.0 : bias.item<double>(), tgt, row_w,
                                col_w, rlse, clse, !nce);
  at::Tensor dx = t.dx.to(x.scalar_type()), dy = t.dy.to(x.scalar_type());
  if (swap) std::swap(dx, dy);
  return {dx, dy, at::scalar_tensor(t.gu_row + t.gu_col, scale.options()),
          at::scalar_tensor(nce ? 0.0 : t.g, bias.options())};
}

// Block targets: labels (n,) in [-1, m), or none at all (-1 everywhere).
at::Tensor block_targets(const std::optional<at::Tensor>& labels, const at::Tensor& x, int64_t m) {
  check_labels(labels, x.size(0));
  if (!labels.has_value()) return at::full({x.size(0)}, -1, x.options().dtype(at::kLong));
  return targets(labels, x.size(0), m, x, -1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_block_forward(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& bias,
    const std::optional<at::Tensor>& labels, int64_t loss) {
  check_features(x_in, y_in);
  TORCH_CHECK(loss == kInfoNce || loss == kSigLip, "contrastive: loss must be 0 or 1, got ", loss);
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const at::Tensor tgt = block_targets(labels, x, y.size(0));
  const double s = scale.item<double>();
  const at::Tensor empty = at::empty({0}, x.options().dtype(acc_dtype(x)));
  if (loss == kSigLip) {
    at::Tensor rows;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "siglip_block_forward",
                                    [&] { rows = siglip_rows<scalar_t>(x, y, tgt, s, bias.item<double>()); });
    return {rows, empty, empty.clone()};
  }
  LseParts p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "info_nce_block_forward",
                                  [&] { p = info_nce_lse<scalar_t>(x, y, tgt, s, true); });
  return {p.row_lse(), p.col_lse(), p.target};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_block_backward(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& bias,
    const std::optional<at::Tensor>& labels, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& row_weight, const at::Tensor& col_weight, int64_t loss) {
  check_features(x_in, y_in);
  TORCH_CHECK(loss == kInfoNce || loss == kSigLip, "contrastive: loss must be 0 or 1, got ", loss);
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const int64_t n = x.size(0), m = y.size(0);
  const auto acc = acc_dtype(x);
  const bool nce = loss == kInfoNce, cols = col_weight.numel() > 0;
  TORCH_CHECK(nce || !cols, "contrastive: SigLIP blocks take row weights only (col_weight must be empty)");
  const at::Tensor tgt = block_targets(labels, x, m);
  const at::Tensor row_w = stat(row_weight, n, acc, "row_weight");
  const at::Tensor col_w = cols ? stat(col_weight, m, acc, "col_weight") : at::Tensor();
  const at::Tensor rlse = nce ? stat(row_lse, n, acc, "row_lse") : at::Tensor();
  const at::Tensor clse = cols ? stat(col_lse, m, acc, "col_lse") : at::Tensor();
  const TileGrads t = run_grads(x, y, scale.item<double>(), nce ? 0.0 : bias.item<double>(), tgt, row_w,
                                col_w, rlse, clse, !nce);
  const auto opts = x.options().dtype(acc);
  at::Tensor dscale = at::tensor({t.gu_row, t.gu_col}, opts.dtype(at::kDouble)).to(acc);
  return {t.dx, t.dy, dscale, at::scalar_tensor(nce ? 0.0 : t.g, opts)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("contrastive_forward", &contrastive_forward);
  m.impl("contrastive_backward", &contrastive_backward);
  m.impl("contrastive_block_forward", &contrastive_block_forward);
  m.impl("contrastive_block_backward", &contrastive_block_backward);
}

}  // namespace contrastive
}  // namespace mmfast
