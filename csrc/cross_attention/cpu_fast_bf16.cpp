// Fast path of the CPU cross-attention for bf16 without attn_mask or dropout (key padding and causal
// allowed) on CPUs with AVX512_BF16: every product on the vdpbf16ps kernel of common/cpu_gemm_bf16.h
// (bf16 x bf16 -> fp32 at twice the fp32 FMA rate), softmax and statistics in fp32. It shares the
// transposed block layout, masking and softmax of the fp32 path (cpu_fast.h).
//
// The kernel's operands: A row-major with contiguous k (read as broadcast bf16 pairs), B packed in
// k-pairs (cpu::pack_vnni). Per block of Mb <= 32 query rows (S^T: keys x rows, as in cpu_fast.h):
//   forward:  S^T = scale K Q^T          A = K rows,          B = Q^T packed (K = D)
//             O^T = V^T P^T               A = V^T (per (b, g, keys)), B = P^T in key pairs
//   backward: P^T = exp(S^T - lse)        as above
//             dP^T = V dO^T               A = V rows,          B = dO^T packed (K = Dv)
//             dv += P^T dO                A = P^T (bf16),      B = dO packed (K = rows)
//             dS^T = P^T (dP^T - D)
//             dk += scale dS^T Q          A = dS^T (bf16),     B = Q packed (K = rows)
//             dq^T = scale K^T dS^T       A = K^T (per (b, g) task), B = dS^T in key pairs
// P and dS are rounded to bf16 once (as in every bf16 attention kernel); dk, dv accumulate in fp32
// over the task's heads and blocks and are rounded once at the end.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "common/cpu_blas.h"
#include "common/cpu_gemm_bf16.h"
#include "common/cpu_isa.h"
#include "cross_attention/cpu_fast.h"

namespace mmfast::cross_attention {

#if defined(__AVX2__) && defined(__FMA__)

namespace {

using u16 = uint16_t;

// dst[0..n) = bf16(src[0..n)) with vcvtne2ps2bf16 (round to nearest even, 32 values per
// instruction; the path runs only where AVX512_BF16 exists).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void to_bf16_z(const float* src, at::BFloat16* dst,
                                                                      int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i, (__m512i)v);
  }
  if (i < n) {  // masked tail
    const int64_t left = n - i;
    const __mmask16 lo = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __mmask16 hi = left > 16 ? __mmask16((1u << (left - 16)) - 1) : __mmask16(0);
    const __m512bh v =
        _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + i + 16), _mm512_maskz_loadu_ps(lo, src + i));
    _mm512_mask_storeu_epi16(dst + i, (__mmask32(hi) << 16) | lo, (__m512i)v);
  }
}

// 8 floats -> 8 bf16 (round to nearest even; finite inputs).
inline __m128i cvt8_bf16(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// 8 lanes of a transposed block as bf16: fp32 rounded (cvt8_bf16), or bf16 as stored.
inline __m128i load8_bf16(const float* p) { return cvt8_bf16(_mm256_loadu_ps(p)); }
inline __m128i load8_bf16(const u16* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// B packed (K = n keys, N = Mb <= 32 lanes) from a transposed block src (n x Mb, fp32 or bf16): pair
// q holds rows 2q, 2q + 1 interleaved lane by lane (zero for a missing row 2q + 1). Lanes Mb..31 of
// each pair are left as they are (the caller zeroes them once).
template <typename T>
void pack_block_pairs(const T* src, int64_t n, int64_t Mb, u16* dst) {
  for (int64_t q = 0; 2 * q < n; ++q) {
    const T* r0 = src + 2 * q * Mb;
    const bool has1 = 2 * q + 1 < n;
    u16* d = dst + q * 2 * cpu::kVnniCols;
    for (int64_t v8 = 0; v8 < Mb; v8 += 8) {
      const __m128i a = load8_bf16(r0 + v8);
      const __m128i b = has1 ? load8_bf16(r0 + Mb + v8) : _mm_setzero_si128();
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * v8), _mm_unpacklo_epi16(a, b));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * v8 + 8), _mm_unpackhi_epi16(a, b));
    }
  }
}

