// Generic kernel of the CPU cross-attention: every dtype (fp32, fp64, bf16, fp16), float or bool
// attn_mask, dropout. Score blocks in the accumulation dtype, products on MKL (common/cpu_blas.h:
// SGEMM / DGEMM, or bf16 / fp16 x bf16 / fp16 -> fp32, which on a CPU with AMX runs on the tiles).
//
// Forward: one task per (b, h, block of Mb query rows). The Mb x Nb score block is one GEMM; for
// Lk <= kMaxWholeRow the block is the whole row (no rescaling), longer rows run an online softmax
// over key blocks. Key ranges that masks make empty are skipped: per batch item the span between
// the first and last unpadded key, and the causal limit of the block's last row.
//
// Backward: recomputes P from the saved LSE instead of storing it (FlashAttention-2):
//   p = exp(scale q k^T + bias - lse)  (0 where masked),  D_i = <do_i, o_i> - dlse_i
//   dv += (p z)^T do,  dp = z (do v^T),  ds = p (dp - D),  dq += scale ds k,  dk += scale ds^T q
// (dlse: the LSE's own gradient, d lse_i / d s_ij = p_ij.) When a row's allowed keys fit in one
// block, the generic kernel forms D_i = sum_j p_ij dp_ij - dlse_i from the block itself instead of
// from the saved output: the same value in exact arithmetic, but free of the output's rounding to
// bf16 / fp16, so ds sums to exactly -dlse_i over the row (e.g. ds = 0 for a single key).
// One task per (b, g): dk, dv of that key/value head accumulate in fp32 over the group's query
// heads and all query blocks, and each dq row belongs to exactly one task, so no atomics.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/cpu_blas.h"
#include "cross_attention/cpu.h"

