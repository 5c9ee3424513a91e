// Contrastive losses (InfoNCE / CLIP, SigLIP) on the CPU. Schemas are declared here (the CPU file
// always compiles); the CUDA file registers its own implementations of the same ops.
#include <ATen/ATen.h>
#include <torch/library.h>

// loss: 0 = InfoNCE, 1 = SigLIP; direction: 0 = both, 1 = image, 2 = text;
// reduction: 0 = mean, 1 = sum, 2 = none. scale, bias: 0-dim float32 tensors (bias unused by
// InfoNCE). labels: (N,) int64 or absent. row_stat / col_stat: what the backward needs (InfoNCE:
// row and column log-sum-exp in float32; SigLIP may return empty tensors).
TORCH_LIBRARY_FRAGMENT(mmfast, m) {
  m.def(
      "contrastive_forward(Tensor x, Tensor y, Tensor scale, Tensor bias, Tensor? labels, int loss, "
      "int direction, int reduction) -> (Tensor loss, Tensor row_stat, Tensor col_stat)");
  m.def(
      "contrastive_backward(Tensor grad_loss, Tensor x, Tensor y, Tensor scale, Tensor bias, "
      "Tensor? labels, Tensor row_stat, Tensor col_stat, int loss, int direction, int reduction) "
      "-> (Tensor dx, Tensor dy, Tensor dscale, Tensor dbias)");
}
