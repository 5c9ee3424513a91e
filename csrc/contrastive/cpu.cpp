// Contrastive losses on the CPU: the ops' schemas (declared here: the CPU file always compiles; the
// CUDA file registers its own implementations of the same ops), argument checks and entry points.
// The math and the algorithm: cpu.h.
#include "contrastive/cpu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>

#include "contrastive/codes.h"

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

namespace mmfast::contrastive {
namespace {

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
  TORCH_CHECK(loss == kInfoNCE || loss == kSigLIP, "contrastive: loss must be 0 or 1, got ", loss);
  TORCH_CHECK(direction >= kBoth && direction <= kText, "contrastive: direction must be 0, 1 or 2");
  TORCH_CHECK(reduction >= kMean && reduction <= kNone, "contrastive: reduction must be 0, 1 or 2");
  TORCH_CHECK((direction == kImage && loss == kInfoNCE) || x.size(0) == y.size(0) || direction == kText,
              "contrastive: this loss and direction need N == M, got ", x.size(0), " and ", y.size(0));
  check_labels(labels, loss == kInfoNCE && direction == kText ? y.size(0) : x.size(0));
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
  return tile_grads(x, y, g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& bias,
    const std::optional<at::Tensor>& labels, int64_t loss, int64_t direction, int64_t reduction) {
  check_inputs(x_in, y_in, labels, loss, direction, reduction);
  const bool swap = loss == kInfoNCE && direction == kText;  // "text" = "image" with x and y swapped
  const at::Tensor x = (swap ? y_in : x_in).contiguous();
  const at::Tensor y = (swap ? x_in : y_in).contiguous();
  const double s = scale.item<double>();
  const auto acc = acc_dtype(x);
  const at::Tensor empty = at::empty({0}, x.options().dtype(acc));
  if (loss == kSigLIP) {
    const at::Tensor tgt = targets(labels, x.size(0), y.size(0), x, -1);
    const at::Tensor rows = siglip_rows(x, y, tgt, s, bias.item<double>());
    return {reduce(rows, reduction, x.size(0)), empty, empty.clone()};
  }
  const bool both = direction == kBoth;
  const at::Tensor tgt = targets(labels, x.size(0), y.size(0), x);
  const at::Tensor inv = both ? inverse_permutation(tgt) : at::Tensor();
  const LseParts p = info_nce_lse(x, y, tgt, s, both);
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
  const bool swap = loss == kInfoNCE && direction == kText;
  const at::Tensor x = (swap ? y_in : x_in).contiguous();
  const at::Tensor y = (swap ? x_in : y_in).contiguous();
  const int64_t N = x.size(0), M = y.size(0);
  const auto acc = acc_dtype(x);
  const bool nce = loss == kInfoNCE, both = nce && direction == kBoth;
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
  TORCH_CHECK(loss == kInfoNCE || loss == kSigLIP, "contrastive: loss must be 0 or 1, got ", loss);
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const at::Tensor tgt = block_targets(labels, x, y.size(0));
  const double s = scale.item<double>();
  const at::Tensor empty = at::empty({0}, x.options().dtype(acc_dtype(x)));
  if (loss == kSigLIP) {
    return {siglip_rows(x, y, tgt, s, bias.item<double>()), empty, empty.clone()};
  }
  const LseParts p = info_nce_lse(x, y, tgt, s, true);
  return {p.row_lse(), p.col_lse(), p.target};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_block_backward(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale, const at::Tensor& bias,
    const std::optional<at::Tensor>& labels, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& row_weight, const at::Tensor& col_weight, int64_t loss) {
  check_features(x_in, y_in);
  TORCH_CHECK(loss == kInfoNCE || loss == kSigLIP, "contrastive: loss must be 0 or 1, got ", loss);
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const int64_t n = x.size(0), m = y.size(0);
  const auto acc = acc_dtype(x);
  const bool nce = loss == kInfoNCE, cols = col_weight.numel() > 0;
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

}  // namespace mmfast::contrastive