// dst (d x n, row stride ldd) = x^T of a row-major block x (n rows of d, row stride ldx).
void transpose_u16(const u16* x, int64_t ldx, int64_t n, int64_t d, u16* dst, int64_t ldd) {
  const int64_t n8 = n / 8 * 8, d8 = d / 8 * 8;
  for (int64_t j = 0; j < n8; j += 8) {
    for (int64_t c = 0; c < d8; c += 8) {
      __m128i in[8], out[8];
      for (int r = 0; r < 8; ++r)
        in[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + (j + r) * ldx + c));
      cpu::transpose8x8_u16(in, out);
      for (int r = 0; r < 8; ++r)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (c + r) * ldd + j), out[r]);
    }
    for (int64_t c = d8; c < d; ++c)
      for (int64_t r = 0; r < 8; ++r) dst[c * ldd + j + r] = x[(j + r) * ldx + c];
  }
  for (int64_t j = n8; j < n; ++j)
    for (int64_t c = 0; c < d; ++c) dst[c * ldd + j] = x[j * ldx + c];
}

// B packed from a row-major block x (k rows, n columns, row stride ld): K = k, N = n. Pair q
// interleaves rows 2q and 2q + 1 (zero for a missing row), 8 columns at a time.
void pack_rows(const u16* x, int64_t ld, int64_t k, int64_t n, std::vector<u16>& dst) {
  dst.assign(cpu::vnni_packed_size(k, n), 0);
  const int64_t ps = cpu::vnni_panel_stride(k), n8 = n / 8 * 8;
  for (int64_t q = 0; 2 * q < k; ++q) {
    const u16* r0 = x + 2 * q * ld;
    const bool has1 = 2 * q + 1 < k;
    for (int64_t c = 0; c < n8; c += 8) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + c));
      const __m128i b =
          has1 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + ld + c)) : _mm_setzero_si128();
      u16* d = dst.data() + c / cpu::kVnniCols * ps + q * 2 * cpu::kVnniCols + 2 * (c % cpu::kVnniCols);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm_unpacklo_epi16(a, b));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 8), _mm_unpackhi_epi16(a, b));
    }
    for (int64_t c = n8; c < n; ++c) {
      u16* d = dst.data() + c / cpu::kVnniCols * ps + q * 2 * cpu::kVnniCols + 2 * (c % cpu::kVnniCols);
      d[0] = r0[c];
      d[1] = has1 ? r0[ld + c] : 0;
    }
  }
}
// B packed from the transpose of a row-major block x (rows <= 32 x d, row stride ld): K = d,
// N = rows. Pair q of lane r is x's 32-bit word (x[r][2q], x[r][2q + 1]): a transpose of words.
void pack_transposed(const u16* x, int64_t ld, int64_t rows, int64_t d, std::vector<u16>& dst) {
  dst.assign(cpu::vnni_packed_size(d, rows), 0);
  const int64_t pairs = d / 2;
  uint32_t* d32 = reinterpret_cast<uint32_t*>(dst.data());
  for (int64_t r = 0; r < rows; ++r) {
    const u16* xr = x + r * ld;
    for (int64_t q = 0; q < pairs; ++q) std::memcpy(d32 + q * cpu::kVnniCols + r, xr + 2 * q, 4);
    if (d % 2 != 0) dst[(pairs * cpu::kVnniCols + r) * 2] = xr[d - 1];
  }
}

// D_i = <do_i, o_i> over Dv bf16 elements, in fp32.
float dot_bf16(const at::BFloat16* a, const at::BFloat16* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    const __m256 x = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + d))), 16));
    const __m256 y = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + d))), 16));
    acc = _mm256_fmadd_ps(x, y, acc);
  }
  float sum = cpu::hsum8(acc);
  for (; d < n; ++d) sum += static_cast<float>(a[d]) * static_cast<float>(b[d]);
  return sum;
}

template <typename T>
const u16* bits(const T* p) {
  return reinterpret_cast<const u16*>(p);
}

// P^T = 2^(S^T - lse2) and dS^T = P^T (dP^T - D) in place, AVX-512, Mb = 16 NV lanes (log2 units),
// all lanes of a row per pass (the softmax of the fp32 path).
template <int NV>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void exp_ds_cols_z(
    const float* st, const float* dpt, int64_t cols, const float* lse2, const float* di, u16* ptb,
    u16* dstb) {
  constexpr int Mb = 16 * NV;
  __m512 vl[NV], vd[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) vl[v] = _mm512_loadu_ps(lse2 + 16 * v), vd[v] = _mm512_loadu_ps(di + 16 * v);
  for (int64_t jj = 0; jj < cols; ++jj) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const int64_t o = jj * Mb + 16 * v;
      const __m512 pv = cpu::exp_f32x16<true>(_mm512_sub_ps(_mm512_loadu_ps(st + o), vl[v]));
      const __m512 ds = _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(dpt + o), vd[v]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ptb + o), (__m256i)_mm512_cvtneps_pbh(pv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dstb + o), (__m256i)_mm512_cvtneps_pbh(ds));
    }
  }
}

