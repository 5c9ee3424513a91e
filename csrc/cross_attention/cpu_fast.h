// Fast path of the CPU cross-attention for fp32 without attn_mask or dropout (key padding and causal
// allowed), with its own small AVX2 GEMM instead of MKL calls (included by cpu.cpp, after the
// helpers and the generic kernels).
//
// Why: for a block of 32 query rows every GEMM of attention has one dimension of 32 or 64, where
// MKL's packing per call leaves it at 40-60% of its large-GEMM rate. Here the block is kept
// transposed: S^T (keys x rows) = scale K Q^T, so the softmax over keys runs down the columns with
// the block's rows across the SIMD lanes (no horizontal reductions), and every product is one
// shape, C = alpha A B (+ C), with B row-major and A read one broadcast scalar at a time:
//   forward:  S^T = scale K Q^T,  P^T = exp(S^T - m) / l per lane,  O = P V (A = P^T by columns)
//   backward: P^T = exp(S^T - lse),  dP^T = V dO^T,  dv += P^T dO,  dS^T = P^T (dP^T - D),
//             dk += scale dS^T Q,  dq^T = scale K^T dS^T
#pragma once

namespace mmfast::xattn {
namespace {

#if defined(__AVX2__) && defined(__FMA__)

// Epilogue flags of the tiles: kAccumulate adds the old C; kStream writes C with non-temporal
// stores where the tile's rows are aligned (the final write of dk, dv: no read-for-ownership of the
// output lines, no eviction of the working set; the task ends with an sfence).
constexpr int kAccumulate = 1, kStream = 2;

// One MR x (8 NV) tile of C = alpha A B (+ C when accumulate); A(m, k) = a[m * sm + k * sk].
// MR * NV accumulators + NV B vectors + 1 broadcast fit the 16 ymm registers for (6, 2).
template <int MR, int NV>
inline void gemm_tile(int64_t K, float alpha, const float* a, int64_t sm, int64_t sk, const float* b,
                      int64_t ldb, float* c, int64_t ldc, int flags) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 bv[NV];
    const float* bk = b + k * ldb;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(bk + 8 * v);
    const float* ak = a + k * sk;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(ak + r * sm);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
  const bool stream = (flags & kStream) && ((reinterpret_cast<uintptr_t>(c) | (ldc * 4)) % 32 == 0);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + 8 * v;
      __m256 x = _mm256_mul_ps(acc[r][v], va);
      if (flags & kAccumulate) x = _mm256_add_ps(x, _mm256_loadu_ps(cp));
      if (stream) {
        _mm256_stream_ps(cp, x);
      } else {
        _mm256_storeu_ps(cp, x);
      }
    }
  }
}

// Rows [m, m + rows) (rows < 6) of one column panel.
template <int NV>
inline void gemm_tail(int64_t rows, int64_t K, float alpha, const float* a, int64_t sm, int64_t sk,
                      const float* b, int64_t ldb, float* c, int64_t ldc, int flags) {
  switch (rows) {
    case 5:
      return gemm_tile<5, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
    case 4:
      return gemm_tile<4, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
    case 3:
      return gemm_tile<3, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
    case 2:
      return gemm_tile<2, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
    case 1:
      return gemm_tile<1, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
    default:
      return;
  }
}

// The same tile with AVX-512 (runtime-checked): 32 registers, so 8 rows x 32 columns (16 zmm
// accumulators). Zen 4 runs a 512-bit FMA as two 256-bit halves: the gain is fewer instructions,
// loads and broadcasts per FLOP, not wider units.
template <int MR, int NV>
__attribute__((target("avx512f"))) void gemm_tile_z(int64_t K, float alpha, const float* a, int64_t sm,
                                                    int64_t sk, const float* b, int64_t ldb, float* c,
                                                    int64_t ldc, int flags) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + k * ldb + 16 * v);
    const float* ak = a + k * sk;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(ak[r * sm]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  const bool stream = (flags & kStream) && ((reinterpret_cast<uintptr_t>(c) | (ldc * 4)) % 64 == 0);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + 16 * v;
      __m512 x = _mm512_mul_ps(acc[r][v], va);
      if (flags & kAccumulate) x = _mm512_add_ps(x, _mm512_loadu_ps(cp));
      if (stream) {
        _mm512_stream_ps(cp, x);
      } else {
        _mm512_storeu_ps(cp, x);
      }
    }
  }
}

