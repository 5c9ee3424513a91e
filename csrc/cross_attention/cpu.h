// Declarations shared by the units of the CPU cross-attention: the operand views, the masks in the
// form the kernels read, and the three kernels (math and schedule: cpu.cpp).
//   cpu.cpp           schemas, argument checks, the choice of kernel, the ops' entry points
//   cpu_generic.cpp   generic kernel, every dtype and option, products on MKL (cpu_blas.h)
//   cpu_fast.cpp      fp32 fast path: transposed blocks on own register tiles (cpu_gemm_f32.h)
//   cpu_fast_bf16.cpp bf16 fast path on the vdpbf16ps kernel (cpu_gemm_bf16.h)
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace mmfast::cross_attention {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxWholeRow = 1024;  // longest key row the generic kernel scores as one block
constexpr int64_t kKeyBlock = 512;      // key block of its online softmax beyond that

// A B x H x L x D tensor read by pointer: element (b, h, l, d) at ptr[b*sb + h*sh + l*sl + d].
template <typename T>
struct View4 {
  T* ptr;
  int64_t sb, sh, sl;
  T* row(int64_t b, int64_t h, int64_t l) const { return ptr + b * sb + h * sh + l * sl; }
};

// x's rows are contiguous and their stride a valid GEMM leading dimension (rows_ready ensures it).
template <typename T>
View4<T> view4(const at::Tensor& x) {
  const int64_t sl = x.size(2) == 1 ? x.size(3) : x.stride(2);  // ld of a single row: anything >= D
  return {x.data_ptr<T>(), x.stride(0), x.stride(1), std::max<int64_t>(sl, 1)};
}

// Everything the kernels need to know about the masks and dropout, read by strides.
struct Masking {
  int64_t Hq = 0, Lq = 0, Lk = 0;
  const bool* kpm = nullptr;  // B x Lk
  int64_t kpm_sb = 0, kpm_sj = 0;
  int kind = 0;  // 0 none, 1 bool, 2 float (float32 / float64 = the accumulation type)
  const void* mask = nullptr;
  int64_t msb = 0, msh = 0, msi = 0, msj = 0;  // strides of the mask expanded to B x Hq x Lq x Lk
  bool causal = false;
  double dropout_p = 0.0;
  uint32_t threshold = 0;
  uint64_t seed = 0;
  std::vector<int64_t> kv_lo, kv_hi;  // per batch item: first / one past last unpadded key

  // Keys [lo, hi) that rows [i0, i1) of batch item b may see; hi <= lo when none.
  std::pair<int64_t, int64_t> key_range(int64_t b, int64_t i0, int64_t i1) const {
    int64_t lo = kv_lo[b], hi = kv_hi[b];
    if (causal) hi = std::min(hi, i1 + Lk - Lq);  // row i sees j <= i + Lk - Lq (bottom-right)
    return {lo, hi};
  }
};

// The operands of one backward call that every task reads, whatever the kernel: shapes, input
// views, the saved LSE and its gradient, the scale and the masks. T: element type, A: accumulation
// type (the LSE's). Mb: query rows per block.
template <typename T, typename A>
struct BackwardInputs {
  int64_t Hq, Lq, D, Lk, Dv, Mb;
  View4<T> Q, K, V, O, dO;
  const A* lse;   // B x Hq x Lq, contiguous
  const A* dlse;  // B x Hq x Lq, contiguous, or null (the LSE got no gradient; else D_i -= dlse_i)
  A scale;
  const Masking& mk;
};

template <typename T, typename A>
BackwardInputs<T, A> backward_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const at::Tensor& dlse, const Masking& mk, double scale, int64_t Mb) {
  return {q.size(1),
          q.size(2),
          q.size(3),
          k.size(2),
          v.size(3),
          Mb,
          view4<T>(q),
          view4<T>(k),
          view4<T>(v),
          view4<T>(out),
          view4<T>(dout),
          lse.data_ptr<A>(),
          dlse.defined() ? dlse.data_ptr<A>() : nullptr,
          static_cast<A>(scale),
          mk};
}

// The kernels. Inputs have rows ready (contiguous, valid leading dimension), D, Dv >= 1, Lk >= 1;
// out, dq, dk, dv are written whole; lse (B x Hq x Lq, contiguous) in the accumulation dtype.
void forward_generic(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Masking& mk,
                     double scale, at::Tensor& out, at::Tensor& lse);
// dmask: B x Hq x Lq x Lk in the accumulation dtype (the float mask's gradient), or undefined.
void backward_generic(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dlse, const Masking& mk,
                      double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dmask);

// fp32 fast path: whether it takes these inputs (its tile path is the one chosen for fp32, no
// attn_mask or dropout, head dims multiples of 8), forward and backward.
bool fast_path_ok(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                  double dropout_p);
void forward_fast(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Masking& mk,
                  double scale, at::Tensor& out, at::Tensor& lse);
void backward_fast(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dlse, const Masking& mk,
                   double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

// bf16 fast path (the bf16 tile path is "avx512_bf16"; no attn_mask or dropout).
bool fast_bf16_ok(const at::Tensor& q, const at::Tensor& k, const at::Tensor& mask, double dropout_p);
void forward_fast_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Masking& mk,
                       double scale, at::Tensor& out, at::Tensor& lse);
void backward_fast_bf16(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dlse,
                        const Masking& mk, double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

}  // namespace mmfast::cross_attention