// Per-thread buffers of the bf16 backward.
struct FastBf16Scratch {
  FastBf16Scratch(int64_t Mb, int64_t D, int64_t Dv, int64_t Lk)
      : pt(std::max<int64_t>(Lk, 1) * Mb),
        dpt(std::max<int64_t>(Lk, 1) * Mb),
        dqt(D * Mb),
        dk(Lk * D),
        dv(Lk * Dv),
        di(Mb),
        lse(Mb),
        ptb(std::max<int64_t>(Lk, 1) * Mb),
        dstb(std::max<int64_t>(Lk, 1) * Mb),
        dsp(cpu::vnni_packed_size(std::max<int64_t>(Lk, 1), Mb), 0) {}  // lanes >= Mb stay 0
  std::vector<float> pt, dpt, dqt, dk, dv, di, lse;
  std::vector<u16> ptb, dstb, dsp, kt, qt, dot, qr, dor, dqtb = std::vector<u16>(dqt.size());
};

}  // namespace

// Whether the bf16 fast path takes these inputs: the bf16 tile path is "avx512_bf16" (this CPU has
// AVX512_BF16 and no AMX, or it was forced), no attn_mask or dropout. On AMX CPUs bf16 runs the
// generic kernel, whose products go to MKL's bf16 GEMM on the AMX tiles.
bool fast_bf16_ok(const at::Tensor& q, const at::Tensor& k, const at::Tensor& mask, double dropout_p) {
  if (q.scalar_type() != at::kBFloat16 || cpu::gemm_for(at::kBFloat16) != cpu::Gemm::kAvx512Bf16)
    return false;
  const bool ok = !mask.defined() && dropout_p == 0.0 && q.size(2) > 0 && k.size(2) > 0 && q.size(3) > 0 &&
                  k.size(2) <= kMaxFastKeys;
  return ok;
}

