// Backward pass of the CPU cross-attention (included by cpu.cpp, after the forward and helpers).
// Recomputes P from the saved LSE instead of storing it (FlashAttention-2):
//   p = exp(scale q k^T + bias - lse)  (0 where masked),  D_i = <do_i, o_i> - dlse_i
//   dv += (p z)^T do,  dp = z (do v^T),  ds = p (dp - D),  dq += scale ds k,  dk += scale ds^T q
// (dlse: the LSE's own gradient, d lse_i / d s_ij = p_ij.) When a row's allowed keys fit in one
// block, the generic kernel forms D_i = sum_j p_ij dp_ij - dlse_i from the block itself instead of
// from the saved output: the same value in exact arithmetic, but free of the output's rounding to
// bf16 / fp16, so ds sums to exactly -dlse_i over the row (e.g. ds = 0 for a single key).
// One task per (b, g): dk, dv of that key/value head accumulate in fp32 over the group's query
// heads and all query blocks, and each dq row belongs to exactly one task, so no atomics.
#pragma once

namespace mmfast::xattn {
namespace {

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
struct BackwardArgs {
  using A = acc_type<T>;
  int64_t Hq, Lq, D, Lk, Dv, Mb, Nb;
  View4<T> Q, K, V, O, dO;
  const A* lse;   // B x Hq x Lq, contiguous
  const A* dlse;  // B x Hq x Lq, contiguous, or null (the LSE got no gradient)
  A* dmask;       // B x Hq x Lq x Lk, contiguous, or null
  A scale;
  const Masking& mk;
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
  const BackwardArgs<T> a{Hq,
                          Lq,
                          D,
                          Lk,
                          Dv,
                          Mb,
                          Nb,
                          view4<T>(q),
                          view4<T>(k),
                          view4<T>(v),
                          view4<T>(out),
                          view4<T>(dout),
                          lse.data_ptr<A>(),
                          dlse.defined() ? dlse.data_ptr<A>() : nullptr,
                          dmask.defined() ? dmask.data_ptr<A>() : nullptr,
                          static_cast<A>(scale),
                          mk};
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
  at::Tensor dq = empty_hugepage(p.q.sizes(), p.q.options());
  at::Tensor dk = empty_hugepage(p.k.sizes(), p.k.options());
  at::Tensor dv = empty_hugepage(p.v.sizes(), p.v.options());
  Masking mk = make_masking(p.q, p.k, p.kpm, p.mask, is_causal, dropout_p, seed_v);
  if (fast_path_ok(p.q, p.k, p.v, p.mask, dropout_p)) {  // fp32, no attn_mask, no dropout
    backward_fast(dout, p.q, p.k, p.v, out, lse_c, dlse, mk, scale, dq, dk, dv);
  } else if (fast_bf16_ok(p.q, p.k, p.mask, dropout_p)) {
    backward_fast_bf16(dout, p.q, p.k, p.v, out, lse_c, dlse, mk, scale, dq, dk, dv);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, p.q.scalar_type(), "cross_attention_backward", [&] {
          backward_kernel<scalar_t>(dout, p.q, p.k, p.v, out, lse_c, dlse, mk, scale, dq, dk, dv, dmask_full);
        });
  }
  if (D == 0) dq = at::zeros(q_in.sizes(), q_in.options()), dk = at::zeros(k_in.sizes(), k_in.options());
  if (Dv == 0) dv = at::zeros(v_in.sizes(), v_in.options());
  return finish(dq, dk, dv);
}

}  // namespace
}  // namespace mmfast::xattn
