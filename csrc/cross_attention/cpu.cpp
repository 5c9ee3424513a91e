// Cross-attention on the CPU. Schemas are declared here (the CPU file always compiles); the CUDA
// file registers its own implementations of the same ops.
//
// Math (FlashAttention-2, https://arxiv.org/abs/2307.08691), for batch b, query head h, key/value
// head g = h / (Hq / Hkv), query row i, key column j:
//   s_ij = scale * <q_i, k_j> + bias_ij                  bias: float attn_mask (0 without)
//   allowed_ij = !kpm[b, j] && mask_ij (bool) && (j <= i + Lk - Lq if causal)
//   lse_i = log sum_{allowed j} exp(s_ij)                 (-inf when no key is allowed)
//   p_ij = exp(s_ij - lse_i),  z_ij = keep_ij / (1 - dropout_p)   (keep: counter hash)
//   o_i = sum_j p_ij z_ij v_j                             (0 when no key is allowed)
// Backward, with D_i = <do_i, o_i> = sum_j p_ij z_ij <do_i, v_j>:
//   dv_j = sum_i p_ij z_ij do_i,   dp_ij = z_ij <do_i, v_j>,   ds_ij = p_ij (dp_ij - D_i)
//   dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dbias_ij = ds_ij
//
// Kernels (declared in cpu.h): the generic one (cpu_generic.cpp) takes every input; fp32 and bf16
// without attn_mask or dropout take the fast paths (cpu_fast.cpp, cpu_fast_bf16.cpp) where the
// tile-product path chosen for the dtype (common/cpu_isa.h, mmfast.cpu_options) is mmfast's own.
// Forward tasks are (b, h, block of query rows); backward tasks are (b, g), so a task owns dk and dv
// of its key/value head (accumulated in fp32 over the group's query heads and every query block)
// and dq of its query heads: no atomics.
#include "cross_attention/cpu.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "common/cpu_alloc.h"
#include "common/cpu_blas.h"

// q: B x Hq x Lq x D, k: B x Hkv x Lk x D, v: B x Hkv x Lk x Dv (any strides, last dim contiguous
// or size 1); key_padding_mask: B x Lk bool (True = ignore); attn_mask: bool (True = take part) or
// float, broadcastable to B x Hq x Lq x Lk (expanded views allowed); lse: B x Hq x Lq float32
// (the CPU kernels return float64 for float64 inputs: gradcheck needs P = exp(S - lse) exact).
// Dropout keeps element (b, h, i, j) iff mmfast's counter hash of (seed, row=(b*Hq+h)*Lq+i, col=j)
// is >= dropout_p * 2^32 (see mmfast/reference/dropout.py); every backend uses the same hash. The
// seed is a one-element int64 CPU tensor (drawn as a tensor, so torch.compile traces the draw).
// The *_out variant writes the result into `out` (any strides) instead of allocating it. The
// backward takes the LSE's gradient too (grad_lse, B x Hq x Lq, or None): d lse_i / d s_ij = p_ij,
// so it enters as D_i - grad_lse_i.
// Non-finite values (docs/numerics.md): an unmasked NaN or +inf score makes its row's out and lse
// NaN; masked scores are replaced, never added to. Empty dims give empty or neutral results: Lk = 0
// rows are fully masked (0, -inf), D = 0 scores are 0 (an empty dot product), Dv = 0 outputs are
// empty.
TORCH_LIBRARY_FRAGMENT(mmfast, m) {
  m.def(
      "cross_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
      "Tensor? attn_mask, bool is_causal, float scale, float dropout_p, Tensor seed) -> (Tensor out, Tensor "
      "lse)");
  m.def(
      "cross_attention_forward_out(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
      "Tensor? attn_mask, bool is_causal, float scale, float dropout_p, Tensor seed, Tensor(a!) out) -> "
      "Tensor "
      "lse");
  m.def(
      "cross_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? grad_lse, Tensor? key_padding_mask, Tensor? attn_mask, bool is_causal, float scale, "
      "float dropout_p, Tensor seed, bool attn_mask_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor "
      "dattn_mask)");
}

