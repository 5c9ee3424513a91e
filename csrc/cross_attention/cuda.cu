// Cross-attention on CUDA: registers the kernels of kernel_fwd.cuh / kernel_bwd.cuh (launch glue in
// kernel_launch.cuh) as the CUDA implementations of the ops declared in cpu.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cross_attention/kernel_launch.cuh"

namespace mmfast {
namespace cross_attention {
namespace {

// (ATen/cuda/CUDAContext.h would pull in cuSPARSE/cuBLAS headers the build does not need.)
Device current_device(const at::Tensor& x) {
  const int index = x.device().index();
  int sms = 0, smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, index));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, index));
  return Device{c10::cuda::getCurrentCUDAStream(index).stream(), sms, smem};
}

void check_cuda(const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "query must be a CUDA tensor, got ", q.device());
}

// The dropout seed: a one-element integer CPU tensor (see cpu.cpp).
int64_t seed_value(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && !at::isFloatingType(seed.scalar_type()) && seed.device().is_cpu(),
              "cross_attention: seed must be a one-element integer CPU tensor");
  return seed.item<int64_t>();
}

// q: B x Hq x Lq x D, k: B x Hkv x Lk x D, v: B x Hkv x Lk x Dv -> out: B x Hq x Lq x Dv, lse: B x Hq x Lq.
std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const c10::optional<at::Tensor>& kpm,
                                                const c10::optional<at::Tensor>& mask, bool causal,
                                                double scale, double dropout_p, const at::Tensor& seed) {
  check_cuda(q);
  const c10::cuda::CUDAGuard guard(q.device());
  return forward(q, k, v, kpm, mask, causal, scale, dropout_p, seed_value(seed), current_device(q));
}

at::Tensor forward_out_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& kpm, const c10::optional<at::Tensor>& mask,
                            bool causal, double scale, double dropout_p, const at::Tensor& seed,
                            at::Tensor out) {
  check_cuda(q);
  const c10::cuda::CUDAGuard guard(q.device());
  return forward_out(q, k, v, kpm, mask, causal, scale, dropout_p, seed_value(seed), out, current_device(q));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& kpm, const c10::optional<at::Tensor>& mask, bool causal, double scale,
    double dropout_p, const at::Tensor& seed, bool attn_mask_grad) {
  check_cuda(q);
  const c10::cuda::CUDAGuard guard(q.device());
  return backward(grad_out, q, k, v, out, lse, grad_lse, kpm, mask, causal, scale, dropout_p,
                  seed_value(seed), attn_mask_grad, current_device(q));
}

}  // namespace
}  // namespace cross_attention
}  // namespace mmfast

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("cross_attention_forward", &mmfast::cross_attention::forward_cuda);
  m.impl("cross_attention_forward_out", &mmfast::cross_attention::forward_out_cuda);
  m.impl("cross_attention_backward", &mmfast::cross_attention::backward_cuda);
}
