// Tensor glue of the tiled contrastive kernels (kernel.cuh): argument checks, output and workspace
// allocation, dtype switch, then kernel.cuh's launch sequence. Shared by the CUDA registration
// (cuda.cu, compiled by nvcc) and the emulated test module (csrc/emu/contrastive_emu.cpp, plain C++
// on CPU tensors), so the emulated tests exercise this code too.
//
// Op contract (schemas in cpu.cpp): loss 0 = InfoNCE, 1 = SigLIP; direction 0 = both, 1 = image,
// 2 = text; reduction 0 = mean, 1 = sum, 2 = none.
//   forward  -> loss (0-dim fp32, or (R,) for none; R = M for direction text, else N),
//               row_stat (N,) fp32 row log-sum-exp of the logits, col_stat (M,) fp32 column
//               log-sum-exp (InfoNCE; both always, whatever the direction); SigLIP: empty (0,).
//   backward -> dx (N, D), dy (M, D) in the features' dtype (contiguous), dscale, dbias (0-dim fp32;
//               dbias is 0 for InfoNCE).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "contrastive/kernel.cuh"

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

// Checks the inputs and fills a Problem; returns the (possibly made contiguous) features and labels.
inline Problem make_problem(at::Tensor& x, at::Tensor& y, at::Tensor& scale, at::Tensor& bias,
                            c10::optional<at::Tensor>& labels, int64_t loss, int64_t direction,
                            int64_t reduction) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2, "x and y must be 2-D (N, D) and (M, D), got ", x.sizes(), " and ",
              y.sizes());
  TORCH_CHECK(x.size(1) == y.size(1), "x has D=", x.size(1), " but y has D=", y.size(1));
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y must have one dtype, got ", x.scalar_type(),
              " and ", y.scalar_type());
  TORCH_CHECK(x.device() == y.device(), "x and y must be on one device");
  TORCH_CHECK(x.size(0) > 0 && y.size(0) > 0 && x.size(1) > 0, "empty features: x ", x.sizes(), ", y ",
              y.sizes());
  TORCH_CHECK(x.size(0) < (1 << 30) && y.size(0) < (1 << 30) && x.size(1) < (1 << 30), "features too large");
  TORCH_CHECK(loss == kInfoNCE || loss == kSigLIP, "loss must be 0 (InfoNCE) or 1 (SigLIP), got ", loss);
  TORCH_CHECK(direction >= 0 && direction <= 2, "direction must be 0, 1 or 2, got ", direction);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "reduction must be 0, 1 or 2, got ", reduction);
  TORCH_CHECK(scale.numel() == 1 && bias.numel() == 1, "scale and bias must hold one value each");
  if (x.stride(1) != 1) x = x.contiguous();
  if (y.stride(1) != 1) y = y.contiguous();
  scale = scale.to(x.device(), at::kFloat).contiguous();
  bias = bias.to(x.device(), at::kFloat).contiguous();
  const int N = static_cast<int>(x.size(0)), M = static_cast<int>(y.size(0)), D = static_cast<int>(x.size(1));
  if (loss == kSigLIP || direction == kBoth) TORCH_CHECK(N == M, "needs N == M, got N=", N, ", M=", M);
  const int64_t n_labels = direction == kText ? M : N;
  if (loss == kSigLIP) labels.reset();
  if (labels.has_value()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == n_labels, "labels must have shape (", n_labels,
                ",), got ", labels->sizes());
    labels = labels->to(x.device(), at::kLong).contiguous();
  } else {
    TORCH_CHECK(direction != kImage || M >= N, "direction image with default labels needs M >= N");
    TORCH_CHECK(direction != kText || N >= M, "direction text with default labels needs N >= M");
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
  pb.direction = static_cast<int>(direction);
  pb.reduction = static_cast<int>(reduction);
  pb.vec = aligned16(x) && aligned16(y);
  return pb;
}

inline int64_t output_rows(const Problem& pb) {
  return pb.loss == kInfoNCE && pb.direction == kText ? pb.M : pb.N;
}

