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
// Forward: one task per (b, h, block of Mb query rows). The Mb x Nb score block is one GEMM; for
// Lk <= kMaxWholeRow the block is the whole row (no rescaling), longer rows run an online softmax
// over key blocks. Key ranges that masks make empty are skipped: per batch item the span between
// the first and last unpadded key, and the causal limit of the block's last row.
// Backward: one task per (b, g), so the task owns dk and dv of its key/value head (accumulated in
// fp32 over the group's query heads and every query block) and dq of its query heads: no atomics.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/cpu_alloc.h"
#include "common/cpu_blas.h"

namespace mmfast::xattn {
using namespace mmfast::cpu;  // gemm, fast_exp, dropout hash
}  // namespace mmfast::xattn

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

namespace mmfast::xattn {
namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxWholeRow = 1024;  // longest key row scored as one block
constexpr int64_t kKeyBlock = 512;      // key block of the online softmax beyond that

// A B x H x L x D tensor read by pointer: element (b, h, l, d) at ptr[b*sb + h*sh + l*sl + d].
template <typename T>
struct View4 {
  T* ptr;
  int64_t sb, sh, sl;
  T* row(int64_t b, int64_t h, int64_t l) const { return ptr + b * sb + h * sh + l * sl; }
};

// Rows must be contiguous and their stride a valid GEMM leading dimension (>= D); otherwise copy.
at::Tensor rows_ready(const at::Tensor& x) {
  const int64_t L = x.size(2), D = x.size(3);
  const bool ok = (x.stride(3) == 1 || D == 1) && (L == 1 || x.stride(2) >= D);
  return ok ? x : x.contiguous();
}

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

Masking make_masking(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& kpm_in,
                     const at::Tensor& mask, bool causal, double dropout_p, int64_t seed) {
  Masking mk;
  const int64_t B = q.size(0);
  mk.Hq = q.size(1), mk.Lq = q.size(2), mk.Lk = k.size(2);
  mk.causal = causal;
  mk.dropout_p = dropout_p;
  mk.threshold = dropout_threshold(dropout_p);
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

// Step 1 of both passes: s = scale * q k^T for rows [i0, i0 + rows) and keys [j0, j0 + cols). A
// non-finite scale is applied after the product, not as the GEMM's alpha: BLAS need not propagate a
// NaN alpha (MKL's small-matrix kernels do not), and the policy wants every score NaN then.
template <typename T, typename A>
void scores(int64_t rows, int64_t cols, int64_t D, A scale, const T* q, int64_t ldq, const T* k, int64_t ldk,
            A* s, int64_t lds) {
  const bool finite = std::isfinite(scale);
  gemm<T>(false, true, rows, cols, D, finite ? scale : A(1), q, ldq, k, ldk, A(0), s, lds);
  if (finite) return;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) s[r * lds + c] *= scale;
  }
}

// Step 2 of both passes: s[r, c] (row i0 + r, key j0 + c) += bias, or -inf where not allowed.
template <typename A>
void apply_masks(const Masking& mk, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                 A* s, int64_t lds) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    A* srow = s + r * lds;
    const int64_t i = i0 + r;
    if (mk.kpm) {
      const bool* pad = mk.kpm + b * mk.kpm_sb + j0 * mk.kpm_sj;
      if (mk.kpm_sj == 1) {
        for (int64_t c = 0; c < cols; ++c) srow[c] = pad[c] ? kNegInf : srow[c];
      } else {
        for (int64_t c = 0; c < cols; ++c) srow[c] = pad[c * mk.kpm_sj] ? kNegInf : srow[c];
      }
    }
    if (mk.kind != 0) {
      const int64_t off = b * mk.msb + h * mk.msh + i * mk.msi + j0 * mk.msj;
      if (mk.kind == 1) {
        const bool* m = static_cast<const bool*>(mk.mask) + off;
        for (int64_t c = 0; c < cols; ++c) srow[c] = m[c * mk.msj] ? srow[c] : kNegInf;
      } else {
        const A* m = static_cast<const A*>(mk.mask) + off;  // a -inf entry is a mask: replace, never add
        for (int64_t c = 0; c < cols; ++c)
          srow[c] = m[c * mk.msj] == kNegInf ? kNegInf : srow[c] + m[c * mk.msj];
      }
    }
    if (mk.causal) {
      const int64_t first_masked = std::max<int64_t>(i + mk.Lk - mk.Lq + 1 - j0, 0);
      for (int64_t c = first_masked; c < cols; ++c) srow[c] = kNegInf;
    }
  }
}

// Multiply p[r, c] by keep / (1 - p_drop) (0 when dropped); the same mask in forward and backward.
template <typename A>
void apply_dropout(const Masking& mk, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                   int64_t cols, A* p, int64_t ldp) {
  const A inv_keep = A(1) / A(1 - mk.dropout_p);
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t row = static_cast<uint32_t>((b * mk.Hq + h) * mk.Lq + i0 + r);
    A* prow = p + r * ldp;
    for (int64_t c = 0; c < cols; ++c) {
      const bool keep = dropout_hash(mk.seed, row, static_cast<uint32_t>(j0 + c)) >= mk.threshold;
      prow[c] = keep ? prow[c] * inv_keep : A(0);
    }
  }
}

