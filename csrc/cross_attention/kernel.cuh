// Cross-attention device code: FlashAttention-2-style forward and backward, torch-free.
//
// Compiles with nvcc (csrc/cross_attention/cuda.cu) and as plain C++ under the SIMT emulation
// (csrc/emu/cross_attention_emu.cpp, csrc/emu/tsan_cross_attention.cpp) through
// csrc/common/portable.cuh. Math (reference: mmfast/reference/cross_attention.py):
//
//   s[i,j]  = scale * <q_i, k_j> + bias[i,j]                   (bias: float attn_mask)
//   allowed = !kpm[j] && bool_mask[i,j] && (j <= i + Lk - Lq if causal) && j < Lk
//   lse_i   = log sum_{j allowed} exp(s[i,j])                   (-inf when nothing is allowed)
//   p[i,j]  = exp(s[i,j] - lse_i)  (0 where not allowed)
//   o_i     = sum_j p[i,j] z[i,j] / (1 - dropout_p) v_j         (z: counter-hash keep mask)
//
// Backward (FlashAttention-2, https://arxiv.org/abs/2307.08691, Algorithm 2), with
// dp'[i,j] = z[i,j] / (1 - dropout_p) <do_i, v_j> and delta_i = <do_i, o_i> = sum_j p[i,j] dp'[i,j]:
//
//   dv_j = sum_i p[i,j] z[i,j] / (1 - dropout_p) do_i
//   ds[i,j] = p[i,j] (dp'[i,j] - delta_i)          (= d bias[i,j], the float mask's gradient)
//   dq_i = scale sum_j ds[i,j] k_j,    dk_j = scale sum_i ds[i,j] q_i
//
// Tiles: a warp owns 16 rows of a tile; products run on tensor cores (mma.sync m16n8k16, operands
// from shared memory through ldmatrix) for bf16/fp16, and as fp32 FMAs over shared memory with the
// same accumulator layout for fp32 inputs, so masking and softmax code is shared. Everything is
// computed in the log2 domain (exp2 of scores pre-multiplied by log2(e)).
//
// The kernels themselves are in kernel_fwd.cuh and kernel_bwd.cuh; this file holds the parameters,
// the masks, the shared-memory tiles and the warp-level products.
#pragma once

#include "common/portable.cuh"