namespace mmfast::cross_attention {
namespace {

// Rows must be contiguous and their stride a valid GEMM leading dimension (>= D); otherwise copy.
at::Tensor rows_ready(const at::Tensor& x) {
  const int64_t L = x.size(2), D = x.size(3);
  const bool ok = (x.stride(3) == 1 || D == 1) && (L == 1 || x.stride(2) >= D);
  return ok ? x : x.contiguous();
}

Masking make_masking(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& kpm_in,
                     const at::Tensor& mask, bool causal, double dropout_p, int64_t seed) {
  Masking mk;
  const int64_t B = q.size(0);
  mk.Hq = q.size(1), mk.Lq = q.size(2), mk.Lk = k.size(2);
  mk.causal = causal;
  mk.dropout_p = dropout_p;
  mk.threshold = cpu::dropout_threshold(dropout_p);
  mk.seed = static_cast<uint64_t>(seed);
  mk.kv_lo.assign(B, 0);
  mk.kv_hi.assign(B, mk.Lk);
  if (kpm_in.has_value()) {
    const at::Tensor& kpm = *kpm_in;
    mk.kpm = kpm.data_ptr<bool>();
    mk.kpm_sb = kpm.stride(0), mk.kpm_sj = kpm.stride(1);
    for (int64_t b = 0; b < B; ++b) {
      int64_t lo = 0, hi = mk.Lk;
      while (lo < hi && mk.kpm[b * mk.kpm_sb + lo * mk.kpm_sj]) ++lo;
      while (hi > lo && mk.kpm[b * mk.kpm_sb + (hi - 1) * mk.kpm_sj]) --hi;
      mk.kv_lo[b] = lo, mk.kv_hi[b] = hi;
    }
  }
  if (mask.defined()) {
    mk.kind = mask.scalar_type() == at::kBool ? 1 : 2;
    mk.mask = mask.data_ptr();
    mk.msb = mask.stride(0), mk.msh = mask.stride(1), mk.msi = mask.stride(2), mk.msj = mask.stride(3);
  }
  return mk;
}

// Checks shared by the three ops; returns the masks in the form the kernels read.
struct Prepared {
  at::Tensor q, k, v, mask;
  std::optional<at::Tensor> kpm;
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& key_padding_mask,
                 const std::optional<at::Tensor>& attn_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "cross_attention: query, key, value must be 4-D (B, H, L, D)");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "cross_attention: batch sizes of query, key, value differ");
  TORCH_CHECK(k.size(3) == D, "cross_attention: key head dim ", k.size(3), " != query head dim ", D);
  TORCH_CHECK(v.size(1) == Hkv && v.size(2) == Lk, "cross_attention: value must have key's heads and length");
  TORCH_CHECK((Hkv > 0 && Hq % Hkv == 0) || (Hq == 0 && Hkv == 0), "cross_attention: query heads (", Hq,
              ") must be a multiple of key heads (", Hkv, ")");
  TORCH_CHECK(D <= kMaxHeadDim && v.size(3) <= kMaxHeadDim, "cross_attention (cpu): head dim D=", D,
              ", Dv=", v.size(3), " exceeds the kernel's limit of ", kMaxHeadDim);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "cross_attention: query, key, value must share a dtype");
  Prepared p{rows_ready(q), rows_ready(k), rows_ready(v), at::Tensor(), std::nullopt};
  if (key_padding_mask.has_value()) {
    const at::Tensor& kpm = *key_padding_mask;
    TORCH_CHECK(kpm.scalar_type() == at::kBool && kpm.dim() == 2 && kpm.size(0) == B && kpm.size(1) == Lk,
                "cross_attention: key_padding_mask must be bool of shape (B, Lk) = (", B, ", ", Lk, ")");
    p.kpm = kpm;
  }
  if (attn_mask.has_value()) {
    at::Tensor m = *attn_mask;
    TORCH_CHECK(m.dim() <= 4, "cross_attention: attn_mask must have at most 4 dims");
    if (m.scalar_type() != at::kBool) {
      TORCH_CHECK(at::isFloatingType(m.scalar_type()), "cross_attention: attn_mask must be bool or floating");
      m = m.to(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    }
    p.mask = m.expand({B, Hq, Lq, Lk});  // a view: broadcast dims get stride 0
  }
  return p;
}