template <int NV>
__attribute__((target("avx512f"))) void gemm_rows_z(int64_t rows, int64_t K, float alpha, const float* a,
                                                    int64_t sm, int64_t sk, const float* b, int64_t ldb,
                                                    float* c, int64_t ldc, int flags) {
  switch (rows) {
    case 8:
      return gemm_tile_z<8, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
    case 7:
      return gemm_tile_z<7, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
    case 6:
      return gemm_tile_z<6, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
    case 5:
      return gemm_tile_z<5, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
    case 4:
      return gemm_tile_z<4, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
    case 3:
      return gemm_tile_z<3, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
    case 2:
      return gemm_tile_z<2, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
    case 1:
      return gemm_tile_z<1, NV>(K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
    default:
      return;
  }
}

// small_gemm with AVX-512 tiles; N a multiple of 16.
__attribute__((target("avx512f"))) void small_gemm_z(int64_t M, int64_t N, int64_t K, float alpha,
                                                     const float* a, int64_t sm, int64_t sk, const float* b,
                                                     int64_t ldb, float* c, int64_t ldc, int flags) {
  for (int64_t m = 0; m < M; m += 8) {
    const int64_t rows = std::min<int64_t>(8, M - m);
    for (int64_t n = 0; n < N; n += 32) {
      if (N - n >= 32) {
        gemm_rows_z<2>(rows, K, alpha, a + m * sm, sm, sk, b + n, ldb, c + m * ldc + n, ldc, flags);
      } else {
        gemm_rows_z<1>(rows, K, alpha, a + m * sm, sm, sk, b + n, ldb, c + m * ldc + n, ldc, flags);
      }
    }
  }
}

// Whether small_gemm uses the AVX-512 tiles (and the softmax the AVX-512 exp2): set per op call by
// fast_path_ok / fast_bf16_ok from the tile-product path (mmfast.cpu_options, common/cpu_isa.h).
std::atomic<bool> g_use_avx512{false};

// Row-major C[M x N] (ldc) = alpha sum_k A(m, k) B[k, :] (+ C with kAccumulate; kStream: see the
// tiles), N a multiple of 8.
// Tiles of 6 rows x 16 columns; the 6 rows of A stay in L1 while the tile walks across N.
void small_gemm(int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t sm, int64_t sk,
                const float* b, int64_t ldb, float* c, int64_t ldc, int flags) {
  if (N % 16 == 0 && g_use_avx512.load(std::memory_order_relaxed)) {
    return small_gemm_z(M, N, K, alpha, a, sm, sk, b, ldb, c, ldc, flags);
  }
  for (int64_t m = 0; m < M; m += 6) {
    const int64_t rows = std::min<int64_t>(6, M - m);
    const float* am = a + m * sm;
    float* cm = c + m * ldc;
    for (int64_t n = 0; n < N; n += 16) {
      if (N - n >= 16) {
        if (rows == 6) {
          gemm_tile<6, 2>(K, alpha, am, sm, sk, b + n, ldb, cm + n, ldc, flags);
        } else {
          gemm_tail<2>(rows, K, alpha, am, sm, sk, b + n, ldb, cm + n, ldc, flags);
        }
      } else {  // 8 columns left
        if (rows == 6) {
          gemm_tile<6, 1>(K, alpha, am, sm, sk, b + n, ldb, cm + n, ldc, flags);
        } else {
          gemm_tail<1>(rows, K, alpha, am, sm, sk, b + n, ldb, cm + n, ldc, flags);
        }
      }
    }
  }
}

// 2^x for 16 lanes with AVX-512: n = round(x), r = x - n in [-1/2, 1/2], 2^r by its degree-6
// Taylor polynomial (relative error < 2e-7), then vscalefps multiplies by 2^n (no exponent-bit
// arithmetic, underflow to 0 handled by the instruction). x = -inf (masked) gives 0 through the
// clamp at -160; NaN stays NaN (a NaN score must reach its row's output). 12 instructions per 16 lanes
// against 18 per 8 for fast_exp8.
__attribute__((target("avx512f"))) inline __m512 exp2_z(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-160.f), x);  // this operand order keeps a NaN lane NaN
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);                  // ln2^6 / 720
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3333558146428443e-3f));  // ln2^5 / 120
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6181291076284772e-3f));  // ln2^4 / 24
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5504108664821580e-2f));  // ln2^3 / 6
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022650695910071e-1f));  // ln2^2 / 2
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718055994531e-1f));  // ln2
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
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
      const __m512 e = exp2_z(_mm512_sub_ps(_mm512_loadu_ps(sp), mu[v]));
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
      _mm512_storeu_ps(sp, exp2_z(_mm512_sub_ps(_mm512_loadu_ps(sp), vl[v])));
    }
  }
}

