// Contrastive losses (InfoNCE / CLIP, SigLIP) on the CPU, without ever building the N x M logits:
// the math and the algorithm, and the declarations shared by the units that run them.
//   cpu.cpp           schemas, argument checks, entry points
//   cpu_tiles.h/.cpp  the tile products (logits, grad_x, grad_y) and the tile schedule
//   cpu_forward.cpp   forward epilogues: InfoNCE's online log-sum-exp, SigLIP's row sums
//   cpu_backward.cpp  backward epilogues: the gradient tile G, then dx and dy
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
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#define MMFAST_CONTRASTIVE_AVX2 1  // the elementwise loops over a tile are written with AVX2 intrinsics
#else
#define MMFAST_CONTRASTIVE_AVX2 0
#endif

namespace mmfast::contrastive {

// The forward's statistics, in the accumulation dtype: each log-sum-exp as (max, log Σ exp(S -
// shift(max))) over rows (N) and, with cols, columns (M); target logits t_i = S_{i, l_i} (0 where
// l_i = -1 or out of [0, M)).
struct LseParts {
  at::Tensor row_max, row_log, col_max, col_log, target;
  at::Tensor row_lse() const { return row_max + row_log; }
  at::Tensor col_lse() const { return col_max + col_log; }
};

// InfoNCE forward over x (N x D) and y (M x D), both contiguous: the row statistics, the column
// ones with cols, and the target logits of labels (N,) (targets out of [0, M) are skipped).
LseParts info_nce_lse(const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels, double scale,
                      bool cols);

// SigLIP forward: per-row sums (N,) of softplus(-z_ij L_ij); labels (N,) each row's positive column
// (-1: none).
at::Tensor siglip_rows(const at::Tensor& x, const at::Tensor& y, const at::Tensor& labels, double scale,
                       double bias);

// The backward's inputs, as pointers in the accumulation dtype.
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

struct TileGrads {
  at::Tensor dx, dy;  // accumulation dtype
  double gu_row, gu_col, g;
};

// The backward over x (N x D) and y (M x D), both contiguous: (dx, dy) in the accumulation dtype,
// Σ G U (row and column terms) and Σ G over all tiles.
TileGrads tile_grads(const at::Tensor& x, const at::Tensor& y, const GradArgs& g);

}  // namespace mmfast::contrastive
