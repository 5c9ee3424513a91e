// Test-only torch extension: the cross-attention kernels (csrc/cross_attention/kernel*.cuh) and their
// launch glue compiled as plain C++ and run on CPU tensors under the SIMT emulation
// (csrc/common/emu.h). Built by tests/emu_build.py::load_module; driven by
// tests/test_cross_attention_emulated.py, which compares with mmfast.reference.
#include <torch/extension.h>

#include "cross_attention/kernel_launch.cuh"

namespace {

using mmfast::cross_attention::Device;

// An sm_80-sized device with one SM: the split-KV heuristic never splits unless forced.
Device emu_device(int64_t splits) { return Device{0, 1, 166912, static_cast<int>(splits)}; }

void check_cpu(const at::Tensor& q) { TORCH_CHECK(q.device().is_cpu(), "the emulation takes CPU tensors"); }

// Same arguments as torch.ops.mmfast.cross_attention_forward(_out), plus `out` (optional, any
// strides) and `splits` (0: the launch heuristic; n > 0: exactly n KV splits).
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const c10::optional<at::Tensor>& kpm,
                                           const c10::optional<at::Tensor>& mask, bool causal, double scale,
                                           double dropout_p, int64_t seed,
                                           const c10::optional<at::Tensor>& out, int64_t splits) {
  check_cpu(q);
  if (out.has_value() && out->defined()) {
    at::Tensor lse = mmfast::cross_attention::forward_out(q, k, v, kpm, mask, causal, scale, dropout_p, seed,
                                                          *out, emu_device(splits));
    return {*out, lse};
  }
  return mmfast::cross_attention::forward(q, k, v, kpm, mask, causal, scale, dropout_p, seed,
                                          emu_device(splits));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& kpm,
    const c10::optional<at::Tensor>& mask, bool causal, double scale, double dropout_p, int64_t seed,
    bool attn_mask_grad, const c10::optional<at::Tensor>& grad_lse) {
  check_cpu(q);
  return mmfast::cross_attention::backward(grad_out, q, k, v, out, lse, grad_lse, kpm, mask, causal, scale,
                                           dropout_p, seed, attn_mask_grad, emu_device(0));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "emulated cross_attention forward -> (out, lse)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("key_padding_mask"), py::arg("attn_mask"), py::arg("is_causal"),
        py::arg("scale"), py::arg("dropout_p"), py::arg("seed"), py::arg("out") = py::none(),
        py::arg("splits") = 0);
  m.def("backward", &backward, "emulated cross_attention backward -> (dq, dk, dv, dattn_mask)",
        py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("key_padding_mask"), py::arg("attn_mask"), py::arg("is_causal"), py::arg("scale"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("attn_mask_grad"), py::arg("grad_lse") = py::none());
}