// The seed tensor of the dropout hash (a one-element integer tensor on the CPU).
int64_t seed_value(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && !at::isFloatingType(seed.scalar_type()) && seed.device().is_cpu(),
              "cross_attention: seed must be a one-element integer CPU tensor");
  return seed.item<int64_t>();
}

// x with its last dim widened from 0 to 1 (zeros): the kernels then compute an empty dot product
// (D = 0: every score is 0) or an empty output (Dv = 0) with their ordinary code.
at::Tensor widen_empty(const at::Tensor& x) {
  if (x.size(3) > 0) return x;
  return at::zeros({x.size(0), x.size(1), x.size(2), 1}, x.options());
}

std::tuple<at::Tensor, at::Tensor> forward_into(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, const std::optional<at::Tensor>& kpm,
                                                const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                                double scale, double dropout_p, int64_t seed,
                                                at::Tensor out) {
  Prepared p = prepare(q_in, k_in, v_in, kpm, attn_mask);
  const int64_t B = p.q.size(0), Hq = p.q.size(1), Lq = p.q.size(2), Lk = p.k.size(2);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "cross_attention: dropout_p must be in [0, 1)");
  TORCH_CHECK(
      out.sizes() == at::IntArrayRef({B, Hq, Lq, p.v.size(3)}) && out.scalar_type() == p.q.scalar_type(),
      "cross_attention: out must be (B, Hq, Lq, Dv) with query's dtype");
  const auto acc_dtype = p.q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({B, Hq, Lq}, p.q.options().dtype(acc_dtype));
  if (B * Hq * Lq == 0) return {out, lse};
  if (Lk == 0) {  // every row fully masked
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  if (p.q.size(3) == 0) p.q = widen_empty(p.q), p.k = widen_empty(p.k);
  const bool no_dv = p.v.size(3) == 0;
  if (no_dv) p.v = widen_empty(p.v);
  at::Tensor target = no_dv ? at::empty({B, Hq, Lq, 1}, p.q.options()) : rows_ready(out);
  Masking mk = make_masking(p.q, p.k, p.kpm, p.mask, is_causal, dropout_p, seed);
  if (fast_path_ok(p.q, p.k, p.v, p.mask, dropout_p)) {
    forward_fast(p.q, p.k, p.v, mk, scale, target, lse);
  } else if (fast_bf16_ok(p.q, p.k, p.mask, dropout_p)) {  // bf16, AVX512_BF16, no attn_mask, no dropout
    forward_fast_bf16(p.q, p.k, p.v, mk, scale, target, lse);
  } else {
    forward_generic(p.q, p.k, p.v, mk, scale, target, lse);
  }
  if (!no_dv && !target.is_same(out)) out.copy_(target);  // a copy only when out's rows were strided
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const std::optional<at::Tensor>& kpm,
                                               const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                               double scale, double dropout_p, const at::Tensor& seed) {
  at::Tensor out = cpu::empty_hugepage({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  return forward_into(q, k, v, kpm, attn_mask, is_causal, scale, dropout_p, seed_value(seed), out);
}

at::Tensor forward_out_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& attn_mask,
                           bool is_causal, double scale, double dropout_p, const at::Tensor& seed,
                           at::Tensor out) {
  return std::get<1>(
      forward_into(q, k, v, kpm, attn_mask, is_causal, scale, dropout_p, seed_value(seed), out));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& attn_mask, bool is_causal,
    double scale, double dropout_p, const at::Tensor& seed, bool attn_mask_grad) {
  Prepared p = prepare(q_in, k_in, v_in, kpm, attn_mask);
  const int64_t B = p.q.size(0), Hq = p.q.size(1), Lq = p.q.size(2), Lk = p.k.size(2);
  const int64_t D = p.q.size(3), Dv = p.v.size(3);
  TORCH_CHECK(grad_out.sizes() == out_in.sizes() && out_in.sizes() == at::IntArrayRef({B, Hq, Lq, Dv}),
              "cross_attention_backward: grad_out and out must be (B, Hq, Lq, Dv)");
  const auto acc_dtype = p.q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, Hq, Lq}),
              "cross_attention_backward: lse must be (B, Hq, Lq)");
  TORCH_CHECK(!grad_lse.has_value() || grad_lse->sizes() == lse.sizes(),
              "cross_attention_backward: grad_lse must be (B, Hq, Lq)");
  const bool want_dmask = attn_mask_grad && attn_mask.has_value() && attn_mask->scalar_type() != at::kBool;
  at::Tensor dmask_full =
      want_dmask ? at::zeros({B, Hq, Lq, Lk}, p.q.options().dtype(acc_dtype)) : at::Tensor();
  auto finish = [&](at::Tensor dq, at::Tensor dk, at::Tensor dv) {
    at::Tensor dmask;
    if (want_dmask) {  // sum over the dims the mask was broadcast along, back to its shape and dtype
      dmask = at::sum_to(dmask_full, attn_mask->sizes()).to(attn_mask->scalar_type());
    } else {
      dmask = at::empty({0}, p.q.options());
    }
    return std::make_tuple(dq, dk, dv, dmask);
  };
  if (B * Hq * Lq == 0 || Lk == 0) {  // no query row sees a key: every gradient is 0
    return finish(at::zeros(p.q.sizes(), p.q.options()), at::zeros(p.k.sizes(), p.k.options()),
                  at::zeros(p.v.sizes(), p.v.options()));
  }
  const int64_t seed_v = seed_value(seed);
  at::Tensor lse_c = lse.to(acc_dtype).contiguous();
  at::Tensor dlse = grad_lse.has_value() ? grad_lse->to(acc_dtype).contiguous() : at::Tensor();
  at::Tensor dout = rows_ready(grad_out.to(p.q.scalar_type())), out = rows_ready(out_in);
  // D = 0 / Dv = 0: run on the widened (zero) operands, hand back gradients of the empty ones.
  if (D == 0) p.q = widen_empty(p.q), p.k = widen_empty(p.k);
  if (Dv == 0) p.v = widen_empty(p.v), dout = widen_empty(dout), out = widen_empty(out);
  at::Tensor dq = cpu::empty_hugepage(p.q.sizes(), p.q.options());
  at::Tensor dk = cpu::empty_hugepage(p.k.sizes(), p.k.options());
  at::Tensor dv = cpu::empty_hugepage(p.v.sizes(), p.v.options());
  Masking mk = make_masking(p.q, p.k, p.kpm, p.mask, is_causal, dropout_p, seed_v);
  if (fast_path_ok(p.q, p.k, p.v, p.mask, dropout_p)) {  // fp32, no attn_mask, no dropout
    backward_fast(dout, p.q, p.k, p.v, out, lse_c, dlse, mk, scale, dq, dk, dv);
  } else if (fast_bf16_ok(p.q, p.k, p.mask, dropout_p)) {
    backward_fast_bf16(dout, p.q, p.k, p.v, out, lse_c, dlse, mk, scale, dq, dk, dv);
  } else {
    backward_generic(dout, p.q, p.k, p.v, out, lse_c, dlse, mk, scale, dq, dk, dv, dmask_full);
  }
  if (D == 0) dq = at::zeros(q_in.sizes(), q_in.options()), dk = at::zeros(k_in.sizes(), k_in.options());
  if (Dv == 0) dv = at::zeros(v_in.sizes(), v_in.options());
  return finish(dq, dk, dv);
}

}  // namespace
}  // namespace mmfast::cross_attention

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("cross_attention_forward", &mmfast::cross_attention::forward_cpu);
  m.impl("cross_attention_forward_out", &mmfast::cross_attention::forward_out_cpu);
  m.impl("cross_attention_backward", &mmfast::cross_attention::backward_cpu);
}
