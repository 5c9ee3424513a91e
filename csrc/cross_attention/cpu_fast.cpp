// Fast path of the CPU cross-attention for fp32 without attn_mask or dropout (key padding and causal
// allowed), on mmfast's own register tiles (common/cpu_gemm_f32.h: AVX-512 8 x 32, or AVX2 6 x 16)
// instead of MKL calls.
//
// Why: for a block of 32 query rows every GEMM of attention has one dimension of 32 or 64, where
// MKL's packing per call leaves it at 40-60% of its large-GEMM rate. Here the block is kept
// transposed (cpu_fast.h), and every product is one shape, C = alpha A B (+ C), with B row-major
// and A read one broadcast scalar at a time:
//   forward:  S^T = scale K Q^T,  P^T = exp(S^T - m) / l per lane,  O = P V (A = P^T by columns)
//   backward: P^T = exp(S^T - lse),  dP^T = V dO^T,  dv += P^T dO,  dS^T = P^T (dP^T - D),
//             dk += scale dS^T Q,  dq^T = scale K^T dS^T
#include "cross_attention/cpu_fast.h"

#include <immintrin.h>

#include <cmath>
#include <limits>

#include "common/cpu_gemm_f32.h"
#include "common/cpu_isa.h"

namespace mmfast::cross_attention {

int64_t fast_forward_block_rows(int64_t B, int64_t Hq, int64_t Lq) {
  int64_t Mb = 32;
  while (Mb > 8 && B * Hq * ((Lq + Mb - 1) / Mb) < 4 * at::get_num_threads()) Mb /= 2;
  return Mb;
}
int64_t fast_backward_block_rows(int64_t Lq) { return std::min<int64_t>(32, (Lq + 7) / 8 * 8); }

void transpose_block(const float* x, int64_t ldx, int64_t rows, int64_t cols, int64_t Mb, float* xt) {
  for (int64_t d = 0; d < cols; ++d) {
    float* dst = xt + d * Mb;
    for (int64_t r = 0; r < rows; ++r) dst[r] = x[r * ldx + d];
    for (int64_t r = rows; r < Mb; ++r) dst[r] = 0.f;
  }
}

std::vector<char> unmasked_spans(const Masking& mk, int64_t B) {
  std::vector<char> unmasked(B, !mk.causal);
  for (int64_t b = 0; b < B && mk.kpm != nullptr && !mk.causal; ++b) {
    for (int64_t j = mk.kv_lo[b]; j < mk.kv_hi[b] && unmasked[b]; ++j) {
      if (mk.kpm[b * mk.kpm_sb + j * mk.kpm_sj]) unmasked[b] = 0;
    }
  }
  return unmasked;
}

void mask_transposed(const Masking& mk, int64_t b, int64_t i0, int64_t Mb, int64_t lo, int64_t cols,
                     float* st) {
  if (mk.kpm == nullptr && !mk.causal) return;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t jj = 0; jj < cols; ++jj) {
    const int64_t j = lo + jj;
    float* row = st + jj * Mb;
    if (mk.kpm && mk.kpm[b * mk.kpm_sb + j * mk.kpm_sj]) {
      std::fill(row, row + Mb, kNegInf);
    } else if (mk.causal) {
      const int64_t first_ok = std::min<int64_t>(std::max<int64_t>(j - (mk.Lk - mk.Lq) - i0, 0), Mb);
      std::fill(row, row + first_ok, kNegInf);
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)

namespace {

// Row-major C[M x N] (ldc) = alpha sum_k A(m, k) B[k, :] (+ C with accumulate; stream: the final
// write of an output, see cpu::StoreC), A(m, k) = a[m * sm + k * sk], N a multiple of 8: the
// AVX-512 tiles where chosen and N is a multiple of 16, the AVX2 tiles otherwise.
void small_gemm(bool avx512, int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t sm,
                int64_t sk, const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate = false,
                bool stream = false) {
  if (avx512 && N % 16 == 0) {
    return cpu::gemm_f32(M, N, K, alpha, a, sm, sk, b, ldb, cpu::kF32Cols, c, ldc, accumulate, stream);
  }
  cpu::gemm_f32_avx2(M, N, K, alpha, a, sm, sk, b, ldb, c, ldc, accumulate, stream);
}

// Forward softmax of a transposed block with AVX-512 (Mb = 16 NV lanes, scores in log2 units: the
// S^T GEMM was scaled by log2 e): m = max_j s, p = 2^(s - m) in place, l = sum_j p. One pass over
// the rows for the max and one for the exponentials, all lanes of a row at once.
template <int NV>
__attribute__((target("avx512f"))) void softmax_cols_z(float* st, int64_t cols, float* m, float* l) {
  constexpr int Mb = 16 * NV;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 mx[NV], sum[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) mx[v] = ninf, sum[v] = _mm512_setzero_ps();
  for (int64_t jj = 0; jj < cols; ++jj) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) mx[v] = _mm512_max_ps(mx[v], _mm512_loadu_ps(st + jj * Mb + 16 * v));
  }
  __m512 mu[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) {  // all masked: subtract 0, p = 2^-inf = 0
    mu[v] = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mx[v], ninf, _CMP_EQ_OQ), mx[v], _mm512_setzero_ps());
  }
  for (int64_t jj = 0; jj < cols; ++jj) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* sp = st + jj * Mb + 16 * v;
      const __m512 e = cpu::exp_f32x16<true>(_mm512_sub_ps(_mm512_loadu_ps(sp), mu[v]));
      _mm512_storeu_ps(sp, e);
      sum[v] = _mm512_add_ps(sum[v], e);
    }
  }
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) _mm512_storeu_ps(m + 16 * v, mx[v]), _mm512_storeu_ps(l + 16 * v, sum[v]);
}