namespace mmfast {
namespace cross_attention {

using port::bf16_t;
using port::half_t;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Launch bounds of the tile kernels: kThreads threads, and at least one block per SM, which lets
// ptxas use up to 255 registers (for sm_90 it otherwise caps some kernels at 168 and spills).
#if MMFAST_EMULATION
#define MMFAST_CROSS_ATTENTION_BOUNDS
#else
#define MMFAST_CROSS_ATTENTION_BOUNDS __launch_bounds__(::mmfast::cross_attention::kThreads, 1)
#endif

enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskFloat = 2 };

// Everything a kernel needs. Strides are in elements; the last dimension of q, k, v, dout is
// contiguous (the host makes it so). Index maps:
//   q[b][h][i][d]    = q + b*q_sb + h*q_sh + i*q_sl + d          (B x Hq x Lq x D)
//   k[b][g][j][d]    = k + b*k_sb + g*k_sh + j*k_sl + d          (B x Hkv x Lk x D), g = h / (Hq/Hkv)
//   v[b][g][j][d]    likewise with v_*                           (B x Hkv x Lk x Dv)
//   o[b][h][i][d]    = o + b*o_sb + h*o_sh + i*o_sl + d*o_sd     (B x Hq x Lq x Dv, any strides)
//   lse[b][h][i]     = lse + (b*Hq + h)*Lq + i                   (B x Hq x Lq, fp32, contiguous)
//   kpm[b][j]        = kpm + b*kpm_sb + j*kpm_sl                 (B x Lk, 1 = padding)
//   mask[b][h][i][j] = mask + b*m_sb + h*m_sh + i*m_sq + j*m_sk  (broadcast dims have stride 0)
struct Params {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl;
  void* o;
  int64_t o_sb, o_sh, o_sl, o_sd;
  float* lse;
  const uint8_t* kpm;
  int64_t kpm_sb, kpm_sl;
  const void* mask;  // uint8_t (bool mask) or float (additive mask)
  int mask_kind;
  int64_t m_sb, m_sh, m_sq, m_sk;
  int B, Hq, Hkv, Lq, Lk, D, Dv;
  float scale;
  bool causal;
  bool dropout;
  uint32_t drop_threshold;  // keep iff hash >= drop_threshold
  float drop_scale;         // 1 / (1 - dropout_p)
  uint32_t seed_lo, seed_hi;
  bool vec_q, vec_k, vec_v, vec_do;  // rows may be copied in 16-byte chunks (aligned)
  // Split-KV forward: split s covers key blocks [s*blocks_per_split, (s+1)*blocks_per_split);
  // o_part (n_splits x B*Hq*Lq x Dv) and lse_part (n_splits x B*Hq*Lq) hold per-split results.
  int n_splits, blocks_per_split;
  float* o_part;
  float* lse_part;
  // Backward: dout like o but last dim contiguous; delta (B x Hq x Lq fp32); dq, dk, dv
  // contiguous in the input dtype; dmask (B x Hq x Lq x Lk fp32, zeroed) or null.
  const void* dout;
  int64_t do_sb, do_sh, do_sl;
  float* delta;
  void* dq;
  void* dk;
  void* dv;
  float* dmask;
};

// ---- dropout: mmfast's counter hash (mmfast/reference/dropout.py) ---------------------------------
MMFAST_DEVICE uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

// True when attention weight (b, h, i, j) survives dropout; row = (b*Hq + h)*Lq + i (mod 2^32).
MMFAST_DEVICE bool dropout_keep(const Params& p, int bh, int i, int j) {
  const uint32_t row = static_cast<uint32_t>(static_cast<int64_t>(bh) * p.Lq + i);
  uint32_t x = p.seed_lo ^ (row * 0x9E3779B1u) ^ (static_cast<uint32_t>(j) * 0x85EBCA77u);
  return fmix32(fmix32(x) ^ p.seed_hi) >= p.drop_threshold;
}

MMFAST_HOST_DEVICE int imin(int a, int b) { return a < b ? a : b; }
MMFAST_HOST_DEVICE int imax(int a, int b) { return a > b ? a : b; }
MMFAST_HOST_DEVICE int cdiv(int a, int b) { return (a + b - 1) / b; }

// ---- masks -----------------------------------------------------------------------------------
// log2(e) * s[i,j] for an allowed pair, -inf otherwise; qk = <q_i, k_j>.
MMFAST_DEVICE float masked_score_log2(const Params& p, int b, int h, int i, int j, float qk) {
  const float neg_inf = -INFINITY;
  if (i >= p.Lq || j >= p.Lk) return neg_inf;
  if (p.causal && j > i + (p.Lk - p.Lq)) return neg_inf;
  if (p.kpm != nullptr && p.kpm[b * p.kpm_sb + j * p.kpm_sl]) return neg_inf;
  float s = qk * p.scale;
  if (p.mask_kind != kMaskNone) {
    const int64_t off = b * p.m_sb + h * p.m_sh + i * p.m_sq + j * p.m_sk;
    if (p.mask_kind == kMaskBool) {
      if (!static_cast<const uint8_t*>(p.mask)[off]) return neg_inf;
    } else {
      const float bias = static_cast<const float*>(p.mask)[off];
      if (bias == neg_inf) return neg_inf;  // a -inf entry is a mask: whatever qk was is ignored
      s += bias;
    }
  }
  return s * kLog2e;
}

// One past the last key any of query rows [m0, m1) may see (causal: j <= i + Lk - Lq).
MMFAST_DEVICE int key_limit(const Params& p, int m1) {
  if (!p.causal) return p.Lk;
  const int last = imin(m1, p.Lq) - 1 + (p.Lk - p.Lq);
  return imax(0, imin(p.Lk, last + 1));
}

// ---- shared-memory tiles -----------------------------------------------------------------------
// A tile is [rows][HD] elements. 16-bit: rows of HD >= 64 elements are 8+ chunks of 16 bytes and
// chunk c of row r is stored at chunk c ^ (r % 8) (XOR swizzle: ldmatrix reads 8 rows of one chunk
// column without bank conflicts). fp32: rows padded by 4 floats (the scalar product reads 8 rows
// of one column, which then fall in distinct banks).
template <class T, int HD>
struct Tile {
  static constexpr bool k16 = sizeof(T) == 2;
  static constexpr int kChunk = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes
  static constexpr int kRowStride = k16 ? HD : HD + 4;
  static_assert(!k16 || HD >= 64, "16-bit tiles need 8 chunks per row for the swizzle");
  static constexpr int bytes(int rows) { return rows * kRowStride * static_cast<int>(sizeof(T)); }
  MMFAST_DEVICE static int idx(int r, int c) {
    if constexpr (k16) return r * HD + ((((c >> 3) ^ r) & 7) | ((c >> 3) & ~7)) * 8 + (c & 7);
    return r * kRowStride + c;
  }
};

// Copies rows [row0, row0 + ROWS) x cols [0, HD) of a (L x ncols) row-major matrix (row stride ld)
// into tile s, zero-filling rows >= L and cols >= ncols. Whole 16-byte chunks go through cp.async
// when `vec`; the caller commits and waits.
template <class T, int HD, int ROWS>
MMFAST_DEVICE void load_tile(T* s, const T* g, int64_t ld, int row0, int L, int ncols, bool vec) {
  using TL = Tile<T, HD>;
  constexpr int kPerRow = HD / TL::kChunk;
  for (int c = port::linear_thread(); c < ROWS * kPerRow; c += kThreads) {
    const int r = c / kPerRow, col = (c % kPerRow) * TL::kChunk;
    T* dst = s + TL::idx(r, col);
    const int gr = row0 + r;
    if (gr < L && vec && col + TL::kChunk <= ncols) {
      port::cp_async_16(dst, g + gr * ld + col);
    } else {
#pragma unroll
      for (int e = 0; e < TL::kChunk; ++e) {
        const bool in = gr < L && col + e < ncols;
        dst[e] = in ? g[gr * ld + col + e] : port::from_float<T>(0.f);
      }
    }
  }
}

// ---- warp-level products ----------------------------------------------------------------------
// Accumulators use the mma.sync C layout: with g = lane / 4, t = lane % 4, acc[n][e] holds element
// (row g + 8*(e / 2), col 8n + 2t + e % 2) of the warp's 16-row tile.
MMFAST_DEVICE int acc_row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
MMFAST_DEVICE int acc_col(int lane, int n, int e) { return 8 * n + 2 * (lane & 3) + (e & 1); }

template <int N>
MMFAST_DEVICE void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
}

