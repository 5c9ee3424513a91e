// Helpers shared by the two fast paths of the CPU cross-attention (cpu_fast.cpp: fp32,
// cpu_fast_bf16.cpp: bf16): the transposed block layout, its masking and softmax, and the task
// schedule.
//
// Layout: a block of Mb query rows is kept transposed, S^T (keys x Mb lanes), so the softmax over
// keys runs down the columns with the block's rows across the SIMD lanes (no horizontal
// reductions). With AVX-512 and Mb a multiple of 16 the scores are kept in log2 units (the S^T
// product is scaled by log2 e) and the exponentials are base 2 (cpu::exp_f32x16<true>).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "common/cpu_exp.h"
#include "cross_attention/cpu.h"

namespace mmfast::cross_attention {

constexpr int64_t kMaxFastKeys = 16384;  // S^T and dP^T of a block: 2 x Lk x 32 floats per thread
using cpu::kLog2e;

// Runs body(scratch, t) for t in [0, n) on at::get_num_threads() workers, each with its own
// scratch = init(). Dynamic: each worker takes the next task from an atomic counter, so a worker
// whose core is shared with another process takes fewer tasks (static chunks wait for the slowest
// core), and tasks of unequal cost (padding, causal) balance themselves.
template <class Init, class Body>
void parallel_tasks(int64_t n, Init init, Body body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    if (w0 >= w1) return;
    auto scratch = init();
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < n;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      body(scratch, t);
    }
  });
}

// Query rows per block. Forward: 32, halved (down to 8) while there are fewer than 4 tasks per
// thread. Backward (tasks are (b, kv head)): Lq rounded up to 8 lanes, at most 32.
int64_t fast_forward_block_rows(int64_t B, int64_t Hq, int64_t Lq);
int64_t fast_backward_block_rows(int64_t Lq);

// Whether the softmax of a block of Mb lanes runs base 2 on AVX-512 (scores in log2 units).
inline bool softmax_base2(int64_t Mb, bool avx512) { return avx512 && Mb % 16 == 0; }

// Rows = query block of the transposed layout: x^T[d, r] = x[i0 + r, d], zero beyond `rows`.
void transpose_block(const float* x, int64_t ldx, int64_t rows, int64_t cols, int64_t Mb, float* xt);

// Per batch item: whether no key inside its span [kv_lo, kv_hi) is padded and no causal limit
// applies, so mask_transposed has nothing to do for it (trailing padding is outside the span).
std::vector<char> unmasked_spans(const Masking& mk, int64_t B);

// S^T row jj (key lo + jj) = -inf where padded or, causal, for the lanes r whose row i0 + r may not
// see it (j > i + Lk - Lq).
void mask_transposed(const Masking& mk, int64_t b, int64_t i0, int64_t Mb, int64_t lo, int64_t cols,
                     float* st);

// Softmax down the columns of a transposed block st (cols x Mb): per lane r, m = max_j s,
// st = p = exp(s - m), l = sum_j p. base2 (softmax_base2): 2^ in log2 units, all lanes of a row at
// once; otherwise e^, 8 AVX2 lanes at a time. A lane with no allowed key: m = -inf, l = 0.
void softmax_cols(float* st, int64_t cols, int64_t Mb, bool base2, float* m, float* l);

}  // namespace mmfast::cross_attention