// Backward: P^T = 2^(S^T - lse2) in place (log2 units; lse2 = +inf on padding lanes gives 0).
template <int NV>
__attribute__((target("avx512f"))) void exp_cols_z(float* pt, int64_t cols, const float* lse2) {
  constexpr int Mb = 16 * NV;
  __m512 vl[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) vl[v] = _mm512_loadu_ps(lse2 + 16 * v);
  for (int64_t jj = 0; jj < cols; ++jj) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* sp = pt + jj * Mb + 16 * v;
      _mm512_storeu_ps(sp, cpu::exp_f32x16<true>(_mm512_sub_ps(_mm512_loadu_ps(sp), vl[v])));
    }
  }
}

}  // namespace

void softmax_cols(float* st, int64_t cols, int64_t Mb, bool z, float* m, float* l) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (z && Mb == 32) return softmax_cols_z<2>(st, cols, m, l);
  if (z) return softmax_cols_z<1>(st, cols, m, l);
  for (int64_t v8 = 0; v8 < Mb; v8 += 8) {
    __m256 mx = _mm256_set1_ps(kNegInf);
    for (int64_t jj = 0; jj < cols; ++jj) mx = _mm256_max_ps(mx, _mm256_loadu_ps(&st[jj * Mb + v8]));
    const __m256 none = _mm256_cmp_ps(mx, _mm256_set1_ps(kNegInf), _CMP_EQ_OQ);
    const __m256 mu = _mm256_andnot_ps(none, mx);  // all masked: subtract 0, p = exp(-inf) = 0
    __m256 sum = _mm256_setzero_ps();
    for (int64_t jj = 0; jj < cols; ++jj) {
      float* sp = &st[jj * Mb + v8];
      const __m256 e = cpu::fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(sp), mu));
      _mm256_storeu_ps(sp, e);
      sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(&m[v8], mx);
    _mm256_storeu_ps(&l[v8], sum);
  }
}