// acc (16 x 8NT) += A[a0 .. a0+16][0 .. HD) * B[b0 .. b0+8NT][0 .. HD)^T; A and B are tiles.
template <class T, int HD, int NT>
MMFAST_DEVICE void gemm_nt(float (&acc)[NT][4], const T* sA, int a0, const T* sB, int b0) {
  using TL = Tile<T, HD>;
  const int lane = port::lane_id();
  if constexpr (TL::k16) {
    static_assert(NT % 2 == 0, "ldmatrix.x4 loads B for two n-tiles");
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t a[4];  // matrices: rows 0-7 / 8-15 x cols 0-7 / 8-15 of this 16x16 step
      port::ldmatrix_x4(a, sA + TL::idx(a0 + (lane & 15), kk * 16 + (lane >> 4) * 8));
#pragma unroll
      for (int n = 0; n < NT; n += 2) {
        uint32_t b[4];  // matrices: (n-tile n, k 0-7), (n, k 8-15), (n+1, k 0-7), (n+1, k 8-15)
        port::ldmatrix_x4(
            b, sB + TL::idx(b0 + 8 * n + (lane >> 4) * 8 + (lane & 7), kk * 16 + ((lane >> 3) & 1) * 8));
        const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
        port::mma_m16n8k16<T>(acc[n], a, b_lo, acc[n]);
        port::mma_m16n8k16<T>(acc[n + 1], a, b_hi, acc[n + 1]);
      }
    }
  } else {
    const int r0 = a0 + (lane >> 2), c0 = b0 + 2 * (lane & 3);
#pragma unroll 4
    for (int k = 0; k < HD; ++k) {
      const float x0 = sA[TL::idx(r0, k)], x1 = sA[TL::idx(r0 + 8, k)];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const float y0 = sB[TL::idx(c0 + 8 * n, k)], y1 = sB[TL::idx(c0 + 8 * n + 1, k)];
        acc[n][0] += x0 * y0;
        acc[n][1] += x0 * y1;
        acc[n][2] += x1 * y0;
        acc[n][3] += x1 * y1;
      }
    }
  }
}

