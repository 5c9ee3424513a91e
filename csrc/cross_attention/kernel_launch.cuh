// Host side of the cross-attention kernels: argument checks, Params, launches. Shared by the CUDA
// build (cuda.cu, nvcc) and the CPU emulation (csrc/emu/cross_attention_emu.cpp, g++), so the
// emulated tests exercise the same glue as the GPU. Uses ATen; the device code it launches does not.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "cross_attention/kernel_bwd.cuh"
#include "cross_attention/kernel_fwd.cuh"
#if !MMFAST_EMULATION
#include <c10/cuda/CUDAException.h>
#endif

namespace mmfast {
namespace cross_attention {

#if MMFAST_EMULATION
using Stream = int;
#else
using Stream = cudaStream_t;
#endif

// What a launch needs to know about the device.
struct Device {
  Stream stream;
  int num_sms;           // split-KV targets this many blocks
  int max_smem;          // opt-in dynamic shared memory per block (bytes)
  int force_splits = 0;  // > 0: use exactly this many KV splits (tests)
};

constexpr int kMaxHeadDim = 128;

template <class T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}, std::integral_constant<int, HD>{}) for the tensor dtype and the padded
// head dim (64 or 128: the larger of D and Dv, rounded up).
template <class F>
void dispatch(at::ScalarType dtype, int head_dim, F&& f) {
  TORCH_CHECK(head_dim <= kMaxHeadDim, "mmfast cross_attention (cuda): head dims up to ", kMaxHeadDim,
              " are supported, got ", head_dim, " (use backend='triton' or 'reference')");
  auto by_dim = [&](auto tag) {
    if (head_dim <= 64) return f(tag, std::integral_constant<int, 64>{});
    return f(tag, std::integral_constant<int, 128>{});
  };
  switch (dtype) {
    case at::kFloat:
      return by_dim(TypeTag<float>{});
    case at::kBFloat16:
      return by_dim(TypeTag<bf16_t>{});
    case at::kHalf:
      return by_dim(TypeTag<half_t>{});
    default:
      TORCH_CHECK(false, "mmfast cross_attention (cuda): query must be float32, bfloat16 or float16, got ",
                  dtype);
  }
}

// Rows of x can be copied in 16-byte chunks: aligned base and every stride a whole chunk.
inline bool vec_ok(const at::Tensor& x) {
  const int64_t chunk = 16 / x.element_size();
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16) return false;
  for (int d = 0; d < 3; ++d)
    if (x.stride(d) % chunk) return false;
  return true;
}

inline at::Tensor last_dim_contiguous(const at::Tensor& x) {
  return (x.stride(-1) == 1 || x.size(-1) == 1) ? x : x.contiguous();
}

// The inputs as the kernels take them; holds tensors made here (copies, expanded masks) alive.
struct Inputs {
  at::Tensor q, k, v, kpm, mask;
  Params p{};
};