// Whether the softmax of a block of Mb lanes runs the AVX-512 exp2 code (scores scaled by log2 e):
// AVX-512 tiles on and Mb a multiple of 16.
bool use_exp2_z(int64_t Mb) { return Mb % 16 == 0 && g_use_avx512.load(std::memory_order_relaxed); }
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

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

// Whether the fp32 fast path takes these inputs: its tile path (avx512 or avx2) is the one chosen for
// fp32 (mmfast.cpu_options(gemm=...); "blas" runs the generic kernel on MKL), no attn_mask or
// dropout, head dims multiples of 8.
constexpr int64_t kMaxFastKeys = 16384;  // S^T and dP^T of a block: 2 x Lk x 32 floats per thread

bool fast_path_ok(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                  double dropout_p) {
  if (q.scalar_type() != at::kFloat) return false;
  const cpu::Gemm g = cpu::gemm_for(at::kFloat);
  if (g != cpu::Gemm::kAvx512 && g != cpu::Gemm::kAvx2) return false;
  g_use_avx512.store(g == cpu::Gemm::kAvx512, std::memory_order_relaxed);
  return !mask.defined() && dropout_p == 0.0 && q.size(3) % 8 == 0 && v.size(3) % 8 == 0 && q.size(3) > 0 &&
         v.size(3) > 0 && q.size(2) > 0 && k.size(2) > 0 && k.size(2) <= kMaxFastKeys;
}

// Rows = query block of the transposed layout: x^T[d, r] = x[i0 + r, d], zero beyond `rows`.
void transpose_block(const float* x, int64_t ldx, int64_t rows, int64_t cols, int64_t Mb, float* xt) {
  for (int64_t d = 0; d < cols; ++d) {
    float* dst = xt + d * Mb;
    for (int64_t r = 0; r < rows; ++r) dst[r] = x[r * ldx + d];
    for (int64_t r = rows; r < Mb; ++r) dst[r] = 0.f;
  }
}

// Per batch item: whether no key inside its span [kv_lo, kv_hi) is padded and no causal limit
// applies, so mask_transposed has nothing to do for it (trailing padding is outside the span).
std::vector<char> unmasked_spans(const Masking& mk, int64_t B) {
  std::vector<char> unmasked(B, !mk.causal);
  for (int64_t b = 0; b < B && mk.kpm != nullptr && !mk.causal; ++b) {
    for (int64_t j = mk.kv_lo[b]; j < mk.kv_hi[b] && unmasked[b]; ++j) {
      if (mk.kpm[b * mk.kpm_sb + j * mk.kpm_sj]) unmasked[b] = 0;
    }
  }
  return unmasked;
}

// Step 2 in the transposed layout: S^T row jj (key lo + jj) = -inf where padded or, causal, for
// the lanes r whose row i0 + r may not see it (j > i + Lk - Lq).
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

// Query rows per block of the fast paths (fp32 and bf16). Forward: 32, halved (down to 8) while
// there are fewer than 4 tasks per thread. Backward (tasks are (b, kv head)): Lq rounded up to 8
// lanes, at most 32.
int64_t fast_forward_block_rows(int64_t B, int64_t Hq, int64_t Lq) {
  int64_t Mb = 32;
  while (Mb > 8 && B * Hq * ((Lq + Mb - 1) / Mb) < 4 * at::get_num_threads()) Mb /= 2;
  return Mb;
}
int64_t fast_backward_block_rows(int64_t Lq) { return std::min<int64_t>(32, (Lq + 7) / 8 * 8); }

// Softmax down the columns of a transposed block st (cols x Mb): per lane r, m = max_j s,
// st = p = exp(s - m), l = sum_j p. With z (AVX-512, base 2: scores in log2 units) all lanes of a
// row at once; otherwise 8 AVX2 lanes at a time. A lane with no allowed key: m = -inf, l = 0.
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
      const __m256 e = fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(sp), mu));
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
  const bool z = use_exp2_z(Mb);
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
      small_gemm(cols, Mb, D, scale * lg, K.row(b, g, lo), K.sl, 1, qt.data(), Mb, st.data(), Mb, false);
      if (!unmasked[b]) mask_transposed(mk, b, i0, Mb, lo, cols, st.data());
      // 3. Softmax down the columns: m = max_j s, p = exp(s - m), l = sum_j p.
      softmax_cols(st.data(), cols, Mb, z, m.data(), l.data());
      // 4. O = P V straight into the output rows (A = P^T read by columns: the same loads as
      // O^T = V^T P^T, without the transposed write-back), 5. out = O / l, lse = m + log l; rows
      // without an allowed key: 0, -inf.
      small_gemm(rows, Dv, cols, 1.f, st.data(), 1, Mb, V.row(b, g, lo), V.sl, O.row(b, h, i0), O.sl, 0);
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

