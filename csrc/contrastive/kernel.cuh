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

namespace mmfast {
namespace contrastive {

using namespace ::mmfast::port;

enum Loss { kInfoNCE = 0, kSigLIP = 1 };
enum Direction { kBoth = 0, kImage = 1, kText = 2 };
enum Reduction { kMean = 0, kSum = 1, kNone = 2 };

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

// ==== F1: targets ================================================================================
struct TargetParams {
  const int64_t* labels;  // (N,) for image/both, (M,) for text; nullptr = arange
  int N, M, direction;
  int* t;  // N: target text of image i (-1: none)
  int* u;  // M: target image of text j (-1: none)
};

// One block. t_i = labels[i] (image, both) else -1; u_j = labels[j] (text), the inverse of t (both), or -1.
// A label -1 (the block primitive, SigLIP) means no target; t is injective then (checked by the host).
MMFAST_GLOBAL void targets_kernel(TargetParams p) {
  const int tid = linear_thread(), nth = block_dim_x();
  for (int i = tid; i < p.N; i += nth)
    p.t[i] = p.direction == kText ? -1 : static_cast<int>(p.labels ? p.labels[i] : i);
  for (int j = tid; j < p.M; j += nth)
    p.u[j] = p.direction == kText ? static_cast<int>(p.labels ? p.labels[j] : j) : -1;
  if (p.direction == kBoth) {
    block_sync();
    for (int i = tid; i < p.N; i += nth)
      if (p.t[i] >= 0) p.u[p.t[i]] = i;  // t is injective: writes are disjoint
  }
}

// ==== F2: forward tiles ==========================================================================
struct FwdParams {
  const void* x;  // N x D (row stride ldx)
  const void* y;  // M x D (row stride ldy)
  int64_t ldx, ldy;
  int N, M, D;
  const float* scale;  // 0-dim
  const float* bias;   // 0-dim (SigLIP)
  int loss;
  bool vec;
  const int* t;     // N: SigLIP's positive text of each image (-1: none)
  float* row_out;   // N: InfoNCE row_lse; SigLIP per-row loss
  float* col_part;  // InfoNCE: (gridDim.x, M, 2) running (max, sumexp) of each stripe of row tiles
};

constexpr int fwd_smem_bytes(int elem_size) {
  return kStageElems * elem_size + (kBM * (kBN + 4) + 2 * 2 * kBN) * static_cast<int>(sizeof(float));
}

// Grid: one block per stripe; stripe b owns row tiles b, b + gridDim.x, ...
// Per row tile, for every column tile:
//   1. dot tile (64 x 64) by warp GEMMs; l = s dot (+ b).
//   2. InfoNCE: each thread folds its 16 columns into its 2 rows' online (max, sumexp);
//      the tile goes to shared memory, 2 threads per column reduce 32 rows each, and thread j
//      merges the column into this stripe's running (max, sumexp) in col_part (sole owner).
//      SigLIP: each thread sums softplus(-z l) into its 2 rows.
//   3. After the last column tile, the 4 lanes of a row merge their partials; lane t = 0 writes.
template <class T>
MMFAST_GLOBAL void MMFAST_LAUNCH_BOUNDS(kThreads) fwd_tiles_kernel(FwdParams p) {
  T* stage = dynamic_smem<T>();
  float* tile = reinterpret_cast<float*>(stage + kStageElems);  // kBM x (kBN + 4) logits
  float* colred = tile + kBM * (kBN + 4);                       // [2 halves][kBN] x (max, sum)
  constexpr int kLdT = kBN + 4;
  const T* x = static_cast<const T*>(p.x);
  const T* y = static_cast<const T*>(p.y);
  const float s = *p.scale, bias = p.loss == kSigLIP ? *p.bias : 0.0f;
  const int tid = linear_thread();
  float* part = p.col_part + (int64_t)block_x() * p.M * 2;

  for (int rt = block_x(); rt * kBM < p.N; rt += grid_dim_x()) {
    const int i0 = rt * kBM;
    float m[2] = {kNegInf, kNegInf}, acc_row[2] = {0.0f, 0.0f};  // (max, sumexp) or SigLIP sum
    for (int j0 = 0; j0 < p.M; j0 += kBN) {
      float acc[kNT][4];
      dot_tile<T>(acc, x, p.ldx, i0, p.N, y, p.ldy, j0, p.M, p.D, p.vec, stage);
      if (p.loss == kSigLIP) {
        for_each_fragment([&](int nt, int c, int r, int col) {
          const int i = i0 + r, j = j0 + col;
          if (i < p.N && j < p.M) {
            const float z = j == p.t[i] ? 1.0f : -1.0f;
            acc_row[c / 2] += softplus(-z * (s * acc[nt][c] + bias));
          }
        });
        continue;
      }
      // Step 2 (InfoNCE): masked logits, thread-local row update, tile into shared memory.
      float tmax[2] = {kNegInf, kNegInf};
      for_each_fragment([&](int nt, int c, int r, int col) {
        const bool ok = i0 + r < p.N && j0 + col < p.M;
        const float v = ok ? mul_rn(s, acc[nt][c]) : kNegInf;
        acc[nt][c] = v;
        tmax[c / 2] = fmaxf(tmax[c / 2], v);
        tile[r * kLdT + col] = v;
      });
      for (int h = 0; h < 2; ++h) {
        const float mn = fmaxf(m[h], tmax[h]);
        acc_row[h] *= rescale(m[h], mn);
        m[h] = mn;
      }
      for_each_fragment([&](int nt, int c, int, int) { acc_row[c / 2] += exp_from(acc[nt][c], m[c / 2]); });
      block_sync();
      {  // column halves: thread (h, j) reduces rows 32h .. 32h + 31 of column j
        const int j = tid % kBN, h = tid / kBN;
        float cm = kNegInf, cs = 0.0f;
        for (int r = 32 * h; r < 32 * h + 32; ++r) cm = fmaxf(cm, tile[r * kLdT + j]);
        for (int r = 32 * h; r < 32 * h + 32; ++r) cs += exp_from(tile[r * kLdT + j], cm);
        colred[(h * kBN + j) * 2] = cm;
        colred[(h * kBN + j) * 2 + 1] = cs;
      }
      block_sync();
      if (tid < kBN && j0 + tid < p.M) {
        float cm = colred[tid * 2], cs = colred[tid * 2 + 1];
        lse_merge(cm, cs, colred[(kBN + tid) * 2], colred[(kBN + tid) * 2 + 1]);
        float* slot = part + (int64_t)(j0 + tid) * 2;
        if (rt != block_x()) lse_merge(cm, cs, slot[0], slot[1]);  // not this stripe's first tile
        slot[0] = cm;
        slot[1] = cs;
      }
      // The next dot_tile's first barrier orders these reads before the tile is overwritten.
    }
    // Step 3: merge the 4 lanes (t = 0..3) of each row.
    for (int h = 0; h < 2; ++h) {
      for (int off = 1; off <= 2; off <<= 1) {
        const float m2 = shfl_xor(m[h], off), s2 = shfl_xor(acc_row[h], off);
        if (p.loss == kSigLIP) {
          acc_row[h] += s2;
        } else {
          lse_merge(m[h], acc_row[h], m2, s2);
        }
      }
      const int i = i0 + 16 * warp_id() + (lane_id() >> 2) + 8 * h;
      if ((lane_id() & 3) == 0 && i < p.N)
        p.row_out[i] = p.loss == kSigLIP ? acc_row[h] : m[h] + logf(acc_row[h]);
    }
  }
}

// ==== F3: column LSE from the stripes, merged in stripe order ===================================
MMFAST_GLOBAL void colmerge_kernel(const float* col_part, int stripes, int M, float* col_lse) {
  const int j = block_x() * block_dim_x() + thread_x();
  if (j >= M) return;
  float m = kNegInf, s = 0.0f;
  for (int b = 0; b < stripes; ++b)
    lse_merge(m, s, col_part[((int64_t)b * M + j) * 2], col_part[((int64_t)b * M + j) * 2 + 1]);
  col_lse[j] = m + logf(s);
}

// ==== F4: positive pairs -> per-row losses (InfoNCE) =============================================
struct PairParams {
  const void* x;
  const void* y;
  int64_t ldx, ldy;
  int N, M, D, direction;
  const float* scale;
  const int* t;  // N
  const int* u;  // M
  const float* row_lse;
  const float* col_lse;
  float* img_rows;  // N: l_img
  float* txt_rows;  // M: l_txt
  float* target;    // N: l[i][t_i] (0 where t_i = -1), or nullptr
};

// One warp per pair: (i, t_i) for image/both, (u_j, j) for text. pos = s <x_a, y_b> in fp32.
template <class T>
MMFAST_GLOBAL void pairs_kernel(PairParams p) {
  const int pair = block_x() * (block_dim_x() / 32) + warp_id();
  const int npairs = p.direction == kText ? p.M : p.N;
  if (pair >= npairs) return;  // uniform per warp
  const int a = p.direction == kText ? p.u[pair] : pair;
  const int b = p.direction == kText ? pair : p.t[pair];
  if (a < 0 || b < 0) {  // no target in this block (uniform per warp)
    if (p.target != nullptr && lane_id() == 0) p.target[pair] = 0.0f;
    return;
  }
  const T* xa = static_cast<const T*>(p.x) + (int64_t)a * p.ldx;
  const T* yb = static_cast<const T*>(p.y) + (int64_t)b * p.ldy;
  float dot = 0.0f;
  for (int d = lane_id(); d < p.D; d += 32) dot = fmaf(to_float(xa[d]), to_float(yb[d]), dot);
  for (int off = 16; off >= 1; off >>= 1) dot += shfl_xor(dot, off);
  if (lane_id() != 0) return;
  const float pos = mul_rn(*p.scale, dot);
  if (p.target != nullptr) {
    p.target[a] = pos;
    return;
  }
  if (p.direction != kText) p.img_rows[a] = p.row_lse[a] - pos;
  if (p.direction != kImage) p.txt_rows[b] = p.col_lse[b] - pos;
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

struct FinishParams {
  const float* img_rows;  // N (InfoNCE l_img, or SigLIP row losses)
  const float* txt_rows;  // M
  int N, M, loss, direction, reduction;
  float* out;  // reduction none: R rows; else 1
};

// One block. Row r of the output: l_img (image, SigLIP), l_txt (text), (l_img + l_txt) / 2 (both).
MMFAST_GLOBAL void MMFAST_LAUNCH_BOUNDS(kThreads) finish_kernel(FinishParams p) {
  const bool txt_only = p.loss == kInfoNCE && p.direction == kText;
  const bool both = p.loss == kInfoNCE && p.direction == kBoth;
  const int R = txt_only ? p.M : p.N;
  auto row = [&](int r) {
    return both ? 0.5f * (p.img_rows[r] + p.txt_rows[r]) : (txt_only ? p.txt_rows[r] : p.img_rows[r]);
  };
  if (p.reduction == kNone) {
    for (int r = linear_thread(); r < R; r += kThreads) p.out[r] = row(r);
    return;
  }
  const float total = block_sum(R, row, dynamic_smem<float>());
  if (linear_thread() == 0) p.out[0] = p.reduction == kMean ? total / R : total;
}

// ==== B1: coefficients =============================================================================
struct CoefParams {
  const float* grad;  // 1 value, or R values for reduction none
  int N, M, loss, direction, reduction;
  float* a;     // N: dL/dl_img[i] (SigLIP: dL/drow[i])
  float* c;     // M: dL/dl_txt[j] (0 for SigLIP)
  float* norm;  // 1: max(|a|, |c|), or 1 when that is 0 or NaN: the scale of dl stored in 16 bits
};

MMFAST_GLOBAL void MMFAST_LAUNCH_BOUNDS(kThreads) coef_kernel(CoefParams p) {
  const bool txt_only = p.loss == kInfoNCE && p.direction == kText;
  const int R = txt_only ? p.M : p.N;
  const float w = p.loss == kInfoNCE && p.direction == kBoth ? 0.5f : 1.0f;
  auto g = [&](int r) {
    return w * (p.reduction == kNone ? p.grad[r] : (p.reduction == kMean ? p.grad[0] / R : p.grad[0]));
  };
  const bool has_img = p.loss == kSigLIP || p.direction != kText;
  const bool has_txt = p.loss == kInfoNCE && p.direction != kImage;
  float mx = 0.0f;
  for (int i = linear_thread(); i < p.N; i += kThreads) {
    p.a[i] = has_img ? g(i) : 0.0f;
    mx = fmaxf(mx, fabsf(p.a[i]));
  }
  for (int j = linear_thread(); j < p.M; j += kThreads) {
    p.c[j] = has_txt ? g(j) : 0.0f;
    mx = fmaxf(mx, fabsf(p.c[j]));
  }
  float* red = dynamic_smem<float>();
  red[linear_thread()] = mx;
  block_sync();
  if (linear_thread() == 0) {
    for (int k = 1; k < kThreads; ++k) mx = fmaxf(mx, red[k]);
    p.norm[0] = mx > 0.0f && mx < INFINITY ? mx : 1.0f;
  }
}

// One block: norm = max(|a|, |c|) of given coefficients, or 1 when that is 0 or not finite.
MMFAST_GLOBAL void MMFAST_LAUNCH_BOUNDS(kThreads)
    norm_kernel(const float* a, int N, const float* c, int M, float* norm) {
  float mx = 0.0f;
  for (int i = linear_thread(); i < N; i += kThreads) mx = fmaxf(mx, fabsf(a[i]));
  for (int j = linear_thread(); j < M; j += kThreads) mx = fmaxf(mx, fabsf(c[j]));
  float* red = dynamic_smem<float>();
  red[linear_thread()] = mx;
  block_sync();
  if (linear_thread() == 0) {
    for (int k = 1; k < kThreads; ++k) mx = fmaxf(mx, red[k]);
    norm[0] = mx > 0.0f && mx < INFINITY ? mx : 1.0f;
  }
}

// ==== B2: backward tiles ===========================================================================
// The "own" side is the one whose gradient this launch computes (x for dx, y for dy); the logits
// tile is l[own][other] (l^T for dy). Each side brings its lse, coefficient and target:
//   dl[r][k] = a_own[r] (e^(l - lse_own[r]) - [k == tgt_own[r]]) + a_oth[k] (e^(l - lse_oth[k]) - [r ==
//   tgt_oth[k]]) (SigLIP: dl = -(a_own[r] + a_oth[k]) z sigmoid(-z l), z = [k == tgt_own[r]] ? 1 : -1;
//   tgt_oth is then the inverse of tgt_own). InfoNCE's own (other) terms are skipped when own_terms
//   (oth_terms) is false: a direction that is not in the loss has no statistics to read.
struct BwdParams {
  const void* p;  // own rows, np x D (row stride ldp)
  const void* q;  // other rows, nq x D (row stride ldq)
  int64_t ldp, ldq;
  int np, nq, D;
  const float* scale;
  const float* bias;
  const float* norm;  // coef_kernel's normaliser
  int loss;
  bool vec;
  bool own_terms, oth_terms;  // InfoNCE: the own rows' (other rows') softmax terms are in the loss
  const float *lse_own, *lse_oth, *a_own, *a_oth;
  const int *tgt_own, *tgt_oth;
  float* acc32;  // np x D fp32 accumulator of dl @ other / norm, zero on entry
  void* grad;    // np x D output in T (contiguous): s * norm * acc32; nullptr: leave acc32 only
  float* red;    // per block (sum dl_own * dot, sum dl_oth * dot, sum dl), or nullptr
};

constexpr int kRed = 3;  // partials per block of the dx launch

constexpr int bwd_smem_bytes(int elem_size) {
  return (kStageElems + kBM * kLdN) * elem_size + kRed * 4 * static_cast<int>(sizeof(float));
}

// The own side's (a, lse, target) of one row, loaded once per block.
struct OwnRow {
  float a, lse;
  int tgt;
};

// dl for one element (r, k valid), from the dot product, as its own-row and other-row terms.
struct GradParts {
  float own, oth;
};
MMFAST_DEVICE GradParts grad_logit(const BwdParams& p, const OwnRow& own, float s, float bias, float dot,
                                   int r, int k) {
  if (p.loss == kSigLIP) {
    const float z = k == own.tgt ? 1.0f : -1.0f;
    const float sg = z * sigmoid(-z * (s * dot + bias));
    return {-own.a * sg, -p.a_oth[k] * sg};
  }
  // l = s * dot rounded as in the forward (mul_rn), so e^(l - lse) is exactly 1 for a lone candidate.
  const float l = mul_rn(s, dot);
  GradParts g{0.0f, 0.0f};
  if (p.own_terms) g.own = own.a * (expf(l - own.lse) - (k == own.tgt ? 1.0f : 0.0f));
  if (p.oth_terms) g.oth = p.a_oth[k] * (expf(l - p.lse_oth[k]) - (r == p.tgt_oth[k] ? 1.0f : 0.0f));
  return g;
}

// Grid: one block per 64 own rows. For every tile of 64 other rows:
//   1. dot tile, 2. dl (normalised by norm) into shared memory as T,
//   3. acc32[own rows][:] += dl @ Q[other rows][:], kDC features at a time (double-buffered).
// Then 4. grad = T(s * norm * acc32) and 5. the block's (sum dl dot, sum dl) partial.
template <class T>
MMFAST_GLOBAL void MMFAST_LAUNCH_BOUNDS(kThreads) bwd_tiles_kernel(BwdParams p) {
  T* stage = dynamic_smem<T>();
  T* sdl = stage + kStageElems;                             // kBM x kLdN
  float* red = reinterpret_cast<float*>(sdl + kBM * kLdN);  // 4 warps x 2
  const T* P = static_cast<const T*>(p.p);
  const T* Q = static_cast<const T*>(p.q);
  const float s = *p.scale, bias = p.loss == kSigLIP ? *p.bias : 0.0f, inv_norm = 1.0f / *p.norm;
  const int r0 = block_x() * kBM, nd = (p.D + kDC - 1) / kDC;
  float sums[kRed] = {0.0f, 0.0f, 0.0f};  // sum dl_own * dot, sum dl_oth * dot, sum dl
  OwnRow own[2];
  for (int h = 0; h < 2; ++h) {
    const int i = r0 + 16 * warp_id() + (lane_id() >> 2) + 8 * h;
    const bool ok = i < p.np;
    own[h].a = ok ? p.a_own[i] : 0.0f;
    own[h].lse = ok && p.lse_own ? p.lse_own[i] : 0.0f;
    own[h].tgt = ok && p.tgt_own ? p.tgt_own[i] : -1;
  }

  for (int k0 = 0; k0 < p.nq; k0 += kBN) {
    float acc[kNT][4];
    dot_tile<T>(acc, P, p.ldp, r0, p.np, Q, p.ldq, k0, p.nq, p.D, p.vec, stage);
    // Step 2.
    for_each_fragment([&](int nt, int c, int r, int col) {
      const int i = r0 + r, k = k0 + col;
      GradParts g{0.0f, 0.0f};
      if (i < p.np && k < p.nq) g = grad_logit(p, own[c / 2], s, bias, acc[nt][c], i, k);
      const float dl = g.own + g.oth;
      sums[0] += g.own * acc[nt][c];
      sums[1] += g.oth * acc[nt][c];
      sums[2] += dl;
      sdl[r * kLdN + col] = from_float<T>(dl * inv_norm);
    });
    // Step 3: chunk dc of Q into stage buffer dc % 2 while chunk dc - 1 is multiplied.
    auto qc = [&](int b) { return stage + b * kBN * kLdC; };
    load_tile<T, kBN, kDC>(qc(0), kLdC, Q, p.ldq, k0, p.nq, 0, p.D, p.vec);
    cp_async_commit();
    for (int dc = 0; dc < nd; ++dc) {
      if (dc + 1 < nd) {
        load_tile<T, kBN, kDC>(qc((dc + 1) % 2), kLdC, Q, p.ldq, k0, p.nq, (dc + 1) * kDC, p.D, p.vec);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      block_sync();  // chunk dc and (first time) the dl tile are visible
      float g[kNT][4];
      MMFAST_UNROLL
      for (int nt = 0; nt < kNT; ++nt) g[nt][0] = g[nt][1] = g[nt][2] = g[nt][3] = 0.0f;
      warp_gemm<T, kBN, true>(g, sdl + 16 * warp_id() * kLdN, kLdN, qc(dc % 2), kLdC);
      for_each_fragment([&](int nt, int c, int r, int col) {
        const int i = r0 + r, d = dc * kDC + col;
        if (i < p.np && d < p.D) p.acc32[(int64_t)i * p.D + d] += g[nt][c];  // this thread's own element
      });
      block_sync();  // buffer dc % 2 and (last time) the dl tile are free
    }
  }
  // Step 4: acc32 rows were written by other threads of this block: the last barrier orders them.
  if (p.grad != nullptr) {
    T* out = static_cast<T*>(p.grad);
    const float f = s * *p.norm;
    for (int e = linear_thread(); e < kBM * p.D; e += kThreads) {
      const int i = r0 + e / p.D;
      if (i < p.np) out[(int64_t)r0 * p.D + e] = from_float<T>(f * p.acc32[(int64_t)r0 * p.D + e]);
    }
  }
  // Step 5: block partials (sums), warps then a fixed order over warps.
  if (p.red == nullptr) return;
  for (int q = 0; q < kRed; ++q) {
    for (int off = 16; off >= 1; off >>= 1) sums[q] += shfl_xor(sums[q], off);
    if (lane_id() == 0) red[kRed * warp_id() + q] = sums[q];
  }
  block_sync();
  if (linear_thread() == 0) {
    for (int q = 0; q < kRed; ++q) {
      float t = 0.0f;
      for (int w = 0; w < kThreads / 32; ++w) t += red[kRed * w + q];
      p.red[kRed * block_x() + q] = t;
    }
  }
}

// ==== B3: d(scale), d(bias) from the per-block partials ============================================
// parts[0], parts[1]: the own (row) and other (column) terms of d(scale); dscale (optional) their sum.
MMFAST_GLOBAL void MMFAST_LAUNCH_BOUNDS(kThreads)
    dscale_kernel(const float* red, int blocks, float* parts, float* dscale, float* dbias) {
  float* sm = dynamic_smem<float>();
  const float a = block_sum(blocks, [&](int b) { return red[kRed * b]; }, sm);
  const float c = block_sum(blocks, [&](int b) { return red[kRed * b + 1]; }, sm);
  const float d = block_sum(blocks, [&](int b) { return red[kRed * b + 2]; }, sm);
  if (linear_thread() == 0) {
    parts[0] = a;
    parts[1] = c;
    if (dscale != nullptr) *dscale = a + c;
    *dbias = d;
  }
}

}  // namespace contrastive
}  // namespace mmfast
