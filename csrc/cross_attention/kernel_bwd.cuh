// Cross-attention backward (FlashAttention-2 recomputation), deterministic: no atomics.
//   1. delta_kernel: delta_i = <do_i, o_i>.
//   2. dkdv_kernel: a block owns BN keys of one key/value head and loops over every query tile of
//      every query head sharing it (GQA), accumulating dk, dv in registers.
//   3. dq_kernel: a block owns BM queries and loops over key tiles, accumulating dq; it also writes
//      the float mask's gradient d bias[i,j] = ds[i,j] (each element exactly once).
// Math and conventions: kernel.cuh.
#pragma once

#include "cross_attention/kernel.cuh"

namespace mmfast {
namespace cross_attention {

template <class T, int HD>
struct BwdCfg {
  using TL = Tile<T, HD>;
  // dkdv: BN keys (16 per warp) against BMq-query tiles (Q, dO, lse, delta double-buffered).
  static constexpr int BN = 16 * kWarps;
  static constexpr int BMq = TL::k16 ? (HD <= 64 ? 64 : 32) : (HD <= 64 ? 32 : 16);
  static constexpr int kOffV = TL::bytes(BN);
  static constexpr int kOffQ = kOffV + TL::bytes(BN);
  static constexpr int kOffDO = kOffQ + 2 * TL::bytes(BMq);
  static constexpr int kOffLse = kOffDO + 2 * TL::bytes(BMq);
  static constexpr int kOffDelta = kOffLse + 2 * BMq * 4;
  static constexpr int kOffScratch = kOffDelta + 2 * BMq * 4;
  static constexpr int kScratchKV = TL::k16 ? 0 : 16 * (BMq + 4);
  static constexpr int kSmemKV = kOffScratch + kWarps * kScratchKV * 4;
  // dq: BM queries (16 per warp) against BNk-key tiles (K, V double-buffered).
  static constexpr int BM = 16 * kWarps;
  static constexpr int BNk = TL::k16 ? 64 : (HD <= 64 ? 32 : 16);
  static constexpr int kOffQdO = TL::bytes(BM);
  static constexpr int kOffK = 2 * TL::bytes(BM);
  static constexpr int kOffVq = kOffK + 2 * TL::bytes(BNk);
  static constexpr int kOffScratchQ = kOffVq + 2 * TL::bytes(BNk);
  static constexpr int kScratchQ = TL::k16 ? 0 : 16 * (BNk + 4);
  static constexpr int kSmemQ = kOffScratchQ + kWarps * kScratchQ * 4;
};

// lse in the log2 domain, with an empty row's -inf turned into +inf so exp2(s - lse) = 0 there.
MMFAST_DEVICE float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// Grid ceil(B*Hq*Lq / kWarps), one warp per query row: delta_i = sum_d do[i,d] o[i,d].
template <class T>
MMFAST_GLOBAL void MMFAST_LAUNCH_BOUNDS(kThreads) delta_kernel(Params p) {
  const int64_t row = static_cast<int64_t>(port::block_x()) * kWarps + port::warp_id();
  const int lane = port::lane_id();
  if (row >= static_cast<int64_t>(p.B) * p.Hq * p.Lq) return;  // whole warps leave together
  const int bh = static_cast<int>(row / p.Lq), i = static_cast<int>(row % p.Lq);
  const int b = bh / p.Hq, h = bh % p.Hq;
  const T* dO = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + i * p.do_sl;
  const T* o = static_cast<const T*>(p.o) + b * p.o_sb + h * p.o_sh + i * p.o_sl;
  float acc = 0.f;
  for (int d = lane; d < p.Dv; d += 32) acc += port::to_float(dO[d]) * port::to_float(o[d * p.o_sd]);
#pragma unroll
  for (int w = 16; w > 0; w /= 2) acc += port::shfl_xor(acc, w);
  if (lane == 0) p.delta[row] = acc;
}

// The backward pointwise step on one element: p = exp2(s2 - lse2); with z = keep / (1 - dropout_p)
// (1 without dropout): returns ds = p (z dp - delta) and sets pz = p z.
MMFAST_DEVICE float grad_score(const Params& p, int bh, int i, int j, float s2, float lse2, float dp,
                               float delta, float& pz) {
  const float pr = exp2f(s2 - lse2);
  float z = 1.f;
  if (p.dropout) z = dropout_keep(p, bh, i, j) ? p.drop_scale : 0.f;
  pz = pr * z;
  return pr * (dp * z - delta);
}

// Grid (B*Hkv, ceil(Lk / BN)), kThreads threads, BwdCfg::kSmemKV bytes. Tiles here are transposed:
// rows are keys, columns queries, so s^T = K Q^T and dp^T = V dO^T, then dv += (p z)^T dO and
// dk += ds^T Q are register-A products.
template <class T, int HD>
MMFAST_GLOBAL void MMFAST_CROSS_ATTENTION_BOUNDS dkdv_kernel(Params p) {
  using C = BwdCfg<T, HD>;
  using TL = Tile<T, HD>;
  constexpr int BN = C::BN, BMq = C::BMq, NQ = BMq / 8, OT = HD / 8;
  unsigned char* smem = port::dynamic_smem<unsigned char>();
  const int warp = port::warp_id(), lane = port::lane_id();
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = reinterpret_cast<T*>(smem + C::kOffV);
  T* sQ = reinterpret_cast<T*>(smem + C::kOffQ);
  T* sdO = reinterpret_cast<T*>(smem + C::kOffDO);
  float* sLse = reinterpret_cast<float*>(smem + C::kOffLse);
  float* sDelta = reinterpret_cast<float*>(smem + C::kOffDelta);
  float* scratch = reinterpret_cast<float*>(smem + C::kOffScratch) + warp * C::kScratchKV;

  const int b = port::block_x() / p.Hkv, g = port::block_x() % p.Hkv, n0 = port::block_y() * BN;
  const int group = p.Hq / p.Hkv;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + g * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + g * p.v_sh;
  // Causal: key j is seen by queries i >= j - (Lk - Lq); earlier query tiles are skipped.
  const int i_first = p.causal ? imax(0, n0 - (p.Lk - p.Lq)) : 0;
  const int mb0 = i_first / BMq, nqb = imax(0, cdiv(p.Lq, BMq) - mb0), total = group * nqb;
  auto load_q = [&](int it, int buf) {
    const int h = g * group + it / nqb, mq0 = (mb0 + it % nqb) * BMq;
    const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
    const T* dO = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
    load_tile<T, HD, BMq>(sQ + buf * BMq * TL::kRowStride, q, p.q_sl, mq0, p.Lq, p.D, p.vec_q);
    load_tile<T, HD, BMq>(sdO + buf * BMq * TL::kRowStride, dO, p.do_sl, mq0, p.Lq, p.Dv, p.vec_do);
    const int64_t row0 = static_cast<int64_t>(b * p.Hq + h) * p.Lq + mq0;
    for (int r = port::linear_thread(); r < BMq; r += kThreads) {
      const bool in = mq0 + r < p.Lq;
      sLse[buf * BMq + r] = in ? lse_log2(p.lse[row0 + r]) : INFINITY;
      sDelta[buf * BMq + r] = in ? p.delta[row0 + r] : 0.f;
    }
  };

  // 1. K, V tiles and the first Q / dO tiles.
  load_tile<T, HD, BN>(sK, k, p.k_sl, n0, p.Lk, p.D, p.vec_k);
  load_tile<T, HD, BN>(sV, v, p.v_sl, n0, p.Lk, p.Dv, p.vec_v);
  if (total > 0) load_q(0, 0);
  port::cp_async_commit();

  float acc_dk[OT][4], acc_dv[OT][4];
  zero(acc_dk);
  zero(acc_dv);
  for (int it = 0; it < total; ++it) {
    const int buf = it & 1, h = g * group + it / nqb, mq0 = (mb0 + it % nqb) * BMq;
    // 2. Prefetch the next query tile.
    if (it + 1 < total) {
      load_q(it + 1, buf ^ 1);
      port::cp_async_commit();
      port::cp_async_wait<1>();
    } else {
      port::cp_async_wait<0>();
    }
    port::block_sync();
    const T* sQb = sQ + buf * BMq * TL::kRowStride;
    const T* sdOb = sdO + buf * BMq * TL::kRowStride;
    // 3. s^T = K Q^T and dp^T = V dO^T for this warp's 16 keys.
    float s[NQ][4], dp[NQ][4];
    zero(s);
    zero(dp);
    gemm_nt<T, HD, NQ>(s, sK, warp * 16, sQb, 0);
    gemm_nt<T, HD, NQ>(dp, sV, warp * 16, sdOb, 0);
// 4. p, dropout, ds (s <- p z, dp <- ds).
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + warp * 16 + acc_row(lane, e), c = acc_col(lane, n, e);
        const float s2 = masked_score_log2(p, b, h, mq0 + c, j, s[n][e]);
        float pz;
        dp[n][e] = grad_score(p, b * p.Hq + h, mq0 + c, j, s2, sLse[buf * BMq + c], dp[n][e],
                              sDelta[buf * BMq + c], pz);
        s[n][e] = pz;
      }
    // 5. dv += (p z)^T dO, dk += ds^T Q.
    gemm_pv<T, HD, NQ>(acc_dv, s, sdOb, scratch);
    gemm_pv<T, HD, NQ>(acc_dk, dp, sQb, scratch);
    port::block_sync();  // everyone is done with `buf` before it is refilled
  }
  port::cp_async_wait<0>();

