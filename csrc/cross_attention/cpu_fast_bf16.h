// Fast path of the CPU cross-attention for bf16 without attn_mask or dropout (key padding and causal
// allowed) on CPUs with AVX512_BF16: every product on the vdpbf16ps kernel of common/cpu_gemm_bf16.h
// (bf16 x bf16 -> fp32 at twice the fp32 FMA rate), softmax and statistics in fp32. Included by
// cpu.cpp after cpu_fast.h, whose transposed block layout, masking and softmax it shares.
//
// The kernel's operands: A row-major with contiguous k (read as broadcast bf16 pairs), B packed in
// k-pairs (cpu::pack_vnni). Per block of Mb <= 32 query rows (S^T: keys x rows, as in cpu_fast.h):
//   forward:  S^T = scale K Q^T          A = K rows,          B = Q^T packed (K = D)
//             O = P V                     A = P (bf16),        B = V packed (K = keys), per (b, g, keys)
//   backward: P^T = exp(S^T - lse)        as above
//             dP^T = V dO^T               A = V rows,          B = dO^T packed (K = Dv)
//             dv += P^T dO                A = P^T (bf16),      B = dO packed (K = rows)
//             dS^T = P^T (dP^T - D)
//             dk += scale dS^T Q          A = dS^T (bf16),     B = Q packed (K = rows)
//             dq = scale dS K             A = dS (bf16),       B = K packed once per (b, g) task
// P and dS are rounded to bf16 once (as in every bf16 attention kernel); dk, dv accumulate in fp32
// over the task's heads and blocks and are rounded once at the end.
#pragma once

#include "common/cpu_gemm_bf16.h"

namespace mmfast::xattn {
namespace {

#if defined(__AVX2__) && defined(__FMA__)

using u16 = uint16_t;

inline u16 bf16_bits(float x) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return static_cast<u16>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_value(u16 h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// dst (Mb x n, row stride ldd) = bf16 of src^T (src: n x Mb fp32), rows [0, rows).
// bf16 bits of x (round to nearest even, as bf16_bits) in the upper half of each 32-bit lane.
__attribute__((target("avx512f"))) inline __m512i round_bits_z(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
}

// transpose_to_bf16 with AVX-512: per 16 lanes and pair of keys (j, j + 1), both rounded to bf16
// (nearest even, as bf16_bits) and joined into one 32-bit value per lane, then one masked scatter
// writes the 16 pairs to dst[r * ldd + j] of their rows: no scalar strided u16 stores.
__attribute__((target("avx512f"))) void transpose_to_bf16_z(const float* src, int64_t n, int64_t Mb,
                                                            int64_t rows, u16* dst, int64_t ldd) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t lanes = std::min<int64_t>(16, rows - r0);
    const __mmask16 m = static_cast<__mmask16>(lanes == 16 ? 0xFFFFu : (1u << lanes) - 1u);
    // element offsets (u16 units) of rows r0 + i
    const __m512i idx = _mm512_mullo_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(r0))),
                                           _mm512_set1_epi32(static_cast<int>(ldd)));
    int64_t j = 0;
    for (; j + 1 < n; j += 2) {
      const __m512i lo = _mm512_srli_epi32(round_bits_z(_mm512_maskz_loadu_ps(m, src + j * Mb + r0)), 16);
      const __m512i hi =
          _mm512_and_si512(round_bits_z(_mm512_maskz_loadu_ps(m, src + (j + 1) * Mb + r0)), high);
      _mm512_mask_i32scatter_epi32(dst + j, m, idx, _mm512_or_si512(lo, hi), 2);
    }
    for (; j < n; ++j) {
      for (int64_t r = r0; r < r0 + lanes; ++r) dst[r * ldd + j] = bf16_bits(src[j * Mb + r]);
    }
  }
}

void transpose_to_bf16(const float* src, int64_t n, int64_t Mb, int64_t rows, u16* dst, int64_t ldd) {
  for (int64_t j = 0; j < n; ++j) {
    const float* s = src + j * Mb;
    for (int64_t r = 0; r < rows; ++r) dst[r * ldd + j] = bf16_bits(s[r]);
  }
}

