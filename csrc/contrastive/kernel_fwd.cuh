// Contrastive CUDA kernels: the forward kernels F1-F5 (kernel.cuh has the math, the kernel list and the
// shared tile machinery).
#pragma once

#include "contrastive/kernel.cuh"

namespace mmfast {
namespace contrastive {

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

}  // namespace contrastive
}  // namespace mmfast