// Forward, one task per (b, h, block of Mb query rows; Mb in {8, 16, 32}).
void forward_fast(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Masking& mk,
                  double scale_d, at::Tensor& out, at::Tensor& lse) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3), group = Hq / Hkv;
  const View4<float> Q = view4<float>(q), K = view4<float>(k), V = view4<float>(v), O = view4<float>(out);
  float* lse_p = lse.data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  const int64_t Mb = fast_forward_block_rows(B, Hq, Lq), nqb = (Lq + Mb - 1) / Mb;
  const bool avx512 = cpu::gemm_for(at::kFloat) == cpu::Gemm::kAvx512;
  const bool z = softmax_base2(Mb, avx512);
  const float lg = z ? kLog2e : 1.f;  // scores in log2 units for the base-2 softmax
  // Batch items whose key span [kv_lo, kv_hi) holds no padded key (e.g. trailing padding only):
  // without causal masking their blocks need no mask pass.
  const std::vector<char> unmasked = unmasked_spans(mk, B);

  struct Scratch {
    std::vector<float> qt, st, m, l;
  };
  auto init = [&] {
    return Scratch{std::vector<float>(D * Mb), std::vector<float>(std::max<int64_t>(Lk, 1) * Mb),
                   std::vector<float>(Mb), std::vector<float>(Mb)};
  };
  parallel_tasks(B * Hq * nqb, init, [&](Scratch& w, int64_t t) {
    std::vector<float>&qt = w.qt, &st = w.st, &m = w.m, &l = w.l;
    {
      const int64_t b = t / (Hq * nqb), h = (t / nqb) % Hq, i0 = (t % nqb) * Mb, g = h / group;
      const int64_t rows = std::min(Mb, Lq - i0);
      auto [lo, hi] = mk.key_range(b, i0, i0 + rows);
      const int64_t cols = std::max<int64_t>(hi - lo, 0);
      // 1. Q^T, 2. S^T = scale K Q^T, masks.
      transpose_block(Q.row(b, h, i0), Q.sl, rows, D, Mb, qt.data());
      small_gemm(avx512, cols, Mb, D, scale * lg, K.row(b, g, lo), K.sl, 1, qt.data(), Mb, st.data(), Mb);
      if (!unmasked[b]) mask_transposed(mk, b, i0, Mb, lo, cols, st.data());
      // 3. Softmax down the columns: m = max_j s, p = exp(s - m), l = sum_j p.
      softmax_cols(st.data(), cols, Mb, z, m.data(), l.data());
      // 4. O = P V straight into the output rows (A = P^T read by columns: the same loads as
      // O^T = V^T P^T, without the transposed write-back), 5. out = O / l, lse = m + log l; rows
      // without an allowed key: 0, -inf.
      small_gemm(avx512, rows, Dv, cols, 1.f, st.data(), 1, Mb, V.row(b, g, lo), V.sl, O.row(b, h, i0), O.sl);
      for (int64_t r = 0; r < rows; ++r) {
        const bool empty = l[r] == 0.f;  // l = NaN (a NaN or +inf score): out and lse NaN
        const float inv = empty ? 0.f : 1.f / l[r];
        float* orow = O.row(b, h, i0 + r);
        for (int64_t d = 0; d < Dv; ++d) orow[d] *= inv;
        lse_p[(b * Hq + h) * Lq + i0 + r] = empty ? kNegInf : m[r] / lg + std::log(l[r]);
      }
    }
  });
}