// q: B x Hq x Lq x D, k: B x Hkv x Lk x D, v: B x Hkv x Lk x Dv; kpm: B x Lk bool; mask: bool or
// float, broadcastable to B x Hq x Lq x Lk.
inline Inputs prepare(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                      const c10::optional<at::Tensor>& kpm, const c10::optional<at::Tensor>& mask,
                      bool causal, double scale, double dropout_p, int64_t seed) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "query, key, value must be 4-D (B, H, L, D), got ", q_in.sizes(), ", ", k_in.sizes(), ", ",
              v_in.sizes());
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "query, key, value must have one dtype, got ", q_in.scalar_type(), ", ", k_in.scalar_type(),
              ", ", v_in.scalar_type());
  TORCH_CHECK(k_in.device() == q_in.device() && v_in.device() == q_in.device(),
              "query, key, value must be on one device");
  Inputs in;
  in.q = last_dim_contiguous(q_in);
  in.k = last_dim_contiguous(k_in);
  in.v = last_dim_contiguous(v_in);
  Params& p = in.p;
  p.B = q_in.size(0), p.Hq = q_in.size(1), p.Lq = q_in.size(2), p.D = q_in.size(3);
  p.Hkv = k_in.size(1), p.Lk = k_in.size(2), p.Dv = v_in.size(3);
  TORCH_CHECK(k_in.size(0) == p.B && v_in.size(0) == p.B, "key and value must have query's batch size ", p.B);
  TORCH_CHECK(k_in.size(3) == p.D, "key must have query's head dim ", p.D, ", got ", k_in.size(3));
  TORCH_CHECK(v_in.size(1) == p.Hkv && v_in.size(2) == p.Lk, "value must have key's heads and length");
  TORCH_CHECK((p.Hkv > 0 && p.Hq % p.Hkv == 0) || (p.Hq == 0 && p.Hkv == 0), "query heads (", p.Hq,
              ") must be a multiple of key heads (", p.Hkv, ")");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  auto strides = [](const at::Tensor& x, int64_t& sb, int64_t& sh, int64_t& sl) {
    sb = x.stride(0), sh = x.stride(1), sl = x.stride(2);
  };
  p.q = in.q.data_ptr(), p.k = in.k.data_ptr(), p.v = in.v.data_ptr();
  strides(in.q, p.q_sb, p.q_sh, p.q_sl);
  strides(in.k, p.k_sb, p.k_sh, p.k_sl);
  strides(in.v, p.v_sb, p.v_sh, p.v_sl);
  p.vec_q = vec_ok(in.q), p.vec_k = vec_ok(in.k), p.vec_v = vec_ok(in.v);
  if (kpm.has_value() && kpm->defined()) {
    TORCH_CHECK(kpm->scalar_type() == at::kBool, "key_padding_mask must be bool, got ", kpm->scalar_type());
    TORCH_CHECK(kpm->dim() == 2 && kpm->size(0) == p.B && kpm->size(1) == p.Lk,
                "key_padding_mask must have shape (B, Lk) = (", p.B, ", ", p.Lk, "), got ", kpm->sizes());
    TORCH_CHECK(kpm->device() == q_in.device(), "key_padding_mask must be on query's device");
    in.kpm = *kpm;
    p.kpm = reinterpret_cast<const uint8_t*>(in.kpm.data_ptr<bool>());
    p.kpm_sb = in.kpm.stride(0), p.kpm_sl = in.kpm.stride(1);
  }
  p.mask_kind = kMaskNone;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() <= 4, "attn_mask must have at most 4 dims, got ", mask->sizes());
    TORCH_CHECK(mask->device() == q_in.device(), "attn_mask must be on query's device");
    const bool is_bool = mask->scalar_type() == at::kBool;
    TORCH_CHECK(is_bool || at::isFloatingType(mask->scalar_type()),
                "attn_mask must be bool or floating, got ", mask->scalar_type());
    at::Tensor m = is_bool || mask->scalar_type() == at::kFloat ? *mask : mask->to(at::kFloat);
    in.mask = m.expand({p.B, p.Hq, p.Lq, p.Lk});  // raises on a shape that does not broadcast
    p.mask = in.mask.data_ptr();
    p.mask_kind = is_bool ? kMaskBool : kMaskFloat;
    p.m_sb = in.mask.stride(0), p.m_sh = in.mask.stride(1), p.m_sq = in.mask.stride(2),
    p.m_sk = in.mask.stride(3);
  }
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.dropout = dropout_p > 0.0;
  const double t = std::floor(dropout_p * 4294967296.0);
  p.drop_threshold = static_cast<uint32_t>(std::min(t, 4294967295.0));
  p.drop_scale = p.dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.f;
  p.seed_lo = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffu);
  p.seed_hi = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  p.n_splits = 1;
  p.blocks_per_split = 1 << 30;
  return in;
}