  // 6. dk = scale * acc_dk, dv = acc_dv (B x Hkv x Lk x D / Dv, contiguous).
  const int64_t head = static_cast<int64_t>(b) * p.Hkv + g;
  const float one[2] = {1.f, 1.f}, sc[2] = {p.scale, p.scale};
  store_rows<T, HD>(static_cast<T*>(p.dk) + head * p.Lk * p.D, p.D, 1, n0 + warp * 16, p.Lk, p.D, acc_dk, sc);
  store_rows<T, HD>(static_cast<T*>(p.dv) + head * p.Lk * p.Dv, p.Dv, 1, n0 + warp * 16, p.Lk, p.Dv, acc_dv,
                    one);
}

// Grid (B*Hq, ceil(Lq / BM)), kThreads threads, BwdCfg::kSmemQ bytes: s = Q K^T, dp = dO V^T,
// ds as above, dq += ds K, and dmask[i,j] = ds[i,j] when requested.
template <class T, int HD>
MMFAST_GLOBAL void MMFAST_CROSS_ATTENTION_BOUNDS dq_kernel(Params p) {
  using C = BwdCfg<T, HD>;
  using TL = Tile<T, HD>;
  constexpr int BM = C::BM, BN = C::BNk, NT = BN / 8, OT = HD / 8;
  unsigned char* smem = port::dynamic_smem<unsigned char>();
  const int warp = port::warp_id(), lane = port::lane_id();
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = reinterpret_cast<T*>(smem + C::kOffQdO);
  T* sK = reinterpret_cast<T*>(smem + C::kOffK);
  T* sV = reinterpret_cast<T*>(smem + C::kOffVq);
  float* scratch = reinterpret_cast<float*>(smem + C::kOffScratchQ) + warp * C::kScratchQ;

  const int bh = port::block_x(), m0 = port::block_y() * BM;
  const int b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hkv);
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* dO = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + g * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + g * p.v_sh;
  const int nb = cdiv(key_limit(p, m0 + BM), BN);
  auto load_kv = [&](int blk, int buf) {
    load_tile<T, HD, BN>(sK + buf * BN * TL::kRowStride, k, p.k_sl, blk * BN, p.Lk, p.D, p.vec_k);
    load_tile<T, HD, BN>(sV + buf * BN * TL::kRowStride, v, p.v_sl, blk * BN, p.Lk, p.Dv, p.vec_v);
  };

