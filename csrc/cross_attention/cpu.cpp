// Cross-attention on the CPU. Schemas are declared here (the CPU file always compiles); the CUDA
// file registers its own implementations of the same ops.
#include <ATen/ATen.h>
#include <torch/library.h>

// q: B x Hq x Lq x D, k: B x Hkv x Lk x D, v: B x Hkv x Lk x Dv (any strides, last dim contiguous
// or size 1); key_padding_mask: B x Lk bool (True = ignore); attn_mask: bool (True = take part) or
// float, broadcastable to B x Hq x Lq x Lk (expanded views allowed); lse: B x Hq x Lq float32.
// Dropout keeps element (b, h, i, j) iff mmfast's counter hash of (seed, row=(b*Hq+h)*Lq+i, col=j)
// is >= dropout_p * 2^32 (see mmfast/reference/dropout.py); every backend uses the same hash.
// The *_out variant writes the result into `out` (any strides) instead of allocating it.
TORCH_LIBRARY_FRAGMENT(mmfast, m) {
  m.def(
      "cross_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
      "Tensor? attn_mask, bool is_causal, float scale, float dropout_p, int seed) -> (Tensor out, Tensor lse)");
  m.def(
      "cross_attention_forward_out(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
      "Tensor? attn_mask, bool is_causal, float scale, float dropout_p, int seed, Tensor(a!) out) -> Tensor lse");
  m.def(
      "cross_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, Tensor? attn_mask, bool is_causal, float scale, float dropout_p, int seed, "
      "bool attn_mask_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dattn_mask)");
}