// transpose_to_bf16_z unless MMFAST_XATTN_CPU_PASS3=0 (A/B runs; AVX-512 is present with AVX512_BF16).
void transpose_bf16(const float* src, int64_t n, int64_t Mb, int64_t rows, u16* dst, int64_t ldd) {
  if (g_pass3.load(std::memory_order_relaxed)) return transpose_to_bf16_z(src, n, Mb, rows, dst, ldd);
  transpose_to_bf16(src, n, Mb, rows, dst, ldd);
}

// pack_rows with AVX-512 (BW): per pair of rows and panel of 32 columns, two masked 32-element loads
// and two vpermt2w interleaves give the panel's 64 bf16 of that pair (zeros beyond n and for the odd
// last row), the layout of cpu::pack_vnni.
__attribute__((target("avx512f,avx512bw"))) void pack_rows_z(const u16* x, int64_t ld, int64_t k, int64_t n,
                                                             u16* dst) {
  alignas(64) static const uint16_t kIdx[2][32] = {
      {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47},
      {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
       24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63}};
  const __m512i lo = _mm512_load_si512(kIdx[0]), hi = _mm512_load_si512(kIdx[1]);
  const int64_t pairs = cpu::vnni_pairs(k), stride = cpu::vnni_panel_stride(k);
  for (int64_t n0 = 0, p = 0; n0 < n; n0 += cpu::kVnniCols, ++p) {
    const int64_t cols = std::min<int64_t>(cpu::kVnniCols, n - n0);
    const __mmask32 m = cols == 32 ? ~__mmask32(0) : (__mmask32(1) << cols) - 1;
    u16* d = dst + p * stride;
    for (int64_t q = 0; q < pairs; ++q, d += 2 * cpu::kVnniCols) {
      const __m512i a = _mm512_maskz_loadu_epi16(m, x + 2 * q * ld + n0);
      const __m512i b =
          2 * q + 1 < k ? _mm512_maskz_loadu_epi16(m, x + (2 * q + 1) * ld + n0) : _mm512_setzero_si512();
      _mm512_storeu_si512(d, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(d + cpu::kVnniCols, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// B packed from a row-major block x (k rows, n columns, row stride ld): K = k, N = n.
void pack_rows(const u16* x, int64_t ld, int64_t k, int64_t n, std::vector<u16>& dst) {
  dst.resize(cpu::vnni_packed_size(k, n));
  static const bool bw = __builtin_cpu_supports("avx512bw");
  if (bw && g_pass3.load(std::memory_order_relaxed))
    return pack_rows_z(x, ld, k, n, dst.data());  // PASS3=0: A/B
  cpu::pack_vnni(x, ld, 1, k, n, dst.data(), 0, (n + cpu::kVnniCols - 1) / cpu::kVnniCols);
}
// B packed from the transpose of a row-major block x (rows x d, row stride ld): K = d, N = rows.
void pack_transposed(const u16* x, int64_t ld, int64_t rows, int64_t d, std::vector<u16>& dst) {
  dst.resize(cpu::vnni_packed_size(d, rows));
  cpu::pack_vnni(x, 1, ld, d, rows, dst.data(), 0, (rows + cpu::kVnniCols - 1) / cpu::kVnniCols);
}

bool fast_bf16_ok(const at::Tensor& q, const at::Tensor& k, const at::Tensor& mask, double dropout_p) {
  const char* e = std::getenv("MMFAST_XATTN_CPU_FAST");  // read per call: benchmarks toggle it
  const bool enabled = e == nullptr || std::string(e) != "0";
  return enabled && cpu::has_avx512_bf16() && q.scalar_type() == at::kBFloat16 && !mask.defined() &&
         dropout_p == 0.0 && q.size(2) > 0 && k.size(2) > 0 && q.size(3) > 0 && k.size(2) <= kMaxFastKeys;
}

template <typename T>
const u16* bits(const T* p) {
  return reinterpret_cast<const u16*>(p);
}

// P^T = 2^(S^T - lse2) and dS^T = P^T (dP^T - D), AVX-512, Mb = 16 NV lanes (log2 units), in the same
// pass rounded to bf16 (ptb, dstb: the dv and dk GEMMs' A operands); dS^T also stays in fp32 in dpt
// (the dq transpose reads it). P^T itself is not kept in fp32.
template <int NV>
__attribute__((target("avx512f"))) void exp_ds_cols_z(const float* pt, float* dpt, int64_t cols,
                                                      const float* lse2, const float* di, u16* ptb,
                                                      u16* dstb) {
  constexpr int Mb = 16 * NV;
  __m512 vl[NV], vd[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) vl[v] = _mm512_loadu_ps(lse2 + 16 * v), vd[v] = _mm512_loadu_ps(di + 16 * v);
  for (int64_t jj = 0; jj < cols; ++jj) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const int64_t o = jj * Mb + 16 * v;
      const __m512 pv = exp2_z(_mm512_sub_ps(_mm512_loadu_ps(pt + o), vl[v]));
      const __m512 ds = _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(dpt + o), vd[v]));
      _mm512_storeu_ps(dpt + o, ds);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ptb + o),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bits_z(pv), 16)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dstb + o),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bits_z(ds), 16)));
    }
  }
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
  int64_t Mb = 32;
  while (Mb > 8 && B * Hq * ((Lq + Mb - 1) / Mb) < 4 * at::get_num_threads()) Mb /= 2;
  const int64_t nqb = (Lq + Mb - 1) / Mb;

  const bool z = use_exp2_z(Mb);      // AVX-512 base-2 softmax of cpu_fast.h
  const float lg = z ? kLog2e : 1.f;  // scores in log2 units with z
  struct Scratch {
    std::vector<float> st, o, m, l;
    std::vector<u16> qp, vp, p;
    int64_t packed_b = -1, packed_g = -1, packed_lo = -1, packed_cols = -1;  // whose V is in vp
  };
  auto init = [&] {
    Scratch w;
    w.st.resize(std::max<int64_t>(Lk, 1) * Mb), w.o.resize(Mb * Dv), w.m.resize(Mb), w.l.resize(Mb);
    w.p.resize(Mb * (std::max<int64_t>(Lk, 1) + 1));
    return w;
  };
  parallel_tasks(B * Hq * nqb, init, [&](Scratch& w, int64_t t) {
    std::vector<float>&st = w.st, &o = w.o, &m = w.m, &l = w.l;
    std::vector<u16>&qp = w.qp, &vp = w.vp, &p = w.p;
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
      mask_transposed(mk, b, i0, Mb, lo, cols, st.data());
      // 2. Softmax down the columns (fp32) as in forward_fast: AVX-512 base 2, else 8 AVX2 lanes at a time.
      if (z && Mb == 32) {
        softmax_cols_z<2>(st.data(), cols, m.data(), l.data());
      } else if (z) {
        softmax_cols_z<1>(st.data(), cols, m.data(), l.data());
      }
      for (int64_t v8 = 0; v8 < Mb && !z; v8 += 8) {
        __m256 mx = _mm256_set1_ps(kNegInf);
        for (int64_t jj = 0; jj < cols; ++jj) mx = _mm256_max_ps(mx, _mm256_loadu_ps(&st[jj * Mb + v8]));
        const __m256 none = _mm256_cmp_ps(mx, _mm256_set1_ps(kNegInf), _CMP_EQ_OQ);
        const __m256 mu = _mm256_andnot_ps(none, mx);
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
      // 3. O = P V with P in bf16 (rows x cols) and V packed once per (b, g, key range).
      if (cols > 0) {
        if (b != packed_b || g != packed_g || lo != packed_lo || cols != packed_cols) {
          pack_rows(bits(V.row(b, g, lo)), V.sl, cols, Dv, vp);
          packed_b = b, packed_g = g, packed_lo = lo, packed_cols = cols;
        }
        const int64_t ldp = cols + 1;  // any ld works; odd avoids 4 KB aliasing of the rows
        transpose_bf16(st.data(), cols, Mb, rows, p.data(), ldp);
        cpu::gemm_bf16_vnni(rows, Dv, cols, 1.f, p.data(), ldp, vp.data(), cpu::vnni_panel_stride(cols),
                            o.data(), Dv, false);
      }
      // 4. out = O / l, lse = m + log l; rows without an allowed key: 0, -inf.
      for (int64_t r = 0; r < rows; ++r) {
        const bool empty = !(l[r] > 0.f);
        const float inv = empty ? 0.f : 1.f / l[r];
        bf16* orow = O.row(b, h, i0 + r);
        for (int64_t d = 0; d < Dv; ++d) orow[d] = static_cast<bf16>(empty ? 0.f : o[r * Dv + d] * inv);
        lse_p[(b * Hq + h) * Lq + i0 + r] = empty ? kNegInf : m[r] / lg + std::log(l[r]);
      }
    }
  });
}