namespace {

// Shapes and views shared by every task of one fast backward call.
struct FastArgs : BackwardInputs<float, float> {
  View4<float> dK, dV;  // fp32 outputs: the (b, g) task accumulates into them directly
  bool avx512;          // AVX-512 tiles (else AVX2)
  bool z;               // AVX-512 base-2 exponentials (softmax_base2)
  float lg;             // log2 e with z (S^T and lse in log2 units), else 1
};

// Per-thread buffers of the fast backward (transposed blocks).
struct FastBackwardScratch {
  FastBackwardScratch(int64_t Mb, int64_t D, int64_t Dv, int64_t Lk)
      : qt(D * Mb),
        dot(Dv * Mb),
        pt(std::max<int64_t>(Lk, 1) * Mb),
        dpt(std::max<int64_t>(Lk, 1) * Mb),
        dqt(D * Mb),
        di(Mb),
        lse(Mb) {}
  std::vector<float> qt, dot, pt, dpt, dqt, di, lse;
};

// Rows [j0, j1) of a row-major matrix with n columns (row stride ld, n a multiple of 8) = 0;
// non-temporal stores where aligned (the output lines are not read again by this task).
void zero_rows(float* x, int64_t ld, int64_t j0, int64_t j1, int64_t n) {
  const bool stream = (reinterpret_cast<uintptr_t>(x) | (ld * 4)) % 32 == 0;
  for (int64_t j = j0; j < j1; ++j) {
    float* row = x + j * ld;
    if (stream) {
      for (int64_t d = 0; d < n; d += 8) _mm256_stream_ps(row + d, _mm256_setzero_ps());
    } else {
      std::fill(row, row + n, 0.f);
    }
  }
}

// Steps 1-7 of the backward for rows [i0, i0 + rows) of head h (kv head g), all allowed keys. The
// task's first block writes dk, dv of head g (zeros outside its keys), later blocks add to them;
// the last one writes them with non-temporal stores.
void backward_fast_block(const FastArgs& a, FastBackwardScratch& w, int64_t b, int64_t h, int64_t g,
                         int64_t i0, int64_t rows, const View4<float>& dQ, bool first, bool last) {
  const int64_t Mb = a.Mb, D = a.D, Dv = a.Dv;
  const float* q = a.Q.row(b, h, i0);
  const float* d_o = a.dO.row(b, h, i0);
  // 1. Q^T, dO^T; D_i = <do_i, o_i> - dlse_i; per-lane lse, +inf for padding lanes and empty rows (p = 0).
  transpose_block(q, a.Q.sl, rows, D, Mb, w.qt.data());
  transpose_block(d_o, a.dO.sl, rows, Dv, Mb, w.dot.data());
  for (int64_t r = 0; r < Mb; ++r) {
    float di = 0.f, l = std::numeric_limits<float>::infinity();
    if (r < rows) {
      const float* o = a.O.row(b, h, i0 + r);
      for (int64_t d = 0; d < Dv; ++d) di += d_o[r * a.dO.sl + d] * o[d];
      if (a.dlse) di -= a.dlse[(b * a.Hq + h) * a.Lq + i0 + r];
      const float x = a.lse[(b * a.Hq + h) * a.Lq + i0 + r];
      if (x != -std::numeric_limits<float>::infinity()) l = x * a.lg;
    }
    w.di[r] = di, w.lse[r] = l;
  }
  auto [lo, hi] = a.mk.key_range(b, i0, i0 + rows);
  const int64_t cols = std::max<int64_t>(hi - lo, 0);
  const float* kb = a.K.row(b, g, lo);
  float* dk = a.dK.row(b, g, 0);
  float* dv = a.dV.row(b, g, 0);
  if (first) {
    zero_rows(dk, a.dK.sl, 0, lo, D), zero_rows(dk, a.dK.sl, lo + cols, a.Lk, D);
    zero_rows(dv, a.dV.sl, 0, lo, Dv), zero_rows(dv, a.dV.sl, lo + cols, a.Lk, Dv);
  }
  // 2. P^T = exp(scale K Q^T + masks - lse), 3. dP^T = V dO^T.
  small_gemm(a.avx512, cols, Mb, D, a.scale * a.lg, kb, a.K.sl, 1, w.qt.data(), Mb, w.pt.data(), Mb);
  mask_transposed(a.mk, b, i0, Mb, lo, cols, w.pt.data());
  small_gemm(a.avx512, cols, Mb, Dv, 1.f, a.V.row(b, g, lo), a.V.sl, 1, w.dot.data(), Mb, w.dpt.data(), Mb);
  if (a.z && Mb == 32) {
    exp_cols_z<2>(w.pt.data(), cols, w.lse.data());
  } else if (a.z) {
    exp_cols_z<1>(w.pt.data(), cols, w.lse.data());
  }
  for (int64_t v8 = 0; v8 < Mb && !a.z; v8 += 8) {
    const __m256 vl = _mm256_loadu_ps(&w.lse[v8]);
    for (int64_t jj = 0; jj < cols; ++jj) {
      float* sp = &w.pt[jj * Mb + v8];
      _mm256_storeu_ps(sp, cpu::fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(sp), vl)));
    }
  }
  // 4. dv += P^T dO, 5. dS^T = P^T (dP^T - D) in place.
  small_gemm(a.avx512, cols, Dv, rows, 1.f, w.pt.data(), Mb, 1, d_o, a.dO.sl, dv + lo * a.dV.sl, a.dV.sl,
             !first, last);
  for (int64_t v8 = 0; v8 < Mb; v8 += 8) {
    const __m256 vd = _mm256_loadu_ps(&w.di[v8]);
    for (int64_t jj = 0; jj < cols; ++jj) {
      float* sp = &w.pt[jj * Mb + v8];
      const __m256 dp = _mm256_sub_ps(_mm256_loadu_ps(&w.dpt[jj * Mb + v8]), vd);
      _mm256_storeu_ps(sp, _mm256_mul_ps(_mm256_loadu_ps(sp), dp));
    }
  }
  // 6. dk += scale dS^T Q, 7. dq^T = scale K^T dS^T, written back transposed.
  small_gemm(a.avx512, cols, D, rows, a.scale, w.pt.data(), Mb, 1, q, a.Q.sl, dk + lo * a.dK.sl, a.dK.sl,
             !first, last);
  small_gemm(a.avx512, D, Mb, cols, a.scale, kb, 1, a.K.sl, w.pt.data(), Mb, w.dqt.data(), Mb);
  for (int64_t r = 0; r < rows; ++r) {
    float* dqrow = dQ.row(b, h, i0 + r);
    for (int64_t d = 0; d < D; ++d) dqrow[d] = w.dqt[d * Mb + r];
  }
}

}  // namespace

