// Contrastive losses (InfoNCE / CLIP and SigLIP) as tiled CUDA kernels that never hold the N x M
// logits. Torch-free device code written against common/portable.cuh: it compiles with nvcc
// (csrc/contrastive/cuda.cu) and as plain C++ under the SIMT emulation (csrc/emu/*.cpp).
//
// Math (x = image features (N, D), y = text features (M, D), s = logit scale, b = logit bias):
//   dot[i][j] = <x_i, y_j>,   l[i][j] = s * dot[i][j]  (+ b for SigLIP)
//   InfoNCE   row_lse[i] = logsumexp_j l[i][j],  col_lse[j] = logsumexp_i l[i][j]
//             l_img[i] = row_lse[i] - l[i][t_i]   (t_i: the target text of image i; -1: none)
//             l_txt[j] = col_lse[j] - l[u_j][j]   (u_j: the target image of text j; -1: none)
//             dL/dl[i][j] = a_i (softmax_row[i][j] - [j == t_i]) + c_j (softmax_col[i][j] - [i == u_j])
//             with a_i = dL/dl_img[i], c_j = dL/dl_txt[j] (the "coefficients", see coef_kernel).
//   SigLIP    z[i][j] = 1 if j == t_i (default i == j) else -1,  loss_row[i] = sum_j softplus(-z l[i][j])
//             dL/dl[i][j] = -a_i z sigmoid(-z l[i][j])
//   Both      dx = s * dl @ y,  dy = s * dl^T @ x,  ds = sum dl * dot (its a and c terms apart),
//             db = sum dl.
// The logits l = s * dot are rounded (mul_rn, never fused into an FMA) identically in the forward
// and the backward, so where the exact gradient is 0 (one candidate: softmax 1) the kernels give 0.
// Running maxima are clamped to +-FLT_MAX where they are subtracted (shift), so a +inf logit gives
// its row's and column's log-sum-exp +inf, not inf - inf = NaN, and a NaN stays in its own.
//
// Kernels (numbered in launch order; forward() and backward() in launch.cuh run them):
//   F1 targets_kernel   t (N,) and u (M,) from labels (u = the inverse permutation for "both").
//   F2 fwd_tiles_kernel one pass over the 64x64 logits tiles: row statistics in registers, column
//                       statistics merged per stripe of rows into a (stripes, M) buffer (no atomics).
//   F3 colmerge_kernel  col_lse[j]: the stripes merged in a fixed order.
//   F4 pairs_kernel     the positive logits l[i][t_i] (one warp per pair) -> per-row losses (and,
//                       for the block primitive, the target logits themselves).
//   F5 finish_kernel    per-row output and the fixed-order sum (mean / sum).
//   B1 coef_kernel      a_i, c_j from grad_loss and the reduction, and their max |.| (normaliser).
//   B2 bwd_tiles_kernel recomputes the tiles of one side against all tiles of the other and
//                       accumulates d(own rows) = dl @ other (row-parallel for dx, column-parallel
//                       for dy: the same kernel with x and y swapped); per-block ds, db partials.
//   B3 dscale_kernel    ds (a and c terms) and db from the per-block partials in a fixed order.
//   B0 norm_kernel      the normaliser of given coefficients (the block primitive's backward).
// GEMMs: bf16/fp16 through mma.sync m16n8k16 (ldmatrix operands, cp.async double buffering), fp32
// accumulation; fp32 inputs by exact fp32 FMA on the same fragment layout. Every reduction has a
// fixed order, so results are bitwise deterministic.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/portable.cuh"
#include "contrastive/codes.h"