// Per-thread buffers of the bf16 backward.
struct FastBf16Scratch {
  FastBf16Scratch(int64_t Mb, int64_t D, int64_t Dv, int64_t Lk)
      : pt(std::max<int64_t>(Lk, 1) * Mb),
        dpt(std::max<int64_t>(Lk, 1) * Mb),
        dq(Mb * D),
        dk(Lk * D),
        dv(Lk * Dv),
        di(Mb),
        lse(Mb),
        ptb(std::max<int64_t>(Lk, 1) * Mb),
        dstb(std::max<int64_t>(Lk, 1) * Mb),
        dsb(Mb * (std::max<int64_t>(Lk, 1) + 1)) {}
  std::vector<float> pt, dpt, dq, dk, dv, di, lse;
  std::vector<u16> ptb, dstb, dsb, kp, qt, dot, qr, dor;
};

// Backward, one task per (b, g) as backward_fast: the task owns dk, dv of kv head g.
void backward_fast_bf16(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse_t, const Masking& mk, double scale_d,
                        at::Tensor& dq_t, at::Tensor& dk_t, at::Tensor& dv_t) {
  using bf16 = at::BFloat16;
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3), group = Hq / Hkv;
  const int64_t Mb = std::min<int64_t>(32, (Lq + 7) / 8 * 8);
  const View4<bf16> Q = view4<bf16>(q), K = view4<bf16>(k), V = view4<bf16>(v), O = view4<bf16>(out);
  const View4<bf16> dO = view4<bf16>(dout), dQ = view4<bf16>(dq_t), dK = view4<bf16>(dk_t),
                    dV = view4<bf16>(dv_t);
  const float* lse_p = lse_t.data_ptr<float>();
  const float scale = static_cast<float>(scale_d);

  const bool z = use_exp2_z(Mb);      // AVX-512 base-2 exponentials of cpu_fast.h
  const float lg = z ? kLog2e : 1.f;  // scores and lse in log2 units with z
  auto init = [&] { return FastBf16Scratch(Mb, D, Dv, Lk); };
  parallel_tasks(B * Hkv, init, [&](FastBf16Scratch& w, int64_t t) {
    {
      const int64_t b = t / Hkv, g = t % Hkv;
      // The first block with keys writes the fp32 dk, dv accumulators (zeros outside its keys),
      // later blocks add to them: no zero fill of the whole Lk rows first.
      bool fresh = true;
      // K packed for dq = dS K over the item's unpadded keys [klo, khi): every block's key range
      // starts at klo (causal only moves its end), so a block uses the packed rows from pair 0.
      const int64_t klo = mk.kv_lo[b], kn = std::max<int64_t>(mk.kv_hi[b] - klo, 0);
      if (kn > 0) pack_rows(bits(K.row(b, g, klo)), K.sl, kn, D, w.kp);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < Lq; i0 += Mb) {
          const int64_t rows = std::min(Mb, Lq - i0);
          const bf16* qb = Q.row(b, h, i0);
          const bf16* dob = dO.row(b, h, i0);
          // 1. D_i = <do_i, o_i>; per-lane lse, +inf for padding lanes and empty rows (p = 0).
          for (int64_t r = 0; r < Mb; ++r) {
            float di = 0.f, l = std::numeric_limits<float>::infinity();
            if (r < rows) {
              const bf16* o = O.row(b, h, i0 + r);
              for (int64_t d = 0; d < Dv; ++d)
                di += static_cast<float>(dob[r * dO.sl + d]) * static_cast<float>(o[d]);
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
          mask_transposed(mk, b, i0, Mb, lo, cols, w.pt.data());
          cpu::gemm_bf16_vnni(cols, Mb, Dv, 1.f, bits(V.row(b, g, lo)), V.sl, w.dot.data(),
                              cpu::vnni_panel_stride(Dv), w.dpt.data(), Mb, false);
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
              const __m256 pv = fast_exp8(_mm256_sub_ps(_mm256_loadu_ps(sp), vl));
              _mm256_storeu_ps(sp, pv);  // P^T
              float* dp = &w.dpt[jj * Mb + v8];
              _mm256_storeu_ps(dp, _mm256_mul_ps(pv, _mm256_sub_ps(_mm256_loadu_ps(dp), vd)));  // dS^T
            }
          }
          if (!z) {  // (with z the exp / dS pass rounded them)
            cpu::to_bf16(w.pt.data(), reinterpret_cast<bf16*>(w.ptb.data()), cols * Mb);
            cpu::to_bf16(w.dpt.data(), reinterpret_cast<bf16*>(w.dstb.data()), cols * Mb);
          }
          if (fresh) {  // rows outside this block's keys: 0 (later blocks only add)
            std::fill(w.dk.begin(), w.dk.begin() + lo * D, 0.f);
            std::fill(w.dk.begin() + (lo + cols) * D, w.dk.end(), 0.f);
            std::fill(w.dv.begin(), w.dv.begin() + lo * Dv, 0.f);
            std::fill(w.dv.begin() + (lo + cols) * Dv, w.dv.end(), 0.f);
          }
          // 4. dv += P^T dO, 5. dk += scale dS^T Q (K = the block's rows; padding lanes hold p = 0).
          cpu::gemm_bf16_vnni(cols, Dv, rows, 1.f, w.ptb.data(), Mb, w.dor.data(),
                              cpu::vnni_panel_stride(rows), w.dv.data() + lo * Dv, Dv, !fresh);
          cpu::gemm_bf16_vnni(cols, D, rows, scale, w.dstb.data(), Mb, w.qr.data(),
                              cpu::vnni_panel_stride(rows), w.dk.data() + lo * D, D, !fresh);
          fresh = false;
          // 6. dq = scale dS K (dS row-major from dS^T; K packed for the task).
          const int64_t ldds = cols + 1;
          transpose_bf16(w.dpt.data(), cols, Mb, rows, w.dsb.data(), ldds);
          cpu::gemm_bf16_vnni(rows, D, cols, scale, w.dsb.data(), ldds,
                              w.kp.data() + (lo - klo) * cpu::kVnniCols, cpu::vnni_panel_stride(kn),
                              w.dq.data(), D, false);
          for (int64_t r = 0; r < rows; ++r) {
            bf16* dqrow = dQ.row(b, h, i0 + r);
            for (int64_t d = 0; d < D; ++d) dqrow[d] = static_cast<bf16>(w.dq[r * D + d]);
          }
        }
      }
      if (fresh) {  // no block had a key: dk, dv = 0
        std::fill(w.dk.begin(), w.dk.end(), 0.f);
        std::fill(w.dv.begin(), w.dv.end(), 0.f);
      }
      for (int64_t j = 0; j < Lk;
           ++j) {  // this task's kv head: every key row, zeros included (vectorized rounding)
        cpu::to_bf16(w.dk.data() + j * D, dK.row(b, g, j), D);
        cpu::to_bf16(w.dv.data() + j * Dv, dV.row(b, g, j), Dv);
      }
    }
  });
}

#else
bool fast_bf16_ok(const at::Tensor&, const at::Tensor&, const at::Tensor&, double) { return false; }
void forward_fast_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Masking&, double,
                       at::Tensor&, at::Tensor&) {}
void backward_fast_bf16(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const Masking&, double, at::Tensor&,
                        at::Tensor&, at::Tensor&) {}
#endif

}  // namespace
}  // namespace mmfast::xattn
