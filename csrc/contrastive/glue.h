// Tensor glue of the tiled contrastive kernels (kernel.cuh): argument checks, output and workspace
// allocation, dtype switch, then launch.cuh's launch sequence. Shared by the CUDA registration
// (cuda.cu, compiled by nvcc) and the emulated test module (csrc/emu/contrastive_emu.cpp, plain C++
// on CPU tensors), so the emulated tests exercise this code too.
//
// Op contract (schemas in cpu.cpp): loss 0 = InfoNCE, 1 = SigLIP; direction 0 = both, 1 = image,
// 2 = text; reduction 0 = mean, 1 = sum, 2 = none.
//   forward  -> loss (0-dim fp32, or (R,) for none; R = M for direction text, else N),
//               row_stat (N,) fp32 row log-sum-exp of the logits, col_stat (M,) fp32 column
//               log-sum-exp (InfoNCE, where the direction reads them, else (0,)); SigLIP: (0,).
//   backward -> dx (N, D), dy (M, D) in the features' dtype (contiguous), dscale, dbias (0-dim fp32;
//               dbias is 0 for InfoNCE).
//   block_forward / block_backward: the block primitives (schemas and contract in cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "contrastive/launch.cuh"

namespace mmfast {
namespace contrastive {

// Switches on the feature dtype: fp32, bf16, fp16 (the device types the kernels take).
#define MMFAST_CONTRASTIVE_SWITCH(DTYPE, T, ...)                                                 \
  [&] {                                                                                          \
    switch (DTYPE) {                                                                             \
      case at::kFloat: {                                                                         \
        using T = float;                                                                         \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      case at::kBFloat16: {                                                                      \
        using T = ::mmfast::port::bf16_t;                                                        \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      case at::kHalf: {                                                                          \
        using T = ::mmfast::port::half_t;                                                        \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      default:                                                                                   \
        TORCH_CHECK(false,                                                                       \
                    "mmfast contrastive (cuda): features must be float32, bfloat16 or float16, " \
                    "got ",                                                                      \
                    DTYPE);                                                                      \
    }                                                                                            \
  }()

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * t.element_size()) % 16 == 0;
}

inline void check_features(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "x and y must be 2-D (N, D) and (M, D), got ", x.sizes(), " and ",
              y.sizes());
  TORCH_CHECK(x.size(1) == y.size(1), "x has D=", x.size(1), " but y has D=", y.size(1));
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y must have one dtype, got ", x.scalar_type(),
              " and ", y.scalar_type());
  TORCH_CHECK(x.device() == y.device(), "x and y must be on one device");
  TORCH_CHECK(x.size(0) > 0 && y.size(0) > 0 && x.size(1) > 0, "empty features: x ", x.sizes(), ", y ",
              y.sizes());
  TORCH_CHECK(x.size(0) < (1 << 30) && y.size(0) < (1 << 30) && x.size(1) < (1 << 30), "features too large");
}

// Labels as contiguous int64 on the features' device, their values checked to lie in [lo, classes)
// (one small reduction and a host sync, as the Python layer's own check) and, where targets must be
// injective (lo = -1: blocks and SigLIP, whose inverse map u the kernels build), at most one per column.
inline at::Tensor checked_labels(const at::Tensor& labels, int64_t n, int64_t lo, int64_t classes,
                                 const at::Tensor& like) {
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, "labels must have shape (", n, ",), got ",
              labels.sizes());
  at::Tensor l = labels.to(like.device(), at::kLong).contiguous();
  const auto range = at::aminmax(l);
  TORCH_CHECK(std::get<0>(range).item<int64_t>() >= lo && std::get<1>(range).item<int64_t>() < classes,
              "labels must lie in [", lo, ", ", classes, ")");
  if (lo < 0) {
    const at::Tensor hit = l.masked_select(l.ge(0));
    TORCH_CHECK(hit.numel() == 0 || at::bincount(hit.cpu(), {}, classes).max().item<int64_t>() <= 1,
                "labels must give each column at most one row");
  }
  return l;
}