template <class Kernel>
void launch(Kernel kernel, port::dim3_t grid, int smem, const Device& dev, const Params& p) {
  TORCH_CHECK(smem <= dev.max_smem, "mmfast cross_attention (cuda): needs ", smem,
              " bytes of shared memory per block, the device allows ", dev.max_smem);
#if !MMFAST_EMULATION
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
#endif
  MMFAST_LAUNCH(kernel, grid, port::dim3_t(kThreads), smem, dev.stream, p);
#if !MMFAST_EMULATION
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

inline unsigned cdiv64(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// out: B x Hq x Lq x Dv (any strides), lse: B x Hq x Lq fp32 contiguous.
inline void run_forward(Inputs& in, const at::Tensor& out, const at::Tensor& lse, const Device& dev) {
  Params p = in.p;
  p.o = out.data_ptr();
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sl = out.stride(2), p.o_sd = out.stride(3);
  p.lse = lse.data_ptr<float>();
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Lq;
  if (rows == 0) return;
  TORCH_CHECK(p.D > 0 && p.Dv > 0, "cross_attention (cuda): head dims must be >= 1, got D=", p.D,
              ", Dv=", p.Dv, " (the cpu and reference backends take 0)");
  dispatch(in.q.scalar_type(), std::max(p.D, p.Dv), [&](auto tag, auto hd) {
    using T = typename decltype(tag)::type;
    constexpr int HD = decltype(hd)::value;
    using C = FwdCfg<T, HD>;
    // Split-KV when the (batch, head, query tile) blocks cannot fill the device: each split takes a
    // contiguous range of key tiles, and combine_kernel merges them by LSE.
    const int m_blocks = cdiv(p.Lq, C::BM), k_blocks = cdiv(p.Lk, C::BN);
    const int64_t blocks = static_cast<int64_t>(m_blocks) * p.B * p.Hq;
    int splits = dev.force_splits;
    if (splits <= 0) {
      splits =
          blocks >= dev.num_sms ? 1 : static_cast<int>(std::min<int64_t>(cdiv64(dev.num_sms, blocks), 16));
      splits = std::min(splits, std::max(1, k_blocks / 2));  // at least two key tiles per split
    }
    splits = std::max(1, std::min(splits, std::max(1, k_blocks)));
    p.blocks_per_split = std::max(1, cdiv(k_blocks, splits));
    p.n_splits = splits = std::max(1, cdiv(k_blocks, p.blocks_per_split));
    at::Tensor o_part, lse_part;
    if (splits > 1) {
      o_part = at::empty({splits, rows, p.Dv}, lse.options());
      lse_part = at::empty({splits, rows}, lse.options());
      p.o_part = o_part.data_ptr<float>();
      p.lse_part = lse_part.data_ptr<float>();
    }
    launch(fwd_kernel<T, HD>, port::dim3_t(p.B * p.Hq, m_blocks, splits), C::kSmem, dev, p);
    if (splits > 1) launch(combine_kernel<T>, port::dim3_t(cdiv64(rows * p.Dv, kThreads)), 0, dev, p);
  });
}

// dq, dk, dv: contiguous, input dtype; dmask: B x Hq x Lq x Lk fp32 zeros or undefined.
// dlse: the LSE's gradient (B x Hq x Lq fp32, contiguous) or undefined; it enters as delta -= dlse.
inline void run_backward(Inputs& in, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                         const at::Tensor& dlse, const at::Tensor& dq, const at::Tensor& dk,
                         const at::Tensor& dv, const at::Tensor& dmask, const Device& dev) {
  Params p = in.p;
  p.o = out.data_ptr();
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_sl = out.stride(2), p.o_sd = out.stride(3);
  p.lse = lse.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.do_sb = dout.stride(0), p.do_sh = dout.stride(1), p.do_sl = dout.stride(2);
  p.vec_do = vec_ok(dout);
  at::Tensor delta = at::empty({p.B, p.Hq, p.Lq}, lse.options());
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  p.dmask = dmask.defined() ? dmask.data_ptr<float>() : nullptr;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Lq;
  if (p.Lk > 0 && p.Lq == 0) {  // no query: every gradient is zero
    dk.zero_(), dv.zero_();
    return;
  }
  if (rows == 0 || p.Lk == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return;
  }
  dispatch(in.q.scalar_type(), std::max(p.D, p.Dv), [&](auto tag, auto hd) {
    using T = typename decltype(tag)::type;
    constexpr int HD = decltype(hd)::value;
    using C = BwdCfg<T, HD>;
    launch(delta_kernel<T>, port::dim3_t(cdiv64(rows, kWarps)), 0, dev, p);
    if (dlse.defined()) delta.sub_(dlse);  // d lse_i / d s_ij = p_ij: ds = p (dp - delta + dlse)
    launch(dkdv_kernel<T, HD>, port::dim3_t(p.B * p.Hkv, cdiv(p.Lk, C::BN)), C::kSmemKV, dev, p);
    launch(dq_kernel<T, HD>, port::dim3_t(p.B * p.Hq, cdiv(p.Lq, C::BM)), C::kSmemQ, dev, p);
  });
}

// ---- the ops (schemas in csrc/cross_attention/cpu.cpp) ------------------------------------------
inline std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const c10::optional<at::Tensor>& kpm,
                                                  const c10::optional<at::Tensor>& mask, bool causal,
                                                  double scale, double dropout_p, int64_t seed,
                                                  const Device& dev) {
  Inputs in = prepare(q, k, v, kpm, mask, causal, scale, dropout_p, seed);
  at::Tensor out = at::empty({in.p.B, in.p.Hq, in.p.Lq, in.p.Dv}, q.options());
  at::Tensor lse = at::empty({in.p.B, in.p.Hq, in.p.Lq}, q.options().dtype(at::kFloat));
  run_forward(in, out, lse, dev);
  return {out, lse};
}

// out: B x Hq x Lq x Dv, query's dtype, any strides.
inline at::Tensor forward_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const c10::optional<at::Tensor>& kpm, const c10::optional<at::Tensor>& mask,
                              bool causal, double scale, double dropout_p, int64_t seed,
                              const at::Tensor& out, const Device& dev) {
  Inputs in = prepare(q, k, v, kpm, mask, causal, scale, dropout_p, seed);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == in.p.B && out.size(1) == in.p.Hq && out.size(2) == in.p.Lq &&
                  out.size(3) == in.p.Dv,
              "out must have shape (B, Hq, Lq, Dv) = (", in.p.B, ", ", in.p.Hq, ", ", in.p.Lq, ", ", in.p.Dv,
              "), got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.device() == q.device(), "out must be ",
              q.scalar_type(), " on query's device, got ", out.scalar_type(), " on ", out.device());
  at::Tensor lse = at::empty({in.p.B, in.p.Hq, in.p.Lq}, q.options().dtype(at::kFloat));
  run_forward(in, out, lse, dev);
  return lse;
}