namespace mmfast::cross_attention {
namespace {

using namespace mmfast::cpu;  // gemm, acc_type, fast_exp, row_max, exp_sub_sum, to_bf16, dropout_hash

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

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Per-thread scratch of the backward: score / dp blocks and fp32 accumulators.
template <typename T>
struct BackwardScratch {
  using A = acc_type<T>;
  BackwardScratch(int64_t Mb, int64_t Nb, int64_t D, int64_t Dv, int64_t Lk, bool dropout)
      : s(Mb * Nb), dp(Mb * Nb), pz(dropout ? Mb * Nb : 0), dq(Mb * D), di(Mb), dk(Lk * D), dv(Lk * Dv) {}
  std::vector<A> s, dp, pz, dq, di, dk, dv;
  bool delta_from_block = false;  // D_i from this block's p and dp (the row's only block)
  std::vector<T> rounded;         // p or ds rounded to T for the GEMMs (bf16 / fp16 inputs)
};

// Shapes, views and masks shared by every task of one backward call.
template <typename T>
struct BackwardArgs : BackwardInputs<T, acc_type<T>> {
  int64_t Nb;          // keys per block
  acc_type<T>* dmask;  // B x Hq x Lq x Lk, contiguous, or null
};

// Steps 2-6 for query rows [i0, i0 + rows) of head h against keys [j0, j0 + cols) of kv head g.
template <typename T>
void backward_block(const BackwardArgs<T>& a, BackwardScratch<T>& w, int64_t b, int64_t h, int64_t g,
                    int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
  using A = acc_type<T>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t Nb = a.Nb;
  const Masking& mk = a.mk;
  // 2. p = exp(scale q k^T + bias - lse), masked entries and empty rows give 0.
  scores<T, A>(rows, cols, a.D, a.scale, a.Q.row(b, h, i0), a.Q.sl, a.K.row(b, g, j0), a.K.sl, w.s.data(),
               Nb);
  apply_masks(mk, b, h, i0, rows, j0, cols, w.s.data(), Nb);
  const A* lse_row = a.lse + (b * a.Hq + h) * a.Lq + i0;
  for (int64_t r = 0; r < rows; ++r) {
    A* srow = w.s.data() + r * Nb;
    if (lse_row[r] == kNegInf) {
      std::fill(srow, srow + cols, A(0));
    } else {
      exp_sub_sum(srow, cols, lse_row[r]);
    }
  }
  // 3. dp = do v^T.
  gemm<T>(false, true, rows, cols, a.Dv, A(1), a.dO.row(b, h, i0), a.dO.sl, a.V.row(b, g, j0), a.V.sl, A(0),
          w.dp.data(), Nb);
  // 4. dv += (p z)^T do; with dropout, dp *= z (z = keep / (1 - p_drop)).
  const A* pz = w.s.data();
  if (mk.dropout_p > 0) {
    std::copy(w.s.begin(), w.s.begin() + rows * Nb, w.pz.begin());
    apply_dropout(mk, b, h, i0, rows, j0, cols, w.pz.data(), Nb);
    apply_dropout(mk, b, h, i0, rows, j0, cols, w.dp.data(), Nb);
    pz = w.pz.data();
  }
  gemm<T>(true, false, cols, a.Dv, rows, A(1), as_input<T, A>(pz, rows * Nb, w.rounded), Nb,
          a.dO.row(b, h, i0), a.dO.sl, A(1), w.dv.data() + j0 * a.Dv, a.Dv);
  // 5. ds = p (dp - D_i), kept in s; the float mask's gradient is ds itself. D_i from this block
  // when it holds all of the row's keys: sum_j p_ij z_ij dp_ij (dp already carries z) - dlse_i.
  if (w.delta_from_block) {
    const A* dlse_row = a.dlse ? a.dlse + (b * a.Hq + h) * a.Lq + i0 : nullptr;
    for (int64_t r = 0; r < rows; ++r) {
      const A* prow = w.s.data() + r * Nb;
      const A* dprow = w.dp.data() + r * Nb;
      A acc = 0;
      for (int64_t c = 0; c < cols; ++c) acc += prow[c] * dprow[c];
      w.di[r] = acc - (dlse_row ? dlse_row[r] : A(0));
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    A* srow = w.s.data() + r * Nb;
    const A* dprow = w.dp.data() + r * Nb;
    const A d_i = w.di[r];
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) srow[c] = srow[c] * (dprow[c] - d_i);
    if (a.dmask) std::copy(srow, srow + cols, a.dmask + ((b * a.Hq + h) * a.Lq + i0 + r) * a.Lk + j0);
  }
  // 6. dq += scale ds k,  dk += scale ds^T q.
  const T* ds = as_input<T, A>(w.s.data(), rows * Nb, w.rounded);
  gemm<T>(false, false, rows, a.D, cols, a.scale, ds, Nb, a.K.row(b, g, j0), a.K.sl, A(1), w.dq.data(), a.D);
  gemm<T>(true, false, cols, a.D, rows, a.scale, ds, Nb, a.Q.row(b, h, i0), a.Q.sl, A(1),
          w.dk.data() + j0 * a.D, a.D);
}

template <typename T>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dlse, const Masking& mk,
                     double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dmask) {
  using A = acc_type<T>;
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3), group = Hq / Hkv;
  const int64_t Nb = Lk <= kMaxWholeRow ? std::max<int64_t>(Lk, 1) : kKeyBlock;
  const int64_t Mb = std::min<int64_t>(std::max<int64_t>(Lq, 1), 64);
  const BackwardArgs<T> a{backward_inputs<T, A>(dout, q, k, v, out, lse, dlse, mk, scale, Mb), Nb,
                          dmask.defined() ? dmask.data_ptr<A>() : nullptr};
  const View4<T> dQ = view4<T>(dq), dK = view4<T>(dk), dV = view4<T>(dv);  // contiguous outputs

  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    BackwardScratch<T> w(Mb, Nb, D, Dv, Lk, mk.dropout_p > 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, g = t % Hkv;
      std::fill(w.dk.begin(), w.dk.end(), A(0));
      std::fill(w.dv.begin(), w.dv.end(), A(0));
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < Lq; i0 += Mb) {
          const int64_t rows = std::min(Mb, Lq - i0);
          std::fill(w.dq.begin(), w.dq.end(), A(0));
          // 1. D_i = <do_i, o_i> - dlse_i, unless the row's keys fit in one block (see the top).
          auto [lo, hi] = mk.key_range(b, i0, i0 + rows);
          w.delta_from_block = hi - lo <= Nb;
          for (int64_t r = 0; r < rows && !w.delta_from_block; ++r) {
            const T* o = a.O.row(b, h, i0 + r);
            const T* d_o = a.dO.row(b, h, i0 + r);
            A acc = 0;
            for (int64_t d = 0; d < Dv; ++d) acc += static_cast<A>(d_o[d]) * static_cast<A>(o[d]);
            w.di[r] = acc - (a.dlse ? a.dlse[(b * Hq + h) * Lq + i0 + r] : A(0));
          }
          for (int64_t j0 = lo; j0 < hi; j0 += Nb)
            backward_block(a, w, b, h, g, i0, rows, j0, std::min(Nb, hi - j0));
          for (int64_t r = 0; r < rows; ++r) {
            T* dqrow = dQ.row(b, h, i0 + r);
            for (int64_t d = 0; d < D; ++d) dqrow[d] = static_cast<T>(w.dq[r * D + d]);
          }
        }
      }
      for (int64_t j = 0; j < Lk; ++j) {  // this task's kv head: every key row, zeros included
        T* dkrow = dK.row(b, g, j);
        T* dvrow = dV.row(b, g, j);
        for (int64_t d = 0; d < D; ++d) dkrow[d] = static_cast<T>(w.dk[j * D + d]);
        for (int64_t d = 0; d < Dv; ++d) dvrow[d] = static_cast<T>(w.dv[j * Dv + d]);
      }
    }
  });
}

}  // namespace

void forward_generic(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Masking& mk,
                     double scale, at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "cross_attention_forward",
                                  [&] { forward_kernel<scalar_t>(q, k, v, mk, scale, out, lse); });
}

void backward_generic(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dlse, const Masking& mk,
                      double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dmask) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "cross_attention_backward", [&] {
    backward_kernel<scalar_t>(dout, q, k, v, out, lse, dlse, mk, scale, dq, dk, dv, dmask);
  });
}

}  // namespace mmfast::cross_attention
