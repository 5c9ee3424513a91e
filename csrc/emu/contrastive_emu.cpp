// Test-only torch extension: the CUDA contrastive kernels (contrastive/kernel.cuh, through the same
// tensor glue as cuda.cu) compiled as plain C++ and run on CPU tensors under the SIMT emulation.
// Built by tests/emu_build.py (torch.utils.cpp_extension.load); used by tests/test_contrastive_emulated.py.
//
//   forward(x, y, scale, bias, labels, loss, direction, reduction, max_stripes) -> (loss, row_stat, col_stat)
//   backward(grad_loss, x, y, scale, bias, labels, row_stat, col_stat, loss, direction, reduction)
//       -> (dx, dy, dscale, dbias)
//   block_forward(x, y, scale, bias, labels, loss, max_stripes) -> (row, col, target)
//   block_backward(x, y, scale, bias, labels, row_lse, col_lse, row_weight, col_weight, loss)
//       -> (dx, dy, dscale (2,), dbias)
// Arguments as in the contrastive_forward / contrastive_backward schemas (csrc/contrastive/cpu.cpp).
#include <torch/extension.h>

#include "contrastive/glue.h"

namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor (the emulation runs on the CPU)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(at::Tensor x, at::Tensor y, at::Tensor scale,
                                                       at::Tensor bias, c10::optional<at::Tensor> labels,
                                                       int64_t loss, int64_t direction, int64_t reduction,
                                                       int64_t max_stripes) {
  check_cpu(x, "x");
  check_cpu(y, "y");
  return mmfast::contrastive::forward_impl(x, y, scale, bias, labels, loss, direction, reduction, 0,
                                           static_cast<int>(max_stripes));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    at::Tensor grad_loss, at::Tensor x, at::Tensor y, at::Tensor scale, at::Tensor bias,
    c10::optional<at::Tensor> labels, at::Tensor row_stat, at::Tensor col_stat, int64_t loss,
    int64_t direction, int64_t reduction) {
  check_cpu(x, "x");
  check_cpu(y, "y");
  return mmfast::contrastive::backward_impl(grad_loss, x, y, scale, bias, labels, row_stat, col_stat, loss,
                                            direction, reduction, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_forward(at::Tensor x, at::Tensor y, at::Tensor scale,
                                                             at::Tensor bias,
                                                             c10::optional<at::Tensor> labels, int64_t loss,
                                                             int64_t max_stripes) {
  check_cpu(x, "x");
  check_cpu(y, "y");
  return mmfast::contrastive::block_forward_impl(x, y, scale, bias, labels, loss, 0,
                                                 static_cast<int>(max_stripes));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_backward(
    at::Tensor x, at::Tensor y, at::Tensor scale, at::Tensor bias, c10::optional<at::Tensor> labels,
    at::Tensor row_lse, at::Tensor col_lse, at::Tensor row_weight, at::Tensor col_weight, int64_t loss) {
  check_cpu(x, "x");
  check_cpu(y, "y");
  return mmfast::contrastive::block_backward_impl(x, y, scale, bias, labels, row_lse, col_lse, row_weight,
                                                  col_weight, loss, 0);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmfast contrastive CUDA kernels run under the CPU SIMT emulation (tests only)";
  m.def("forward", &forward, "contrastive_forward under emulation");
  m.def("backward", &backward, "contrastive_backward under emulation");
  m.def("block_forward", &block_forward, "contrastive_block_forward under emulation");
  m.def("block_backward", &block_backward, "contrastive_block_backward under emulation");
}
