// Cross-attention forward: online softmax over key tiles (FlashAttention-2), optional split-KV.
// Math and conventions: kernel.cuh.
#pragma once

#include "cross_attention/kernel.cuh"

namespace mmfast {
namespace cross_attention {

// Forward tiles: BM query rows per block (16 per warp), BN keys per step; K and V double-buffered.
template <class T, int HD>
struct FwdCfg {
  using TL = Tile<T, HD>;
  static constexpr int BM = 16 * kWarps;
  static constexpr int BN = TL::k16 ? 64 : 32;
  static constexpr int kScratchFloats = TL::k16 ? 0 : 16 * (BN + 4);  // per warp, fp32 only
  static constexpr int kOffK = TL::bytes(BM);
  static constexpr int kOffV = kOffK + 2 * TL::bytes(BN);
  static constexpr int kOffScratch = kOffV + 2 * TL::bytes(BN);
  static constexpr int kSmem = kOffScratch + kWarps * kScratchFloats * 4;
};

// One online-softmax step on a 16 x 8NT score tile s (raw <q, k> on entry, probabilities with
// dropout applied on exit), rescaling the running output acc_o:
//   m' = max(m, rowmax(s)),  alpha = exp2(m - m'),  l' = alpha l + rowsum(exp2(s - m')),  o' = alpha o.
// A row with no allowed key so far keeps m = -inf and uses 0 as its offset (no inf - inf).
template <int NT, int OT>
MMFAST_DEVICE void online_softmax(const Params& p, int b, int h, int row0, int col0, float (&s)[NT][4],
                                  float (&acc_o)[OT][4], float (&m_run)[2], float (&l_run)[2]) {
  const int lane = port::lane_id();
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = row0 + acc_row(lane, e), j = col0 + acc_col(lane, n, e);
      s[n][e] = masked_score_log2(p, b, h, i, j, s[n][e]);
      mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
    }
  float alpha[2], m_use[2], sum[2] = {0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_new = fmaxf(m_run[r], quad_max(mx[r]));
    m_use[r] = m_new == -INFINITY ? 0.f : m_new;
    alpha[r] = exp2f(m_run[r] - m_use[r]);
    m_run[r] = m_new;
  }
  const int bh = b * p.Hq + h;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float pr = exp2f(s[n][e] - m_use[e >> 1]);
      sum[e >> 1] += pr;  // the softmax normalizer counts dropped weights too
      if (p.dropout && !dropout_keep(p, bh, row0 + acc_row(lane, e), col0 + acc_col(lane, n, e))) pr = 0.f;
      s[n][e] = pr;
    }
#pragma unroll
  for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + sum[r];  // per-lane partial sums
#pragma unroll
  for (int n = 0; n < OT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[n][e] *= alpha[e >> 1];
}

// Grid (B*Hq, ceil(Lq / BM), n_splits), kThreads threads, FwdCfg::kSmem bytes of shared memory.
// Writes out and lse, or (n_splits > 1) this split's normalized output and LSE to o_part/lse_part.
template <class T, int HD>
MMFAST_GLOBAL void MMFAST_CROSS_ATTENTION_BOUNDS fwd_kernel(Params p) {
  using C = FwdCfg<T, HD>;
  using TL = Tile<T, HD>;
  constexpr int BM = C::BM, BN = C::BN, NT = BN / 8, OT = HD / 8;
  unsigned char* smem = port::dynamic_smem<unsigned char>();
  const int warp = port::warp_id(), lane = port::lane_id();
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + C::kOffK);
  T* sV = reinterpret_cast<T*>(smem + C::kOffV);
  float* scratch = reinterpret_cast<float*>(smem + C::kOffScratch) + warp * C::kScratchFloats;

