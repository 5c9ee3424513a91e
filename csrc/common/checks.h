// Input checks at the C++ boundary. Each names the argument so the error is actionable.
#pragma once
#include <torch/extension.h>

#define MMFAST_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define MMFAST_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define MMFAST_CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dims, got ", (x).dim())
#define MMFAST_CHECK_SHAPE(x, ...)                                                                     \
  TORCH_CHECK((x).sizes() == torch::IntArrayRef({__VA_ARGS__}), #x " must have shape (", #__VA_ARGS__, \
              "), got ", (x).sizes())
#define MMFAST_CHECK_LAST_CONTIGUOUS(x) \
  TORCH_CHECK((x).stride(-1) == 1 || (x).size(-1) == 1, #x " must have a contiguous last dimension")

// Floating dtypes every kernel takes: fp32, bf16, fp16 (and fp64 on the CPU for gradcheck).
#define MMFAST_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, TYPE, NAME, __VA_ARGS__)