  // 1. Q, dO tiles, the first K/V tiles, and this lane's two rows of lse and delta.
  load_tile<T, HD, BM>(sQ, q, p.q_sl, m0, p.Lq, p.D, p.vec_q);
  load_tile<T, HD, BM>(sdO, dO, p.do_sl, m0, p.Lq, p.Dv, p.vec_do);
  if (nb > 0) load_kv(0, 0);
  port::cp_async_commit();
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + warp * 16 + acc_row(lane, 2 * r);
    const int64_t row = static_cast<int64_t>(bh) * p.Lq + i;
    lse2[r] = i < p.Lq ? lse_log2(p.lse[row]) : INFINITY;
    delta[r] = i < p.Lq ? p.delta[row] : 0.f;
  }

  float acc_dq[OT][4];
  zero(acc_dq);
  for (int blk = 0; blk < nb; ++blk) {
    const int buf = blk & 1;
    // 2. Prefetch the next K/V tiles.
    if (blk + 1 < nb) {
      load_kv(blk + 1, buf ^ 1);
      port::cp_async_commit();
      port::cp_async_wait<1>();
    } else {
      port::cp_async_wait<0>();
    }
    port::block_sync();
    const T* sKb = sK + buf * BN * TL::kRowStride;
    // 3. s = Q K^T, dp = dO V^T.
    float s[NT][4], dp[NT][4];
    zero(s);
    zero(dp);
    gemm_nt<T, HD, NT>(s, sQ, warp * 16, sKb, 0);
    gemm_nt<T, HD, NT>(dp, sdO, warp * 16, sV + buf * BN * TL::kRowStride, 0);
// 4. ds (into s); the float mask's gradient is ds itself.
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = m0 + warp * 16 + acc_row(lane, e), j = blk * BN + acc_col(lane, n, e);
        const float s2 = masked_score_log2(p, b, h, i, j, s[n][e]);
        float pz;
        s[n][e] = grad_score(p, bh, i, j, s2, lse2[e >> 1], dp[n][e], delta[e >> 1], pz);
        if (p.dmask != nullptr && i < p.Lq && j < p.Lk)
          p.dmask[(static_cast<int64_t>(bh) * p.Lq + i) * p.Lk + j] = s[n][e];
      }
    // 5. dq += ds K.
    gemm_pv<T, HD, NT>(acc_dq, s, sKb, scratch);
    port::block_sync();
  }
  port::cp_async_wait<0>();

  // 6. dq = scale * acc_dq (B x Hq x Lq x D, contiguous).
  const float sc[2] = {p.scale, p.scale};
  store_rows<T, HD>(static_cast<T*>(p.dq) + static_cast<int64_t>(bh) * p.Lq * p.D, p.D, 1, m0 + warp * 16,
                    p.Lq, p.D, acc_dq, sc);
}

}  // namespace cross_attention
}  // namespace mmfast