// The left operand of the p v, p^T do, ds k, ds^T q GEMMs lives in the accumulation type A; for
// bf16/fp16 inputs it is rounded to T once so those GEMMs run in T (bf16/fp16 units, fp32
// accumulation). Returns a pointer with the same layout (n elements).
template <typename T, typename A>
const T* as_input(const A* src, int64_t n, std::vector<T>& scratch) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    scratch.resize(n);
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      to_bf16(src, scratch.data(), n);
    } else {
      for (int64_t x = 0; x < n; ++x) scratch[x] = static_cast<T>(src[x]);
    }
    return scratch.data();
  }
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Masking& mk,
                    double scale_d, at::Tensor& out, at::Tensor& lse) {
  using A = acc_type<T>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3), group = Hq / Hkv;
  const View4<T> Q = view4<T>(q), K = view4<T>(k), V = view4<T>(v), O = view4<T>(out);
  A* lse_p = lse.data_ptr<A>();  // contiguous B x Hq x Lq
  const A scale = static_cast<A>(scale_d);
  const int64_t Nb = Lk <= kMaxWholeRow ? std::max<int64_t>(Lk, 1) : kKeyBlock;
  int64_t Mb = std::min<int64_t>(Lq, 64);
  // Enough tasks for every thread (and some balance) before big blocks.
  while (Mb > 8 && B * Hq * ((Lq + Mb - 1) / Mb) < 4 * at::get_num_threads()) Mb /= 2;
  const int64_t nqb = (Lq + Mb - 1) / Mb;

  at::parallel_for(0, B * Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> s(Mb * Nb), acc(Mb * Dv), m(Mb), l(Mb);
    std::vector<T> scratch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (Hq * nqb), h = (t / nqb) % Hq, i0 = (t % nqb) * Mb, g = h / group;
      const int64_t rows = std::min(Mb, Lq - i0);
      auto [lo, hi] = mk.key_range(b, i0, i0 + rows);
      std::fill(acc.begin(), acc.end(), A(0));
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), A(0));
      for (int64_t j0 = lo; j0 < hi; j0 += Nb) {
        const int64_t cols = std::min(Nb, hi - j0);
        // 1. s = scale * q k^T (one GEMM), 2. masks.
        scores<T, A>(rows, cols, D, scale, Q.row(b, h, i0), Q.sl, K.row(b, g, j0), K.sl, s.data(), Nb);
        apply_masks(mk, b, h, i0, rows, j0, cols, s.data(), Nb);
        // 3. Online softmax: new row max, rescale what was accumulated, p = exp(s - m), l += sum p.
        for (int64_t r = 0; r < rows; ++r) {
          A* srow = s.data() + r * Nb;
          const A mx = row_max(srow, cols, m[r]);
          const A m_use = mx == kNegInf ? A(0) : mx;  // all masked so far: p = exp(-inf) = 0
          const A alpha = m[r] == kNegInf ? A(0) : fast_exp(m[r] - mx);
          const A sum = exp_sub_sum(srow, cols, m_use);
          if (alpha != A(1)) {
            for (int64_t d = 0; d < Dv; ++d) acc[r * Dv + d] *= alpha;
          }
          l[r] = l[r] * alpha + sum;
          m[r] = mx;
        }
        // 4. Dropout on p (the normalizer l keeps the undropped p), 5. acc += p v.
        if (mk.dropout_p > 0) apply_dropout(mk, b, h, i0, rows, j0, cols, s.data(), Nb);
        const T* p = as_input<T, A>(s.data(), rows * Nb, scratch);
        gemm<T>(false, false, rows, Dv, cols, A(1), p, Nb, V.row(b, g, j0), V.sl, A(1), acc.data(), Dv);
      }
      // 6. out = acc / l, lse = m + log l; rows without an allowed key: 0 and -inf. A NaN or +inf
      // score made l NaN (exp(NaN) and inf - inf): out and lse NaN.
      for (int64_t r = 0; r < rows; ++r) {
        const bool empty = l[r] == A(0);
        const A inv = empty ? A(0) : A(1) / l[r];
        T* orow = O.row(b, h, i0 + r);
        for (int64_t d = 0; d < Dv; ++d) orow[d] = static_cast<T>(acc[r * Dv + d] * inv);
        lse_p[(b * Hq + h) * Lq + i0 + r] = empty ? kNegInf : m[r] + std::log(l[r]);
      }
    }
  });
}

}  // namespace
}  // namespace mmfast::xattn

#include "cross_attention/cpu_fast.h"
#include "cross_attention/cpu_fast_bf16.h"

namespace mmfast::xattn {
namespace {

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
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.q.scalar_type(), "cross_attention_forward",
                                    [&] { forward_kernel<scalar_t>(p.q, p.k, p.v, mk, scale, target, lse); });
  }
  if (!no_dv && !target.is_same(out)) out.copy_(target);  // a copy only when out's rows were strided
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const std::optional<at::Tensor>& kpm,
                                               const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                               double scale, double dropout_p, const at::Tensor& seed) {
  at::Tensor out = empty_hugepage({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  return forward_into(q, k, v, kpm, attn_mask, is_causal, scale, dropout_p, seed_value(seed), out);
}

at::Tensor forward_out_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& attn_mask,
                           bool is_causal, double scale, double dropout_p, const at::Tensor& seed,
                           at::Tensor out) {
  return std::get<1>(
      forward_into(q, k, v, kpm, attn_mask, is_causal, scale, dropout_p, seed_value(seed), out));
}

}  // namespace
}  // namespace mmfast::xattn

#include "cross_attention/cpu_backward.h"

TORCH_LIBRARY_IMPL(mmfast, CPU, m) {
  m.impl("cross_attention_forward", &mmfast::xattn::forward_cpu);
  m.impl("cross_attention_forward_out", &mmfast::xattn::forward_out_cpu);
  m.impl("cross_attention_backward", &mmfast::xattn::backward_cpu);
}