namespace mmfast {
namespace contrastive {

using namespace ::mmfast::port;

constexpr int kThreads = 128;  // 4 warps; warp w owns tile rows 16w..16w+15
constexpr int kBM = 64;        // tile rows (own side)
constexpr int kBN = 64;        // tile columns (other side)
constexpr int kBK = 32;        // feature chunk of the logits GEMM
constexpr int kDC = 64;        // feature chunk of the gradient GEMM
constexpr int kPad = 8;        // smem row padding (keeps ldmatrix rows 16-byte aligned, fewer conflicts)
constexpr int kLdK = kBK + kPad;
constexpr int kLdN = kBN + kPad;
constexpr int kLdC = kDC + kPad;
constexpr int kNT = kBN / 8;                         // n8 tiles per warp
constexpr int kStageElems = 2 * (kBM + kBN) * kLdK;  // two pipeline stages of (P chunk, Q chunk)
constexpr float kNegInf = -INFINITY;

static_assert(kBN == kDC, "the gradient GEMM reuses the n8-tile count of the logits GEMM");
static_assert(2 * kBN * kLdC <= kStageElems, "the gradient GEMM's Q chunks fit in the stage buffers");

// ---- small math helpers -----------------------------------------------------------------------
// a * b rounded to fp32 and never contracted into an FMA with what follows (nvcc fuses by default).
MMFAST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // the emulation builds without FMA contraction
#endif
}

// A running max clamped to +-FLT_MAX: v - shift(m) is never inf - inf or -inf + inf (NaN stays NaN).
MMFAST_DEVICE float shift(float m) { return m != m ? m : fminf(fmaxf(m, -FLT_MAX), FLT_MAX); }

// exp(v - m) against a running max m (-inf while there is no valid entry: then 0).
MMFAST_DEVICE float exp_from(float v, float m) { return expf(v - shift(m)); }

// The rescale e^(m - m') of a running sum when its max grows from m to m'.
MMFAST_DEVICE float rescale(float m, float mn) { return expf(shift(m) - shift(mn)); }

// Online log-sum-exp merge of (m2, s2) into (m, s): s * e^m + s2 * e^m2 = s' * e^m'.
MMFAST_DEVICE void lse_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  s = s * rescale(m, mn) + s2 * rescale(m2, mn);
  m = mn;
}

MMFAST_DEVICE float softplus(float v) { return fmaxf(v, 0.0f) + log1pf(expf(-fabsf(v))); }
MMFAST_DEVICE float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }
MMFAST_HOST_DEVICE int imin(int a, int b) { return a < b ? a : b; }
MMFAST_HOST_DEVICE int imax(int a, int b) { return a > b ? a : b; }

// ---- tile loads: rows [row0, row0 + kRows) x features [k0, k0 + kCols) into shared memory ---------
// Out-of-range rows and features are zero. `vec`: the rows are 16-byte aligned, so 16-byte cp.async
// copies (zero-filled past D) are legal; otherwise plain element loads.
template <class T, int kRows, int kCols>
MMFAST_DEVICE void load_tile(T* dst, int ldd, const T* src, int64_t lds, int row0, int nrows, int k0, int D,
                             bool vec) {
  if (vec) {
    constexpr int kE = 16 / sizeof(T);  // elements per 16-byte copy
    constexpr int kChunks = kRows * kCols / kE;
    for (int c = linear_thread(); c < kChunks; c += kThreads) {
      const int r = c / (kCols / kE), k = (c % (kCols / kE)) * kE;
      const int valid = (row0 + r < nrows) ? imax(0, imin(kE, D - (k0 + k))) : 0;
      const T* from = valid ? src + (int64_t)(row0 + r) * lds + k0 + k : src;
      cp_async_16(dst + r * ldd + k, from, valid * static_cast<int>(sizeof(T)));
    }
  } else {
    for (int e = linear_thread(); e < kRows * kCols; e += kThreads) {
      const int r = e / kCols, k = e % kCols;
      const bool ok = row0 + r < nrows && k0 + k < D;
      dst[r * ldd + k] = ok ? src[(int64_t)(row0 + r) * lds + k0 + k] : from_float<T>(0.0f);
    }
  }
}