// max_stripes: how many blocks share the row tiles of the forward (each keeps (M, 2) column partials).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    at::Tensor x, at::Tensor y, at::Tensor scale, at::Tensor bias, c10::optional<at::Tensor> labels,
    int64_t loss, int64_t direction, int64_t reduction, stream_t stream, int max_stripes) {
  const Problem pb = make_problem(x, y, scale, bias, labels, loss, direction, reduction);
  const auto f32 = x.options().dtype(at::kFloat);
  const auto i32 = x.options().dtype(at::kInt);
  const bool nce = pb.loss == kInfoNCE;
  FwdBuffers b{};
  b.stripes = imax(1, imin(row_tiles(pb.N), max_stripes));
  at::Tensor t = at::empty({pb.N}, i32), u = at::empty({pb.M}, i32);
  at::Tensor row_stat = at::empty({nce ? pb.N : 0}, f32), col_stat = at::empty({nce ? pb.M : 0}, f32);
  at::Tensor col_part = at::empty({nce ? int64_t(b.stripes) * pb.M * 2 : 0}, f32);
  at::Tensor img_rows = at::empty({pb.N}, f32), txt_rows = at::empty({nce ? pb.M : 0}, f32);
  at::Tensor out = pb.reduction == kNone ? at::empty({output_rows(pb)}, f32) : at::empty({}, f32);
  b.t = t.data_ptr<int>();
  b.u = u.data_ptr<int>();
  b.row_stat = row_stat.data_ptr<float>();
  b.col_stat = col_stat.data_ptr<float>();
  b.col_part = col_part.data_ptr<float>();
  b.img_rows = img_rows.data_ptr<float>();
  b.txt_rows = txt_rows.data_ptr<float>();
  b.out = out.data_ptr<float>();
  MMFAST_CONTRASTIVE_SWITCH(x.scalar_type(), T, [&] { forward<T>(pb, b, stream); });
  return {out, row_stat, col_stat};
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
  if (nce) {
    TORCH_CHECK(row_stat.numel() == pb.N && col_stat.numel() == pb.M,
                "row_stat and col_stat must be the forward's (N,) and (M,) statistics");
    row_stat = row_stat.to(at::kFloat).contiguous();
    col_stat = col_stat.to(at::kFloat).contiguous();
  }
  const auto f32 = x.options().dtype(at::kFloat);
  const auto i32 = x.options().dtype(at::kInt);
  at::Tensor t = at::empty({pb.N}, i32), u = at::empty({pb.M}, i32);
  at::Tensor a = at::empty({pb.N}, f32), c = at::empty({pb.M}, f32), norm = at::empty({1}, f32);
  at::Tensor acc_x = at::zeros({pb.N, pb.D}, f32), acc_y = at::zeros({pb.M, pb.D}, f32);
  at::Tensor red = at::empty({2 * row_tiles(pb.N)}, f32);
  at::Tensor dx = at::empty({pb.N, pb.D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dy = at::empty({pb.M, pb.D}, y.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dscale = at::empty({}, f32), dbias = at::empty({}, f32);
  BwdBuffers b{};
  b.t = t.data_ptr<int>();
  b.u = u.data_ptr<int>();
  b.a = a.data_ptr<float>();
  b.c = c.data_ptr<float>();
  b.norm = norm.data_ptr<float>();
  b.acc_x = acc_x.data_ptr<float>();
  b.acc_y = acc_y.data_ptr<float>();
  b.red = red.data_ptr<float>();
  b.row_stat = nce ? row_stat.data_ptr<float>() : nullptr;
  b.col_stat = nce ? col_stat.data_ptr<float>() : nullptr;
  b.grad_loss = grad_loss.data_ptr<float>();
  b.dx = dx.data_ptr();
  b.dy = dy.data_ptr();
  b.dscale = dscale.data_ptr<float>();
  b.dbias = dbias.data_ptr<float>();
  MMFAST_CONTRASTIVE_SWITCH(x.scalar_type(), T, [&] { backward<T>(pb, b, stream); });
  if (nce) dbias.zero_();
  return {dx, dy, dscale, dbias};
}

}  // namespace contrastive
}  // namespace mmfast