  const int bh = port::block_x(), m0 = port::block_y() * BM, split = port::block_z();
  const int b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hkv);
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + g * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + g * p.v_sh;
  const int nb = cdiv(key_limit(p, m0 + BM), BN);  // causal: later key tiles are fully masked
  const int blk0 = split * p.blocks_per_split, blk1 = imin(nb, blk0 + p.blocks_per_split);
  auto load_kv = [&](int blk, int buf) {
    load_tile<T, HD, BN>(sK + buf * BN * TL::kRowStride, k, p.k_sl, blk * BN, p.Lk, p.D, p.vec_k);
    load_tile<T, HD, BN>(sV + buf * BN * TL::kRowStride, v, p.v_sl, blk * BN, p.Lk, p.Dv, p.vec_v);
  };

  // 1. Q tile and the first K/V tiles.
  load_tile<T, HD, BM>(sQ, q, p.q_sl, m0, p.Lq, p.D, p.vec_q);
  if (blk0 < blk1) load_kv(blk0, 0);
  port::cp_async_commit();

  float acc_o[OT][4], m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  zero(acc_o);
  for (int blk = blk0; blk < blk1; ++blk) {
    const int buf = (blk - blk0) & 1;
    // 2. Prefetch the next K/V tiles into the other buffer while this one is used.
    if (blk + 1 < blk1) {
      load_kv(blk + 1, buf ^ 1);
      port::cp_async_commit();
      port::cp_async_wait<1>();
    } else {
      port::cp_async_wait<0>();
    }
    port::block_sync();
    // 3. S = Q K^T for this warp's 16 rows.
    float s[NT][4];
    zero(s);
    gemm_nt<T, HD, NT>(s, sQ, warp * 16, sK + buf * BN * TL::kRowStride, 0);
    // 4. Masks, online softmax, dropout.
    online_softmax(p, b, h, m0 + warp * 16, blk * BN, s, acc_o, m_run, l_run);
    // 5. O += P V.
    gemm_pv<T, HD, NT>(acc_o, s, sV + buf * BN * TL::kRowStride, scratch);
    port::block_sync();  // everyone is done with `buf` before it is refilled
  }
  port::cp_async_wait<0>();

  // 6. o = acc / l * 1/(1-p), lse = m ln2 + ln l; an empty row gives o = 0, lse = -inf. A NaN or
  // +inf score made l NaN (exp of NaN, inf - inf): o and lse NaN (docs/numerics.md).
  float mul[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    mul[r] = l == 0.f ? 0.f : p.drop_scale / l;
    lse[r] = l == 0.f ? -INFINITY : m_run[r] * kLn2 + logf(l);
  }
  const int row0 = m0 + warp * 16;
  if (p.n_splits == 1) {
    T* o = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
    store_rows<T, HD>(o, p.o_sl, p.o_sd, row0, p.Lq, p.Dv, acc_o, mul);
  } else {
    const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Lq;
    float* o = p.o_part + (split * rows + static_cast<int64_t>(bh) * p.Lq) * p.Dv;
    store_rows<float, HD>(o, p.Dv, 1, row0, p.Lq, p.Dv, acc_o, mul);
  }
  if ((lane & 3) == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = row0 + acc_row(lane, 2 * r);
      if (i >= p.Lq) continue;
      const int64_t row = static_cast<int64_t>(bh) * p.Lq + i;
      if (p.n_splits == 1) {
        p.lse[row] = lse[r];
      } else {
        p.lse_part[split * static_cast<int64_t>(p.B) * p.Hq * p.Lq + row] = lse[r];
      }
    }
  }
}

// Split-KV merge, one thread per output element (grid ceil(B*Hq*Lq*Dv / kThreads)):
//   lse = log sum_s exp(lse_s),  o = sum_s exp(lse_s - lse) o_s.
template <class T>
MMFAST_GLOBAL void MMFAST_LAUNCH_BOUNDS(kThreads) combine_kernel(Params p) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Lq;
  const int64_t idx = static_cast<int64_t>(port::block_x()) * kThreads + port::linear_thread();
  if (idx >= rows * p.Dv) return;
  const int64_t row = idx / p.Dv;
  const int d = static_cast<int>(idx % p.Dv);
  float mx = -INFINITY;
  bool nan = false;  // fmaxf drops NaN: a NaN split (a NaN score in its keys) is tracked apart
  for (int s = 0; s < p.n_splits; ++s) {
    const float x = p.lse_part[s * rows + row];
    mx = fmaxf(mx, x);
    nan |= x != x;
  }
  float o = 0.f, lse = -INFINITY;
  if (nan) {
    o = lse = NAN;
  } else if (mx != -INFINITY) {
    float sum = 0.f;
    for (int s = 0; s < p.n_splits; ++s) sum += expf(p.lse_part[s * rows + row] - mx);
    lse = mx + logf(sum);
    for (int s = 0; s < p.n_splits; ++s)
      o += expf(p.lse_part[s * rows + row] - lse) * p.o_part[(s * rows + row) * p.Dv + d];
  }
  const int bh = static_cast<int>(row / p.Lq), i = static_cast<int>(row % p.Lq);
  const int b = bh / p.Hq, h = bh % p.Hq;
  static_cast<T*>(p.o)[b * p.o_sb + h * p.o_sh + i * p.o_sl + d * p.o_sd] = port::from_float<T>(o);
  if (d == 0) p.lse[row] = lse;
}

}  // namespace cross_attention
}  // namespace mmfast