// Checks the inputs and fills a Problem; returns the (possibly made contiguous) features and labels.
// block: the block primitive (any N, M; labels in [-1, M), absent = no targets; direction both).
inline Problem make_problem(at::Tensor& x, at::Tensor& y, at::Tensor& scale, at::Tensor& bias,
                            c10::optional<at::Tensor>& labels, int64_t loss, int64_t direction,
                            int64_t reduction, bool block = false) {
  check_features(x, y);
  TORCH_CHECK(loss == kInfoNCE || loss == kSigLIP, "loss must be 0 (InfoNCE) or 1 (SigLIP), got ", loss);
  TORCH_CHECK(direction >= 0 && direction <= 2, "direction must be 0, 1 or 2, got ", direction);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction must be 0, 1 or 2, got ", reduction);
  TORCH_CHECK(scale.numel() == 1 && bias.numel() == 1, "scale and bias must hold one value each");
  if (x.stride(1) != 1) x = x.contiguous();
  if (y.stride(1) != 1) y = y.contiguous();
  scale = scale.to(x.device(), at::kFloat).contiguous();
  bias = bias.to(x.device(), at::kFloat).contiguous();
  const int N = static_cast<int>(x.size(0)), M = static_cast<int>(y.size(0)), D = static_cast<int>(x.size(1));
  if (!block && (loss == kSigLIP || direction == kBoth))
    TORCH_CHECK(N == M, "needs N == M, got N=", N, ", M=", M);
  const bool nce = loss == kInfoNCE;
  const int64_t n_labels = nce && direction == kText ? M : N;
  if (block) {
    if (!labels.has_value()) labels = at::full({N}, -1, x.options().dtype(at::kLong));
    labels = checked_labels(*labels, N, -1, M, x);
  } else if (labels.has_value()) {
    const int64_t classes = nce && direction == kText ? N : M;
    labels = checked_labels(*labels, n_labels, nce ? 0 : -1, classes, x);
    if (nce && direction == kBoth)
      TORCH_CHECK(at::bincount(labels->cpu(), {}, N).eq(1).all().item<bool>(),
                  "labels must be a permutation of 0..N-1 for direction both");
  } else {
    TORCH_CHECK(!nce || direction != kImage || M >= N, "direction image with default labels needs M >= N");
    TORCH_CHECK(!nce || direction != kText || N >= M, "direction text with default labels needs N >= M");
  }
  Problem pb{};
  pb.x = x.data_ptr();
  pb.y = y.data_ptr();
  pb.ldx = x.stride(0);
  pb.ldy = y.stride(0);
  pb.N = N;
  pb.M = M;
  pb.D = D;
  pb.scale = scale.data_ptr<float>();
  pb.bias = bias.data_ptr<float>();
  pb.labels = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  pb.loss = static_cast<int>(loss);
  pb.direction = block || !nce ? static_cast<int>(kBoth) : static_cast<int>(direction);
  pb.reduction = static_cast<int>(reduction);
  pb.vec = aligned16(x) && aligned16(y);
  return pb;
}

inline int64_t output_rows(const Problem& pb) {
  return pb.loss == kInfoNCE && pb.direction == kText ? pb.M : pb.N;
}

// Forward buffers; out undefined: the block primitive (statistics and target logits only).
struct FwdTensors {
  at::Tensor t, u, row_stat, col_stat, col_part, img_rows, txt_rows, out, target;
};

inline FwdTensors run_forward(const Problem& pb, const at::Tensor& x, bool block, stream_t stream,
                              int max_stripes) {
  const auto f32 = x.options().dtype(at::kFloat);
  const auto i32 = x.options().dtype(at::kInt);
  const bool nce = pb.loss == kInfoNCE;
  FwdTensors o;
  FwdBuffers b{};
  b.stripes = imax(1, imin(row_tiles(pb.N), max_stripes));
  o.t = at::empty({pb.N}, i32);
  o.u = at::empty({pb.M}, i32);
  o.row_stat = at::empty({nce ? pb.N : 0}, f32);
  o.col_stat = at::empty({nce ? pb.M : 0}, f32);
  o.col_part = at::empty({nce ? int64_t(b.stripes) * pb.M * 2 : 0}, f32);
  o.img_rows = at::empty({pb.N}, f32);
  o.txt_rows = at::empty({nce ? pb.M : 0}, f32);
  if (block) {
    o.target = at::empty({nce ? pb.N : 0}, f32);
  } else {
    o.out = pb.reduction == kNone ? at::empty({output_rows(pb)}, f32) : at::empty({}, f32);
  }
  b.t = o.t.data_ptr<int>();
  b.u = o.u.data_ptr<int>();
  b.row_stat = o.row_stat.data_ptr<float>();
  b.col_stat = o.col_stat.data_ptr<float>();
  b.col_part = o.col_part.data_ptr<float>();
  b.img_rows = o.img_rows.data_ptr<float>();
  b.txt_rows = o.txt_rows.data_ptr<float>();
  b.out = block ? nullptr : o.out.data_ptr<float>();
  b.target = block && nce ? o.target.data_ptr<float>() : nullptr;
  MMFAST_CONTRASTIVE_SWITCH(x.scalar_type(), T, [&] { forward<T>(pb, b, stream); });
  return o;
}