// ---- warp GEMM on shared memory: acc[nt] (16 x 8 fp32 C fragments) += A (16 x K) * B (K x 64) -----
// A: 16 rows, row-major [m][k] (lda). B: stored [n][k] (b_kn = false, ldb) or [k][n] (b_kn = true).
// C fragment element c of n-tile nt is (row g + 8 (c / 2), column 8 nt + 2 t + c % 2).
template <class T, int K, bool b_kn>
MMFAST_DEVICE void warp_gemm(float (&acc)[kNT][4], const T* A, int lda, const T* B, int ldb) {
  const int l = lane_id(), g = l >> 2, t = l & 3;
  if constexpr (std::is_same<T, float>::value) {
    // fp32: exact FMAs in the same fragment positions the tensor-core path produces.
    MMFAST_UNROLL
    for (int k = 0; k < K; ++k) {
      const float a0 = A[g * lda + k], a1 = A[(g + 8) * lda + k];
      MMFAST_UNROLL
      for (int nt = 0; nt < kNT; ++nt) {
        const int n = 8 * nt + 2 * t;
        const float b0 = b_kn ? B[k * ldb + n] : B[n * ldb + k];
        const float b1 = b_kn ? B[k * ldb + n + 1] : B[(n + 1) * ldb + k];
        acc[nt][0] = fmaf(a0, b0, acc[nt][0]);
        acc[nt][1] = fmaf(a0, b1, acc[nt][1]);
        acc[nt][2] = fmaf(a1, b0, acc[nt][2]);
        acc[nt][3] = fmaf(a1, b1, acc[nt][3]);
      }
    }
  } else {
    MMFAST_UNROLL
    for (int k0 = 0; k0 < K; k0 += 16) {
      uint32_t a[4];
      ldmatrix_x4(a, A + (l % 16) * lda + k0 + (l / 16) * 8);
      MMFAST_UNROLL
      for (int nt = 0; nt < kNT; nt += 2) {
        // One x4 load gives the B fragments of n-tiles nt and nt + 1: matrices (n-tile, k half).
        uint32_t b[4];
        if constexpr (b_kn) {
          ldmatrix_x4_trans(b, B + (k0 + (l % 8) + ((l / 8) % 2) * 8) * ldb + 8 * nt + (l / 16) * 8);
        } else {
          ldmatrix_x4(b, B + (8 * nt + (l % 8) + (l / 16) * 8) * ldb + k0 + ((l / 8) % 2) * 8);
        }
        const uint32_t b_lo[2] = {b[0], b[1]}, b_hi[2] = {b[2], b[3]};
        mma_m16n8k16<T>(acc[nt], a, b_lo, acc[nt]);
        mma_m16n8k16<T>(acc[nt + 1], a, b_hi, acc[nt + 1]);
      }
    }
  }
}

// dot tile: acc = P[p0 : p0 + 64] @ Q[q0 : q0 + 64]^T over all D features (fp32), this warp's 16
// rows. Double-buffered: the loads of chunk k + 1 overlap the MMAs of chunk k. Ends with a barrier, so
// the stage buffers are free again when it returns.
template <class T>
MMFAST_DEVICE void dot_tile(float (&acc)[kNT][4], const T* P, int64_t ldp, int p0, int np, const T* Q,
                            int64_t ldq, int q0, int nq, int D, bool vec, T* stage) {
  MMFAST_UNROLL
  for (int nt = 0; nt < kNT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
  auto sp = [&](int s) { return stage + s * (kBM + kBN) * kLdK; };
  auto load = [&](int s, int k0) {
    load_tile<T, kBM, kBK>(sp(s), kLdK, P, ldp, p0, np, k0, D, vec);
    load_tile<T, kBN, kBK>(sp(s) + kBM * kLdK, kLdK, Q, ldq, q0, nq, k0, D, vec);
    cp_async_commit();
  };
  const int nk = (D + kBK - 1) / kBK;
  load(0, 0);
  for (int kt = 0; kt < nk; ++kt) {
    if (kt + 1 < nk) {
      load((kt + 1) % 2, (kt + 1) * kBK);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    block_sync();  // chunk kt is in shared memory for every thread
    const T* s = sp(kt % 2);
    warp_gemm<T, kBK, false>(acc, s + 16 * warp_id() * kLdK, kLdK, s + kBM * kLdK, kLdK);
    block_sync();  // everyone is done with stage kt % 2 before it is refilled
  }
}

// Visits this thread's C-fragment elements: fn(nt, c, local_row, local_col).
template <class Fn>
MMFAST_DEVICE void for_each_fragment(Fn&& fn) {
  const int l = lane_id(), r = 16 * warp_id() + (l >> 2), cb = 2 * (l & 3);
  MMFAST_UNROLL
  for (int nt = 0; nt < kNT; ++nt) {
    MMFAST_UNROLL
    for (int c = 0; c < 4; ++c) fn(nt, c, r + 8 * (c / 2), 8 * nt + cb + (c % 2));
  }
}

// ==== F5 / B3: fixed-order sums ====================================================================
// Sum of f(0..n-1) over one block of kThreads: thread k takes k, k + kThreads, ... in order, then a
// fixed tree; every thread returns the total. red: kThreads floats of shared memory.
template <class F>
MMFAST_DEVICE float block_sum(int n, F&& f, float* red) {
  const int tid = linear_thread();
  float acc = 0.0f;
  for (int k = tid; k < n; k += kThreads) acc += f(k);
  red[tid] = acc;
  block_sync();
  for (int w = kThreads / 2; w >= 1; w >>= 1) {
    if (tid < w) red[tid] += red[tid + w];
    block_sync();
  }
  const float total = red[0];
  block_sync();
  return total;
}

}  // namespace contrastive
}  // namespace mmfast
