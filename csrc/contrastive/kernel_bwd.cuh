// Contrastive CUDA kernels: the backward kernels B0-B3 (kernel.cuh has the math, the kernel list and the
// shared tile machinery).
#pragma once

#include "contrastive/kernel.cuh"

namespace mmfast {
namespace contrastive {

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
