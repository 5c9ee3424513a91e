// Backward pass of the CPU cross-attention (included by cpu.cpp, after the forward and helpers).
// Recomputes P from the saved LSE instead of storing it (FlashAttention-2):
//   p = exp(scale q k^T + bias - lse)  (0 where masked),  D_i = <do_i, o_i>
//   dv += (p z)^T do,  dp = z (do v^T),  ds = p (dp - D),  dq += scale ds k,  dk += scale ds^T q
// One task per (b, g): dk, dv of that key/value head accumulate in fp32 over the group's query
// heads and all query blocks, and each dq row belongs to exactly one task, so no atomics.
#pragma once

namespace mmfast::xattn {
namespace {

template <typename T>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const Masking& mk, double scale_d,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dmask) {
  using A = acc_type<T>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3), group = Hq / Hkv;
  const View4<T> Q = view4<T>(q), K = view4<T>(k), V = view4<T>(v), O = view4<T>(out), dO = view4<T>(dout);
  const View4<T> dQ = view4<T>(dq), dK = view4<T>(dk), dV = view4<T>(dv);  // contiguous outputs
  const A* lse_p = lse.data_ptr<A>();
  A* dmask_p = dmask.defined() ? dmask.data_ptr<A>() : nullptr;  // contiguous B x Hq x Lq x Lk
  const A scale = static_cast<A>(scale_d);
  const int64_t Nb = Lk <= kMaxWholeRow ? std::max<int64_t>(Lk, 1) : kKeyBlock;
  const int64_t Mb = std::min<int64_t>(std::max<int64_t>(Lq, 1), 64);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<A> s(Mb * Nb), dp(Mb * Nb), pz_buf(mk.dropout_p > 0 ? Mb * Nb : 0), dq_acc(Mb * D), di(Mb),
        dk_acc(Lk * D), dv_acc(Lk * Dv);
    std::vector<T> scratch;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, g = t % Hkv;
      std::fill(dk_acc.begin(), dk_acc.end(), A(0));
      std::fill(dv_acc.begin(), dv_acc.end(), A(0));
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < Lq; i0 += Mb) {
          const int64_t rows = std::min(Mb, Lq - i0);
          auto [lo, hi] = mk.key_range(b, i0, i0 + rows);
          std::fill(dq_acc.begin(), dq_acc.end(), A(0));
          // 1. D_i = <do_i, o_i>.
          for (int64_t r = 0; r < rows; ++r) {
            const T* o = O.row(b, h, i0 + r);
            const T* d_o = dO.row(b, h, i0 + r);
            A acc = 0;
            for (int64_t d = 0; d < Dv; ++d) acc += static_cast<A>(d_o[d]) * static_cast<A>(o[d]);
            di[r] = acc;
          }
          const A* lse_row = lse_p + (b * Hq + h) * Lq + i0;
          for (int64_t j0 = lo; j0 < hi; j0 += Nb) {
            const int64_t cols = std::min(Nb, hi - j0);
            // 2. p = exp(scale q k^T + bias - lse), masked entries and empty rows give 0.
            gemm<T>(false, true, rows, cols, D, scale, Q.row(b, h, i0), Q.sl, K.row(b, g, j0), K.sl, A(0),
                    s.data(), Nb);
            apply_masks(mk, b, h, i0, rows, j0, cols, s.data(), Nb);
            for (int64_t r = 0; r < rows; ++r) {
              A* srow = s.data() + r * Nb;
              const A l = lse_row[r];
              if (l == kNegInf) {
                std::fill(srow, srow + cols, A(0));
              } else {
                exp_sub_sum(srow, cols, l);
              }
            }
            // 3. dp = do v^T.
            gemm<T>(false, true, rows, cols, Dv, A(1), dO.row(b, h, i0), dO.sl, V.row(b, g, j0), V.sl, A(0),
                    dp.data(), Nb);
            // 4. dv += (p z)^T do; with dropout, dp *= z (z = keep / (1 - p_drop)).
            const A* pz = s.data();
            if (mk.dropout_p > 0) {
              std::copy(s.begin(), s.begin() + rows * Nb, pz_buf.begin());
              apply_dropout(mk, b, h, i0, rows, j0, cols, pz_buf.data(), Nb);
              apply_dropout(mk, b, h, i0, rows, j0, cols, dp.data(), Nb);
              pz = pz_buf.data();
            }
            gemm<T>(true, false, cols, Dv, rows, A(1), as_input<T, A>(pz, rows * Nb, scratch), Nb,
                    dO.row(b, h, i0), dO.sl, A(1), dv_acc.data() + j0 * Dv, Dv);
            // 5. ds = p (dp - D_i), kept in s; the float mask's gradient is ds itself.
            for (int64_t r = 0; r < rows; ++r) {
              A* srow = s.data() + r * Nb;
              const A* dprow = dp.data() + r * Nb;
              const A d_i = di[r];
#pragma omp simd
              for (int64_t c = 0; c < cols; ++c) srow[c] = srow[c] * (dprow[c] - d_i);
              if (dmask_p) {
                std::copy(srow, srow + cols, dmask_p + ((b * Hq + h) * Lq + i0 + r) * Lk + j0);
              }
            }
            // 6. dq += scale ds k,  dk += scale ds^T q.
            const T* ds = as_input<T, A>(s.data(), rows * Nb, scratch);
            gemm<T>(false, false, rows, D, cols, scale, ds, Nb, K.row(b, g, j0), K.sl, A(1), dq_acc.data(),
                    D);
            gemm<T>(true, false, cols, D, rows, scale, ds, Nb, Q.row(b, h, i0), Q.sl, A(1),
                    dk_acc.data() + j0 * D, D);
          }
          for (int64_t r = 0; r < rows; ++r) {
            T* dqrow = dQ.row(b, h, i0 + r);
            for (int64_t d = 0; d < D; ++d) dqrow[d] = static_cast<T>(dq_acc[r * D + d]);
          }
        }
      }
      for (int64_t j = 0; j < Lk; ++j) {
        T* dkrow = dK.row(b, g, j);
        T* dvrow = dV.row(b, g, j);
        for (int64_t d = 0; d < D; ++d) dkrow[d] = static_cast<T>(dk_acc[j * D + d]);
        for (int64_t d = 0; d < Dv; ++d) dvrow[d] = static_cast<T>(dv_acc[j * Dv + d]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& kpm,
    const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale, double dropout_p, int64_t seed,
    bool attn_mask_grad) {
  Prepared p = prepare(q_in, k_in, v_in, kpm, attn_mask);
  const int64_t B = p.q.size(0), Hq = p.q.size(1), Lq = p.q.size(2), Lk = p.k.size(2);
  TORCH_CHECK(
      grad_out.sizes() == out_in.sizes() && out_in.sizes() == at::IntArrayRef({B, Hq, Lq, p.v.size(3)}),
      "cross_attention_backward: grad_out and out must be (B, Hq, Lq, Dv)");
  const auto acc_dtype = p.q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, Hq, Lq}),
              "cross_attention_backward: lse must be (B, Hq, Lq)");
  at::Tensor lse_c = lse.to(acc_dtype).contiguous();
  at::Tensor dout = rows_ready(grad_out.to(p.q.scalar_type())), out = rows_ready(out_in);
  at::Tensor dq = at::empty(p.q.sizes(), p.q.options());
  at::Tensor dk = at::empty(p.k.sizes(), p.k.options());
  at::Tensor dv = at::empty(p.v.sizes(), p.v.options());
  const bool want_dmask = attn_mask_grad && attn_mask.has_value() && attn_mask->scalar_type() != at::kBool;
  at::Tensor dmask_full =
      want_dmask ? at::zeros({B, Hq, Lq, Lk}, p.q.options().dtype(acc_dtype)) : at::Tensor();
  Masking mk = make_masking(p.q, p.k, p.kpm, p.mask, is_causal, dropout_p, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, p.q.scalar_type(), "cross_attention_backward",
      [&] { backward_kernel<scalar_t>(dout, p.q, p.k, p.v, out, lse_c, mk, scale, dq, dk, dv, dmask_full); });
  at::Tensor dmask;
  if (want_dmask) {  // sum over the dims the mask was broadcast along, back to its shape and dtype
    dmask = at::sum_to(dmask_full, attn_mask->sizes()).to(attn_mask->scalar_type());
  } else {
    dmask = at::empty({0}, p.q.options());
  }
  return {dq, dk, dv, dmask};
}

}  // namespace
}  // namespace mmfast::xattn