// max_stripes: how many blocks share the row tiles of the forward (each keeps (M, 2) column partials).
// Statistics: the rows' (N,) and columns' (M,) log-sum-exp where the direction reads them, else (0,).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    at::Tensor x, at::Tensor y, at::Tensor scale, at::Tensor bias, c10::optional<at::Tensor> labels,
    int64_t loss, int64_t direction, int64_t reduction, stream_t stream, int max_stripes) {
  const Problem pb = make_problem(x, y, scale, bias, labels, loss, direction, reduction);
  FwdTensors o = run_forward(pb, x, false, stream, max_stripes);
  const at::Tensor empty = at::empty({0}, x.options().dtype(at::kFloat));
  const bool nce = pb.loss == kInfoNCE;
  at::Tensor row = nce && pb.direction != kText ? o.row_stat : empty;
  at::Tensor col = nce && pb.direction != kImage ? o.col_stat : empty.clone();
  return {o.out, row, col};
}

// Block primitive: InfoNCE (row_lse (N,), col_lse (M,), target (N,)); SigLIP (rows (N,), (0,), (0,)).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> block_forward_impl(at::Tensor x, at::Tensor y,
                                                                         at::Tensor scale, at::Tensor bias,
                                                                         c10::optional<at::Tensor> labels,
                                                                         int64_t loss, stream_t stream,
                                                                         int max_stripes) {
  const Problem pb = make_problem(x, y, scale, bias, labels, loss, kBoth, kNone, true);
  FwdTensors o = run_forward(pb, x, true, stream, max_stripes);
  if (pb.loss == kSigLIP) return {o.img_rows, o.row_stat, o.col_stat};  // both (0,)
  return {o.row_stat, o.col_stat, o.target};
}

// a, c: (N,), (M,) fp32 coefficients; grad_loss: the whole loss's upstream gradient, or undefined
// when a and c are given (the block primitive, which then gets fp32 gradients: acc * s * norm).
struct BwdTensors {
  at::Tensor dx, dy, parts, dscale, dbias;
};

inline BwdTensors run_backward(const Problem& pb, const at::Tensor& x, const at::Tensor& y,
                               const at::Tensor& scale, const at::Tensor& grad_loss, at::Tensor a,
                               at::Tensor c, const at::Tensor& row_stat, const at::Tensor& col_stat,
                               bool row_terms, bool col_terms, stream_t stream) {
  const auto f32 = x.options().dtype(at::kFloat);
  const auto i32 = x.options().dtype(at::kInt);
  const bool given = !grad_loss.defined();
  at::Tensor t = at::empty({pb.N}, i32), u = at::empty({pb.M}, i32), norm = at::empty({1}, f32);
  if (!given) {
    a = at::empty({pb.N}, f32);
    c = at::empty({pb.M}, f32);
  }
  at::Tensor acc_x = at::zeros({pb.N, pb.D}, f32), acc_y = at::zeros({pb.M, pb.D}, f32);
  at::Tensor red = at::empty({kRed * row_tiles(pb.N)}, f32);
  BwdTensors o;
  if (!given) {
    o.dx = at::empty({pb.N, pb.D}, x.options().memory_format(at::MemoryFormat::Contiguous));
    o.dy = at::empty({pb.M, pb.D}, y.options().memory_format(at::MemoryFormat::Contiguous));
    o.dscale = at::empty({}, f32);
  }
  o.parts = at::empty({2}, f32);
  o.dbias = at::empty({}, f32);
  BwdBuffers b{};
  b.t = t.data_ptr<int>();
  b.u = u.data_ptr<int>();
  b.a = a.data_ptr<float>();
  b.c = c.data_ptr<float>();
  b.norm = norm.data_ptr<float>();
  b.acc_x = acc_x.data_ptr<float>();
  b.acc_y = acc_y.data_ptr<float>();
  b.red = red.data_ptr<float>();
  b.row_stat = row_terms ? row_stat.data_ptr<float>() : nullptr;
  b.col_stat = col_terms ? col_stat.data_ptr<float>() : nullptr;
  b.grad_loss = given ? nullptr : grad_loss.data_ptr<float>();
  b.dx = given ? nullptr : o.dx.data_ptr();
  b.dy = given ? nullptr : o.dy.data_ptr();
  b.dscale_parts = o.parts.data_ptr<float>();
  b.dscale = given ? nullptr : o.dscale.data_ptr<float>();
  b.dbias = o.dbias.data_ptr<float>();
  b.row_terms = row_terms;
  b.col_terms = col_terms;
  MMFAST_CONTRASTIVE_SWITCH(x.scalar_type(), T, [&] { backward<T>(pb, b, stream); });
  if (given) {  // the kernels' own last step, in fp32: grad = (s * norm) * acc
    const at::Tensor f = scale * norm;
    o.dx = acc_x.mul_(f);
    o.dy = acc_y.mul_(f);
  }
  return o;
}