// Forward, one task per (b, h, block of Mb query rows), as forward_fast.
void forward_fast_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Masking& mk,
                       double scale_d, at::Tensor& out, at::Tensor& lse) {
  using bf16 = at::BFloat16;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3), group = Hq / Hkv;
  const View4<bf16> Q = view4<bf16>(q), K = view4<bf16>(k), V = view4<bf16>(v), O = view4<bf16>(out);
  float* lse_p = lse.data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  const int64_t Mb = fast_forward_block_rows(B, Hq, Lq), nqb = (Lq + Mb - 1) / Mb;

  const std::vector<char> unmasked = unmasked_spans(mk, B);
  const bool z = softmax_base2(Mb, true);  // AVX512_BF16 implies AVX-512
  const float lg = z ? kLog2e : 1.f;       // scores in log2 units with z
  struct Scratch {
    std::vector<float> st, ot, m, l, inv;
    std::vector<u16> qp, vt, pp, otb;                                        // pp: lanes >= Mb stay 0
    int64_t packed_b = -1, packed_g = -1, packed_lo = -1, packed_cols = -1;  // whose V is in vt
  };
  auto init = [&] {
    Scratch w;
    w.st.resize(std::max<int64_t>(Lk, 1) * Mb), w.ot.resize(Dv * Mb), w.m.resize(Mb), w.l.resize(Mb);
    w.inv.resize(Mb), w.otb.resize(Dv * Mb);
    w.pp.assign(cpu::vnni_packed_size(std::max<int64_t>(Lk, 1), Mb), 0);
    return w;
  };
  parallel_tasks(B * Hq * nqb, init, [&](Scratch& w, int64_t t) {
    std::vector<float>&st = w.st, &ot = w.ot, &m = w.m, &l = w.l;
    std::vector<u16>&qp = w.qp, &vt = w.vt, &pp = w.pp;
    int64_t &packed_b = w.packed_b, &packed_g = w.packed_g, &packed_lo = w.packed_lo,
            &packed_cols = w.packed_cols;
    {
      const int64_t b = t / (Hq * nqb), h = (t / nqb) % Hq, i0 = (t % nqb) * Mb, g = h / group;
      const int64_t rows = std::min(Mb, Lq - i0);
      auto [lo, hi] = mk.key_range(b, i0, i0 + rows);
      const int64_t cols = std::max<int64_t>(hi - lo, 0);
      // 1. S^T = scale K Q^T, masks.
      pack_transposed(bits(Q.row(b, h, i0)), Q.sl, rows, D, qp);
      cpu::gemm_bf16_vnni(cols, Mb, D, scale * lg, bits(K.row(b, g, lo)), K.sl, qp.data(),
                          cpu::vnni_panel_stride(D), st.data(), Mb, false);
      if (!unmasked[b]) mask_transposed(mk, b, i0, Mb, lo, cols, st.data());
      // 2. Softmax down the columns (fp32), as in forward_fast.
      softmax_cols(st.data(), cols, Mb, z, m.data(), l.data());
      // 3. O^T = V^T P^T: A = V^T read from V packed in key pairs (once per (b, g, key range)),
      // B = P^T in key pairs.
      if (cols > 0) {
        if (b != packed_b || g != packed_g || lo != packed_lo || cols != packed_cols) {
          pack_rows(bits(V.row(b, g, lo)), V.sl, cols, Dv, vt);
          packed_b = b, packed_g = g, packed_lo = lo, packed_cols = cols;
        }
        pack_block_pairs(st.data(), cols, Mb, pp.data());
        cpu::gemm_bf16_vnni_xt(Dv, Mb, cols, 1.f, vt.data(), cpu::vnni_panel_stride(cols), pp.data(),
                               cpu::vnni_panel_stride(cols), ot.data(), Mb, false);
      }
      // 4. out = O / l: the lanes of O^T scaled, rounded and transposed into the output rows;
      // lse = m + log l. Rows without an allowed key: 0, -inf.
      if (cols == 0) std::fill(ot.begin(), ot.end(), 0.f);
      // l = NaN (a NaN or +inf score) makes the row's out and lse NaN.
      for (int64_t r = 0; r < Mb; ++r) w.inv[r] = l[r] == 0.f ? 0.f : 1.f / l[r];
      for (int64_t d = 0; d < Dv; ++d) {
        for (int64_t v8 = 0; v8 < Mb; v8 += 8) {
          float* o = &ot[d * Mb + v8];
          _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(o), _mm256_loadu_ps(&w.inv[v8])));
        }
      }
      to_bf16_z(ot.data(), reinterpret_cast<bf16*>(w.otb.data()), Dv * Mb);
      transpose_u16(w.otb.data(), Mb, Dv, rows, reinterpret_cast<u16*>(O.row(b, h, i0)), O.sl);
      for (int64_t r = 0; r < rows; ++r) {
        lse_p[(b * Hq + h) * Lq + i0 + r] = l[r] == 0.f ? kNegInf : m[r] / lg + std::log(l[r]);
      }
    }
  });
}