// Returns dq, dk, dv (input shapes, contiguous) and the float mask's gradient in the mask's own
// shape and dtype (an empty tensor unless attn_mask_grad).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse,
    const c10::optional<at::Tensor>& kpm, const c10::optional<at::Tensor>& mask, bool causal, double scale,
    double dropout_p, int64_t seed, bool attn_mask_grad, const Device& dev) {
  Inputs in = prepare(q, k, v, kpm, mask, causal, scale, dropout_p, seed);
  const Params& p = in.p;
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.dim() == 4 && out.size(0) == p.B &&
                  out.size(1) == p.Hq && out.size(2) == p.Lq && out.size(3) == p.Dv,
              "grad_out and out must have shape (B, Hq, Lq, Dv)");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "grad_out and out must have query's dtype");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == p.B &&
                  lse.size(1) == p.Hq && lse.size(2) == p.Lq,
              "lse must be float32 of shape (B, Hq, Lq)");
  const bool mask_grad = attn_mask_grad && p.mask_kind == kMaskFloat;
  TORCH_CHECK(!attn_mask_grad || mask_grad, "attn_mask_grad needs a floating attn_mask");
  at::Tensor dout = last_dim_contiguous(grad_out), lse_c = lse.contiguous();
  at::Tensor dq = at::empty({p.B, p.Hq, p.Lq, p.D}, q.options());
  at::Tensor dk = at::empty({p.B, p.Hkv, p.Lk, p.D}, q.options());
  at::Tensor dv = at::empty({p.B, p.Hkv, p.Lk, p.Dv}, q.options());
  at::Tensor dmask =
      mask_grad ? at::zeros({p.B, p.Hq, p.Lq, p.Lk}, q.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor dlse;
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK(grad_lse->sizes() == lse.sizes(), "grad_lse must have lse's shape (B, Hq, Lq)");
    dlse = grad_lse->to(at::kFloat).contiguous();
  }
  run_backward(in, dout, out, lse_c, dlse, dq, dk, dv, dmask, dev);
  at::Tensor dmask_out = at::empty({0}, q.options());
  if (mask_grad) dmask_out = dmask.sum_to_size(mask->sizes()).to(mask->scalar_type());
  return {dq, dk, dv, dmask_out};
}

}  // namespace cross_attention
}  // namespace mmfast