// acc (16 x HD) += P (16 x 8KT, registers in the C layout) * B[0 .. 8KT][0 .. HD) (a tile).
// 16-bit: P's C fragments of n-tiles 2k, 2k+1 are exactly the A fragment of k-step k (FA2's
// register reuse). fp32: P goes through the warp's scratch (16 x (8KT + 4) floats) instead.
template <class T, int HD, int KT>
MMFAST_DEVICE void gemm_pv(float (&acc)[HD / 8][4], const float (&P)[KT][4], const T* sB, float* scratch) {
  using TL = Tile<T, HD>;
  const int lane = port::lane_id();
  if constexpr (TL::k16) {
    static_assert(KT % 2 == 0, "P needs whole 16-column k-steps");
#pragma unroll
    for (int kk = 0; kk < KT / 2; ++kk) {
      const uint32_t a[4] = {port::pack2<T>(P[2 * kk][0], P[2 * kk][1]),
                             port::pack2<T>(P[2 * kk][2], P[2 * kk][3]),
                             port::pack2<T>(P[2 * kk + 1][0], P[2 * kk + 1][1]),
                             port::pack2<T>(P[2 * kk + 1][2], P[2 * kk + 1][3])};
#pragma unroll
      for (int n = 0; n < HD / 8; n += 2) {
        uint32_t b[4];  // B stored [k][n]: .trans; matrices (k 0-7, n), (k 8-15, n), (k 0-7, n+1), ...
        port::ldmatrix_x4_trans(
            b, sB + TL::idx(kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), 8 * n + (lane >> 4) * 8));
        const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
        port::mma_m16n8k16<T>(acc[n], a, b_lo, acc[n]);
        port::mma_m16n8k16<T>(acc[n + 1], a, b_hi, acc[n + 1]);
      }
    }
  } else {
    constexpr int ld = 8 * KT + 4;
#pragma unroll
    for (int n = 0; n < KT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) scratch[acc_row(lane, e) * ld + acc_col(lane, n, e)] = P[n][e];
    port::warp_sync();
    const int r0 = lane >> 2, c0 = 2 * (lane & 3);
#pragma unroll 4
    for (int k = 0; k < 8 * KT; ++k) {
      const float x0 = scratch[r0 * ld + k], x1 = scratch[(r0 + 8) * ld + k];
#pragma unroll
      for (int n = 0; n < HD / 8; ++n) {
        const float y0 = sB[TL::idx(k, c0 + 8 * n)], y1 = sB[TL::idx(k, c0 + 8 * n + 1)];
        acc[n][0] += x0 * y0;
        acc[n][1] += x0 * y1;
        acc[n][2] += x1 * y0;
        acc[n][3] += x1 * y1;
      }
    }
    port::warp_sync();  // the scratch is rewritten by the next product
  }
}

// Sum / max over the 4 lanes of a quad (the lanes that share accumulator rows).
MMFAST_DEVICE float quad_sum(float x) {
  x += port::shfl_xor(x, 1);
  return x + port::shfl_xor(x, 2);
}
MMFAST_DEVICE float quad_max(float x) {
  x = fmaxf(x, port::shfl_xor(x, 1));
  return fmaxf(x, port::shfl_xor(x, 2));
}

// Writes a 16 x HD accumulator tile (times `mul`) to rows [r0, r0+16) of a row-major T matrix
// (row stride ld, column stride cs), rows < L and cols < ncols only.
template <class T, int HD>
MMFAST_DEVICE void store_rows(T* g, int64_t ld, int64_t cs, int r0, int L, int ncols,
                              const float (&acc)[HD / 8][4], const float (&mul)[2]) {
  const int lane = port::lane_id();
#pragma unroll
  for (int n = 0; n < HD / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = r0 + acc_row(lane, e), c = acc_col(lane, n, e);
      if (r < L && c < ncols) g[r * ld + c * cs] = port::from_float<T>(acc[n][e] * mul[e >> 1]);
    }
}

}  // namespace cross_attention
}  // namespace mmfast
