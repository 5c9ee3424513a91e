// Contrastive losses (InfoNCE / CLIP, SigLIP) on CUDA: registers the CUDA implementations of
// mmfast::contrastive_forward / contrastive_backward (schemas in cpu.cpp). The kernels live in
// kernel.cuh (torch-free device code, also run on the CPU under emulation by the tests); glue.h does
// the checks, allocation and launches. Built by setup.py / CMake when a CUDA toolkit is present.
// ATen/cuda/CUDAContext.h is avoided on purpose: it pulls in cuSPARSE/cuBLAS headers that minimal
// toolkits (CI's) do not ship; the c10 stream and guard headers are enough here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "contrastive/glue.h"

namespace {

using mmfast::contrastive::backward_impl;
using mmfast::contrastive::forward_impl;

int stripes_for(const at::Tensor& x) {  // two stripes of row tiles per SM
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  return 2 * sms;
}

// x: N x D, y: M x D (fp32 / bf16 / fp16, CUDA); scale, bias: 0-dim fp32; labels: (N,) or (M,) int64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_forward_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias,
    const c10::optional<at::Tensor>& labels, int64_t loss, int64_t direction, int64_t reduction) {
  TORCH_CHECK(x.is_cuda() && y.is_cuda(), "contrastive_forward (cuda): x and y must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(x.device());
  // Two stripes of row tiles per SM: enough blocks to fill the GPU, (2 SMs) x M x 8 bytes of partials.
  auto out = forward_impl(x, y, scale, bias, labels, loss, direction, reduction,
                          c10::cuda::getCurrentCUDAStream(), stripes_for(x));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// grad_loss: 0-dim (mean, sum) or (R,) (none); row_stat (N,), col_stat (M,) from the forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
    const at::Tensor& bias, const c10::optional<at::Tensor>& labels, const at::Tensor& row_stat,
    const at::Tensor& col_stat, int64_t loss, int64_t direction, int64_t reduction) {
  TORCH_CHECK(x.is_cuda() && y.is_cuda(), "contrastive_backward (cuda): x and y must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = backward_impl(grad_loss, x, y, scale, bias, labels, row_stat, col_stat, loss, direction,
                           reduction, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Block primitives (contract in cpu.cpp): x n x D, y m x D; labels (n,) in [-1, m) or absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_block_forward_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias,
    const c10::optional<at::Tensor>& labels, int64_t loss) {
  TORCH_CHECK(x.is_cuda() && y.is_cuda(), "contrastive_block_forward (cuda): x and y must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = mmfast::contrastive::block_forward_impl(x, y, scale, bias, labels, loss,
                                                     c10::cuda::getCurrentCUDAStream(), stripes_for(x));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_block_backward_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias,
    const c10::optional<at::Tensor>& labels, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& row_weight, const at::Tensor& col_weight, int64_t loss) {
  TORCH_CHECK(x.is_cuda() && y.is_cuda(), "contrastive_block_backward (cuda): x and y must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = mmfast::contrastive::block_backward_impl(x, y, scale, bias, labels, row_lse, col_lse, row_weight,
                                                      col_weight, loss, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfast, CUDA, m) {
  m.impl("contrastive_forward", &contrastive_forward_cuda);
  m.impl("contrastive_backward", &contrastive_backward_cuda);
  m.impl("contrastive_block_forward", &contrastive_block_forward_cuda);
  m.impl("contrastive_block_backward", &contrastive_block_backward_cuda);
}