inline at::Tensor stat(const at::Tensor& t, int64_t n, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",), got ", t.sizes());
  return t.to(like.device(), at::kFloat).contiguous();
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    at::Tensor grad_loss, at::Tensor x, at::Tensor y, at::Tensor scale, at::Tensor bias,
    c10::optional<at::Tensor> labels, at::Tensor row_stat, at::Tensor col_stat, int64_t loss,
    int64_t direction, int64_t reduction, stream_t stream) {
  const Problem pb = make_problem(x, y, scale, bias, labels, loss, direction, reduction);
  const int64_t want = pb.reduction == kNone ? output_rows(pb) : 1;
  TORCH_CHECK(grad_loss.numel() == want, "grad_loss must hold ", want, " values, got ", grad_loss.numel());
  grad_loss = grad_loss.to(x.device(), at::kFloat).contiguous();
  const bool nce = pb.loss == kInfoNCE;
  const bool rows = nce && pb.direction != kText, cols = nce && pb.direction != kImage;
  if (rows) row_stat = stat(row_stat, pb.N, x, "row_stat");
  if (cols) col_stat = stat(col_stat, pb.M, x, "col_stat");
  BwdTensors o = run_backward(pb, x, y, scale, grad_loss, at::Tensor(), at::Tensor(), row_stat, col_stat,
                              rows, cols, stream);
  if (nce) o.dbias.zero_();
  return {o.dx, o.dy, o.dscale, o.dbias};
}

// Block primitive: row_weight (N,), col_weight (M,) or (0,) (no column terms; SigLIP: always (0,)),
// row_lse (N,), col_lse (M,) (InfoNCE) -> fp32 (dx, dy), dscale (2,), dbias ().
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_backward_impl(
    at::Tensor x, at::Tensor y, at::Tensor scale, at::Tensor bias, c10::optional<at::Tensor> labels,
    at::Tensor row_lse, at::Tensor col_lse, at::Tensor row_weight, at::Tensor col_weight, int64_t loss,
    stream_t stream) {
  const Problem pb = make_problem(x, y, scale, bias, labels, loss, kBoth, kNone, true);
  const bool nce = pb.loss == kInfoNCE, cols = col_weight.numel() > 0;
  TORCH_CHECK(nce || !cols, "SigLIP blocks take row weights only (col_weight must be empty)");
  const at::Tensor a = stat(row_weight, pb.N, x, "row_weight");
  const at::Tensor c = cols ? stat(col_weight, pb.M, x, "col_weight") : at::zeros({pb.M}, a.options());
  if (nce) row_lse = stat(row_lse, pb.N, x, "row_lse");
  if (cols) col_lse = stat(col_lse, pb.M, x, "col_lse");
  BwdTensors o = run_backward(pb, x, y, scale, at::Tensor(), a, c, row_lse, col_lse, nce, cols, stream);
  if (nce) o.dbias.zero_();
  return {o.dx, o.dy, o.parts, o.dbias};
}

}  // namespace contrastive
}  // namespace mmfast