// Backward, one task per (b, g) as in the generic kernel (the task owns dk, dv of its kv head).
void backward_fast(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dlse, const Masking& mk,
                   double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3), group = Hq / Hkv;
  const int64_t Mb = fast_backward_block_rows(Lq);
  const bool avx512 = cpu::gemm_for(at::kFloat) == cpu::Gemm::kAvx512;
  const bool z = softmax_base2(Mb, avx512);
  const FastArgs a{backward_inputs<float, float>(dout, q, k, v, out, lse, dlse, mk, scale, Mb),
                   view4<float>(dk),
                   view4<float>(dv),
                   avx512,
                   z,
                   z ? kLog2e : 1.f};
  const View4<float> dQ = view4<float>(dq);
  auto init = [&] { return FastBackwardScratch(Mb, D, Dv, Lk); };
  parallel_tasks(B * Hkv, init, [&](FastBackwardScratch& w, int64_t t) {
    {
      const int64_t b = t / Hkv, g = t % Hkv;
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < Lq; i0 += Mb) {
          const bool first = h == g * group && i0 == 0, last = h == (g + 1) * group - 1 && i0 + Mb >= Lq;
          backward_fast_block(a, w, b, h, g, i0, std::min(Mb, Lq - i0), dQ, first, last);
        }
      }
      _mm_sfence();  // the non-temporal stores of dk, dv are visible before the task counts as done
    }
  });
}

// Whether the fp32 fast path takes these inputs: its tile path (avx512 or avx2) is the one chosen for
// fp32 (mmfast.cpu_options(gemm=...); "blas" runs the generic kernel on MKL), no attn_mask or
// dropout, head dims multiples of 8.
bool fast_path_ok(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                  double dropout_p) {
  if (q.scalar_type() != at::kFloat) return false;
  const cpu::Gemm g = cpu::gemm_for(at::kFloat);
  if (g != cpu::Gemm::kAvx512 && g != cpu::Gemm::kAvx2) return false;
  return !mask.defined() && dropout_p == 0.0 && q.size(3) % 8 == 0 && v.size(3) % 8 == 0 && q.size(3) > 0 &&
         v.size(3) > 0 && q.size(2) > 0 && k.size(2) > 0 && k.size(2) <= kMaxFastKeys;
}

#else  // built without AVX2: the generic kernel runs everything

bool fast_path_ok(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double) {
  return false;
}
void softmax_cols(float*, int64_t, int64_t, bool, float*, float*) {}
void forward_fast(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Masking&, double,
                  at::Tensor&, at::Tensor&) {}
void backward_fast(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const Masking&, double,
                   at::Tensor&, at::Tensor&, at::Tensor&) {}

#endif

}  // namespace mmfast::cross_attention