// Backward, one task per (b, g) as backward_fast: the task owns dk, dv of kv head g.
void backward_fast_bf16(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse_t, const at::Tensor& dlse_t,
                        const Masking& mk, double scale_d, at::Tensor& dq_t, at::Tensor& dk_t,
                        at::Tensor& dv_t) {
  using bf16 = at::BFloat16;
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3), group = Hq / Hkv;
  const int64_t Mb = fast_backward_block_rows(Lq);
  const View4<bf16> Q = view4<bf16>(q), K = view4<bf16>(k), V = view4<bf16>(v), O = view4<bf16>(out);
  const View4<bf16> dO = view4<bf16>(dout), dQ = view4<bf16>(dq_t), dK = view4<bf16>(dk_t),
                    dV = view4<bf16>(dv_t);
  const float* lse_p = lse_t.data_ptr<float>();
  const float* dlse_p = dlse_t.defined() ? dlse_t.data_ptr<float>() : nullptr;  // D_i -= dlse_i
  const float scale = static_cast<float>(scale_d);

  const std::vector<char> unmasked = unmasked_spans(mk, B);
  const bool z = softmax_base2(Mb, true);  // AVX512_BF16 implies AVX-512
  const float lg = z ? kLog2e : 1.f;       // scores and lse in log2 units with z
  // One query block per task (Lq <= Mb, no GQA group): dk, dv need no fp32 accumulation.
  const bool single_block = group == 1 && Lq <= Mb;
  auto init = [&] { return FastBf16Scratch(Mb, D, Dv, Lk); };
  parallel_tasks(B * Hkv, init, [&](FastBf16Scratch& w, int64_t t) {
    {
      const int64_t b = t / Hkv, g = t % Hkv;
      // The first block with keys writes the fp32 dk, dv accumulators (zeros outside its keys), later
      // blocks add to them: no zero fill of all Lk rows first.
      bool fresh = true;
      // K^T for dq^T = K^T dS^T over the item's unpadded keys [klo, khi): every block's key range
      // starts at klo (causal only moves its end), so a block reads K^T from its first column.
      const int64_t klo = mk.kv_lo[b], kn = std::max<int64_t>(mk.kv_hi[b] - klo, 0);
      if (kn > 0) pack_rows(bits(K.row(b, g, klo)), K.sl, kn, D, w.kt);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < Lq; i0 += Mb) {
          const int64_t rows = std::min(Mb, Lq - i0);
          const bf16* qb = Q.row(b, h, i0);
          const bf16* dob = dO.row(b, h, i0);
          // 1. D_i = <do_i, o_i> - dlse_i; per-lane lse, +inf for padding lanes and empty rows (p = 0).
          for (int64_t r = 0; r < Mb; ++r) {
            float di = 0.f, l = std::numeric_limits<float>::infinity();
            if (r < rows) {
              di = dot_bf16(dob + r * dO.sl, O.row(b, h, i0 + r), Dv);
              if (dlse_p) di -= dlse_p[(b * Hq + h) * Lq + i0 + r];
              const float x = lse_p[(b * Hq + h) * Lq + i0 + r];
              if (x != -std::numeric_limits<float>::infinity()) l = x * lg;
            }
            w.di[r] = di, w.lse[r] = l;
          }
          auto [lo, hi] = mk.key_range(b, i0, i0 + rows);
          const int64_t cols = std::max<int64_t>(hi - lo, 0);
          if (cols == 0) {
            for (int64_t r = 0; r < rows; ++r)
              std::fill(dQ.row(b, h, i0 + r), dQ.row(b, h, i0 + r) + D, bf16(0.f));
            continue;
          }
          pack_transposed(bits(qb), Q.sl, rows, D, w.qt);
          pack_transposed(bits(dob), dO.sl, rows, Dv, w.dot);
          pack_rows(bits(qb), Q.sl, rows, D, w.qr);
          pack_rows(bits(dob), dO.sl, rows, Dv, w.dor);
          // 2. P^T = exp(scale K Q^T + masks - lse), 3. dP^T = V dO^T.
          cpu::gemm_bf16_vnni(cols, Mb, D, scale * lg, bits(K.row(b, g, lo)), K.sl, w.qt.data(),
                              cpu::vnni_panel_stride(D), w.pt.data(), Mb, false);
          if (!unmasked[b]) mask_transposed(mk, b, i0, Mb, lo, cols, w.pt.data());
          cpu::gemm_bf16_vnni(cols, Mb, Dv, 1.f, bits(V.row(b, g, lo)), V.sl, w.dot.data(),
                              cpu::vnni_panel_stride(Dv), w.dpt.data(), Mb, false);
          // P^T, dS^T = P^T (dP^T - D), both rounded to bf16 (AVX-512: in the same pass).
          if (z && Mb == 32) {
            exp_ds_cols_z<2>(w.pt.data(), w.dpt.data(), cols, w.lse.data(), w.di.data(), w.ptb.data(),
                             w.dstb.data());
          } else if (z) {
            exp_ds_cols_z<1>(w.pt.data(), w.dpt.data(), cols, w.lse.data(), w.di.data(), w.ptb.data(),
                             w.dstb.data());
          }
          for (int64_t v8 = 0; v8 < Mb && !z; v8 += 8) {
            const __m256 vl = _mm256_loadu_ps(&w.lse[v8]);
            const __m256 vd = _mm256_loadu_ps(&w.di[v8]);
            for (int64_t jj = 0; jj < cols; ++jj) {
              float* sp = &w.pt[jj * Mb + v8];
              const __m256 pv = cpu::fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(sp), vl));
              _mm256_storeu_ps(sp, pv);  // P^T
              float* dp = &w.dpt[jj * Mb + v8];
              _mm256_storeu_ps(dp, _mm256_mul_ps(pv, _mm256_sub_ps(_mm256_loadu_ps(dp), vd)));  // dS^T
            }
          }
          if (!z) {
            to_bf16_z(w.pt.data(), reinterpret_cast<bf16*>(w.ptb.data()), cols * Mb);
            to_bf16_z(w.dpt.data(), reinterpret_cast<bf16*>(w.dstb.data()), cols * Mb);
          }
          // 4. dv += P^T dO, 5. dk += scale dS^T Q (K = the block's rows; padding lanes hold p = 0).
          if (single_block) {  // the task's only block: dv, dk rounded straight into the outputs
            auto zero_rows = [&](int64_t j0, int64_t j1) {  // keys outside the block's range
              for (int64_t j = j0; j < j1; ++j) {
                std::fill(dK.row(b, g, j), dK.row(b, g, j) + D, bf16(0.f));
                std::fill(dV.row(b, g, j), dV.row(b, g, j) + Dv, bf16(0.f));
              }
            };
            zero_rows(0, lo);
            zero_rows(lo + cols, Lk);
            cpu::gemm_bf16_vnni_to_bf16(cols, Dv, rows, 1.f, w.ptb.data(), Mb, w.dor.data(),
                                        cpu::vnni_panel_stride(rows),
                                        reinterpret_cast<u16*>(dV.row(b, g, lo)), dV.sl);
            cpu::gemm_bf16_vnni_to_bf16(cols, D, rows, scale, w.dstb.data(), Mb, w.qr.data(),
                                        cpu::vnni_panel_stride(rows),
                                        reinterpret_cast<u16*>(dK.row(b, g, lo)), dK.sl);
          } else if (fresh) {
            std::fill(w.dk.begin(), w.dk.begin() + lo * D, 0.f);
            std::fill(w.dk.begin() + (lo + cols) * D, w.dk.end(), 0.f);
            std::fill(w.dv.begin(), w.dv.begin() + lo * Dv, 0.f);
            std::fill(w.dv.begin() + (lo + cols) * Dv, w.dv.end(), 0.f);
          }
          if (!single_block) {
            cpu::gemm_bf16_vnni(cols, Dv, rows, 1.f, w.ptb.data(), Mb, w.dor.data(),
                                cpu::vnni_panel_stride(rows), w.dv.data() + lo * Dv, Dv, !fresh);
            cpu::gemm_bf16_vnni(cols, D, rows, scale, w.dstb.data(), Mb, w.qr.data(),
                                cpu::vnni_panel_stride(rows), w.dk.data() + lo * D, D, !fresh);
          }
          fresh = false;
          // 6. dq^T = scale K^T dS^T: A = K^T read from K packed in key pairs (once per task; every
          // block's keys start at klo, so at pair 0), B = dS^T in key pairs.
          pack_block_pairs(w.dstb.data(), cols, Mb, w.dsp.data());
          cpu::gemm_bf16_vnni_xt(D, Mb, cols, scale, w.kt.data(), cpu::vnni_panel_stride(kn), w.dsp.data(),
                                 cpu::vnni_panel_stride(cols), w.dqt.data(), Mb, false);
          to_bf16_z(w.dqt.data(), reinterpret_cast<bf16*>(w.dqtb.data()), D * Mb);  // dq^T in bf16,
          transpose_u16(w.dqtb.data(), Mb, D, rows, reinterpret_cast<u16*>(dQ.row(b, h, i0)),
                        dQ.sl);  // to rows
        }
      }
      if (fresh) {  // no block had a key: dk, dv = 0
        std::fill(w.dk.begin(), w.dk.end(), 0.f);
        std::fill(w.dv.begin(), w.dv.end(), 0.f);
      } else if (single_block) {
        return;  // written by the block
      }
      for (int64_t j = 0; j < Lk; ++j) {  // this task's kv head: every key row, zeros included
        to_bf16_z(w.dk.data() + j * D, dK.row(b, g, j), D);  // vectorized round to nearest even
        to_bf16_z(w.dv.data() + j * Dv, dV.row(b, g, j), Dv);
      }
    }
  });
}

#else  // built without AVX2: the generic kernel runs everything

bool fast_bf16_ok(const at::Tensor&, const at::Tensor&, const at::Tensor&, double) { return false; }
void forward_fast_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Masking&, double,
                       at::Tensor&, at::Tensor&) {}
void backward_fast_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const Masking&, double,
                        at::Tensor&, at::Tensor&, at::Tensor&) {}

#endif

}  // namespace mmfast::cross_attention