// Shapes and views shared by every task of one fast backward call.
struct FastArgs {
  int64_t Hq, Lq, D, Lk, Dv, Mb;
  View4<float> Q, K, V, O, dO;
  const float* lse;   // B x Hq x Lq, contiguous
  const float* dlse;  // B x Hq x Lq, contiguous, or null (the LSE's gradient: D_i -= dlse_i)
  float scale;
  const Masking& mk;
  View4<float> dK, dV;  // fp32 outputs: the (b, g) task accumulates into them directly
  bool z;               // AVX-512 base-2 exponentials (use_exp2_z)
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
  small_gemm(cols, Mb, D, a.scale * a.lg, kb, a.K.sl, 1, w.qt.data(), Mb, w.pt.data(), Mb, false);
  mask_transposed(a.mk, b, i0, Mb, lo, cols, w.pt.data());
  small_gemm(cols, Mb, Dv, 1.f, a.V.row(b, g, lo), a.V.sl, 1, w.dot.data(), Mb, w.dpt.data(), Mb, false);
  if (a.z && Mb == 32) {
    exp_cols_z<2>(w.pt.data(), cols, w.lse.data());
  } else if (a.z) {
    exp_cols_z<1>(w.pt.data(), cols, w.lse.data());
  }
  for (int64_t v8 = 0; v8 < Mb && !a.z; v8 += 8) {
    const __m256 vl = _mm256_loadu_ps(&w.lse[v8]);
    for (int64_t jj = 0; jj < cols; ++jj) {
      float* sp = &w.pt[jj * Mb + v8];
      _mm256_storeu_ps(sp, fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(sp), vl)));
    }
  }
  const int flags = (first ? 0 : kAccumulate) | (last ? kStream : 0);
  // 4. dv += P^T dO, 5. dS^T = P^T (dP^T - D) in place.
  small_gemm(cols, Dv, rows, 1.f, w.pt.data(), Mb, 1, d_o, a.dO.sl, dv + lo * a.dV.sl, a.dV.sl, flags);
  for (int64_t v8 = 0; v8 < Mb; v8 += 8) {
    const __m256 vd = _mm256_loadu_ps(&w.di[v8]);
    for (int64_t jj = 0; jj < cols; ++jj) {
      float* sp = &w.pt[jj * Mb + v8];
      const __m256 dp = _mm256_sub_ps(_mm256_loadu_ps(&w.dpt[jj * Mb + v8]), vd);
      _mm256_storeu_ps(sp, _mm256_mul_ps(_mm256_loadu_ps(sp), dp));
    }
  }
  // 6. dk += scale dS^T Q, 7. dq^T = scale K^T dS^T, written back transposed.
  small_gemm(cols, D, rows, a.scale, w.pt.data(), Mb, 1, q, a.Q.sl, dk + lo * a.dK.sl, a.dK.sl, flags);
  small_gemm(D, Mb, cols, a.scale, kb, 1, a.K.sl, w.pt.data(), Mb, w.dqt.data(), Mb, false);
  for (int64_t r = 0; r < rows; ++r) {
    float* dqrow = dQ.row(b, h, i0 + r);
    for (int64_t d = 0; d < D; ++d) dqrow[d] = w.dqt[d * Mb + r];
  }
}

// Backward, one task per (b, g) as in the generic kernel (the task owns dk, dv of its kv head).
void backward_fast(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dlse, const Masking& mk,
                   double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3), group = Hq / Hkv;
  const int64_t Mb = fast_backward_block_rows(Lq);
  const FastArgs a{Hq,
                   Lq,
                   D,
                   Lk,
                   Dv,
                   Mb,
                   view4<float>(q),
                   view4<float>(k),
                   view4<float>(v),
                   view4<float>(out),
                   view4<float>(dout),
                   lse.data_ptr<float>(),
                   dlse.defined() ? dlse.data_ptr<float>() : nullptr,
                   static_cast<float>(scale),
                   mk,
                   view4<float>(dk),
                   view4<float>(dv),
                   use_exp2_z(Mb),
                   use_exp2_z(Mb) ? kLog2e : 1.f};
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

#else
bool fast_path_ok(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double) {
  return false;
}
void forward_fast(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Masking&, double,
                  at::Tensor&, at::Tensor&) {}
void backward_fast(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const Masking&, double,
                   at::Tensor&, at::Tensor&, at::Tensor&) {}
#endif

}  // namespace
}  // namespace mmfast::xattn
