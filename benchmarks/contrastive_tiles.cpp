// Per-product rates of the contrastive loss's tile loop (fp32 or bf16), without torch.
//
// The loss (csrc/contrastive/, AVX-512 and vdpbf16ps paths) spends most of its time in four tile
// products of common/cpu_gemm_f32.h (fp32) or common/cpu_gemm_bf16.h (bf16): the forward's logits,
// and the backward's logits, grad_x and grad_y. On a shared 2-core host a whole-loss timing moves by
// 5-30% from run to run, far more than a change to one product's cache behaviour. This program
// replays the loss's loop order with the same kernels and operand layouts (T threads in T phases,
// 256 x 256 tiles; fp32: x and y row-major, yᵀ and y packed once, x_blk packed per row block; bf16:
// yᵀ, y and x packed in k-pairs once) and times every product call. The median over the calls of a
// product hardly moves when another process takes a core for a while, so two layouts can be compared
// in one sitting (benchmarks/PERFORMANCE.md). The epilogues are replaced by a store of G = U / 1000
// (bf16: G and Gᵀ in bf16, as the loss's gradient epilogue stores them), so the figures are the
// products' own.
//
//   g++ -O3 -mavx2 -mfma -fopenmp -Icsrc benchmarks/contrastive_tiles.cpp csrc/common/cpu_gemm_f32.cpp \
//       csrc/common/cpu_gemm_bf16.cpp -o /tmp/tiles
//   OMP_NUM_THREADS=2 /tmp/tiles [--n 8192] [--d 512] [--reps 3] [--bf16] [--rowmajor-x] [--small-pages]
//   /tmp/tiles --check            small shapes against a float64 reference, exit code 1 on mismatch
//
// --bf16: the vdpbf16ps products (needs AVX512_BF16).
// --rowmajor-x: fp32 grad_y reads x_blk in place (the older layout; the loss packs it per row block).
// --small-pages: the fp32 packed operands on 4 KB pages (the loss takes them from 2 MB pages).
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/cpu_gemm_bf16.h"
#include "common/cpu_gemm_f32.h"

namespace {

namespace cpu = mmfast::cpu;
using cpu::kF32Cols;

constexpr int64_t BN = 256, BM = 256;  // the loss's tile

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A buffer of n elements of T on 2 MB pages (madvise) or ordinary ones, 2 MB aligned either way.
template <typename T>
struct Buffer {
  T* p = nullptr;
  size_t bytes = 0;
  Buffer(size_t n, bool huge) : bytes((n * sizeof(T) + (2u << 20) - 1) & ~size_t((2u << 20) - 1)) {
    p = static_cast<T*>(std::aligned_alloc(2u << 20, std::max<size_t>(bytes, 2u << 20)));
    if (p == nullptr) std::abort();
    if (huge) madvise(p, bytes, MADV_HUGEPAGE);
    std::memset(p, 0, bytes);
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// The fp32 logits' epilogue: G = U / 1000 stored (the loss computes its softmax gradient here).
struct StoreG : cpu::NoBegin {
  float* G;
  int64_t ldg;
  template <int MR>
  __attribute__((target("avx512f"))) void operator()(int64_t i, int64_t j, __m512 (&acc)[MR][2], __mmask16 m0,
                                                     __mmask16 m1) {
    const __m512 c = _mm512_set1_ps(1e-3f);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      _mm512_mask_storeu_ps(G + (i + r) * ldg + j, m0, _mm512_mul_ps(acc[r][0], c));
      _mm512_mask_storeu_ps(G + (i + r) * ldg + j + 16, m1, _mm512_mul_ps(acc[r][1], c));
    }
  }
};

// The bf16 one: G = U / 1000 in bf16, by rows (grad_x's A) and by columns (grad_y's A).
struct StoreGBf16 : cpu::NoBegin {
  uint16_t* G;
  uint16_t* Gt;
  template <int MR>
  __attribute__((target("avx512f"))) void operator()(int64_t i, int64_t j, __m512 (&acc)[MR][2], __mmask16 m0,
                                                     __mmask16 m1) {
    const __m512 c = _mm512_set1_ps(1e-3f);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      acc[r][0] = _mm512_mul_ps(acc[r][0], c), acc[r][1] = _mm512_mul_ps(acc[r][1], c);
    cpu::store_bf16_tile<MR>(acc, m0, m1, i, j, G, BM, Gt, BN);
  }
};

struct Options {
  int64_t n = 8192, d = 512;
  int reps = 3;
  bool bf16 = false, rowmajor_x = false, small_pages = false;
};

// The fp32 products on the loss's operands. Per thread: the U / G tile, x_blk packed.
struct F32Loss {
  const Options& o;
  const float *x, *yt, *yr;  // x row-major; yᵀ and y packed
  float *dx, *dy;
  struct Scratch {
    std::vector<float> U = std::vector<float>(BN * BM);
    Buffer<float> xp;
    explicit Scratch(const Options& o) : xp(cpu::f32_packed_size(BN, o.d), !o.small_pages) {}
  };
  void logits(Scratch& w, int64_t i0, int64_t bn, int64_t j0, int64_t bm) const {
    StoreG epi{{}, w.U.data(), BM};
    cpu::gemm_f32_epilogue(bn, bm, o.d, x + i0 * o.d, o.d, 1, yt + j0 * o.d, kF32Cols, o.d * kF32Cols, epi);
  }
  void row_block(Scratch& w, int64_t i0, int64_t bn) const {
    if (!o.rowmajor_x)
      cpu::pack_f32(x + i0 * o.d, o.d, 1, bn, o.d, w.xp.p, 0, (o.d + kF32Cols - 1) / kF32Cols);
  }
  void grad_x(Scratch& w, int64_t i0, int64_t bn, int64_t j0, int64_t bm, bool acc) const {
    cpu::gemm_f32(bn, o.d, bm, 0.5f, w.U.data(), BM, 1, yr + j0 * kF32Cols, kF32Cols, o.n * kF32Cols,
                  dx + i0 * o.d, o.d, acc);
  }
  void grad_y(Scratch& w, int64_t i0, int64_t bn, int64_t j0, int64_t bm, bool acc) const {
    if (o.rowmajor_x) {
      cpu::gemm_f32(bm, o.d, bn, 0.5f, w.U.data(), 1, BM, x + i0 * o.d, o.d, kF32Cols, dy + j0 * o.d, o.d,
                    acc);
    } else {
      cpu::gemm_f32(bm, o.d, bn, 0.5f, w.U.data(), 1, BM, w.xp.p, kF32Cols, bn * kF32Cols, dy + j0 * o.d, o.d,
                    acc);
    }
  }
};

// The bf16 products: x row-major bf16, yᵀ, y, x packed in k-pairs; fp32 dx, dy.
struct Bf16Loss {
  const Options& o;
  const uint16_t *x, *yt, *yr, *xr;
  float *dx, *dy;
  struct Scratch {
    std::vector<uint16_t> G = std::vector<uint16_t>(BN * BM), Gt = std::vector<uint16_t>(BM * BN);
    explicit Scratch(const Options&) {}
  };
  void logits(Scratch& w, int64_t i0, int64_t bn, int64_t j0, int64_t bm) const {
    const int64_t ps = cpu::vnni_panel_stride(o.d);
    StoreGBf16 epi{{}, w.G.data(), w.Gt.data()};
    cpu::gemm_bf16_vnni_epilogue(bn, bm, o.d, x + i0 * o.d, o.d, yt + j0 / cpu::kVnniCols * ps, ps, epi);
  }
  void row_block(Scratch&, int64_t, int64_t) const {}
  void grad_x(Scratch& w, int64_t i0, int64_t bn, int64_t j0, int64_t bm, bool acc) const {
    cpu::gemm_bf16_vnni(bn, o.d, bm, 0.5f, w.G.data(), BM, yr + j0 * cpu::kVnniCols,
                        cpu::vnni_panel_stride(o.n), dx + i0 * o.d, o.d, acc);
  }
  void grad_y(Scratch& w, int64_t i0, int64_t bn, int64_t j0, int64_t bm, bool acc) const {
    cpu::gemm_bf16_vnni(bm, o.d, bn, 0.5f, w.Gt.data(), BN, xr + i0 * cpu::kVnniCols,
                        cpu::vnni_panel_stride(o.n), dy + j0 * o.d, o.d, acc);
  }
};

struct Times {
  std::vector<double> fwd, logits, dx, dy;  // seconds per tile product
  double fwd_s = 0, bwd_s = 0;
};

// One forward (logits only) and one backward (logits, dx += s G y_blk, dy += s Gᵀ x_blk) over the
// tiles, in the loss's order. dx and dy are overwritten by each block's first product.
template <typename Loss>
Times run(const Loss& L) {
  const int64_t N = L.o.n, M = L.o.n;
  const int T = omp_get_max_threads();
  const int64_t row_blocks = (N + BN - 1) / BN, col_blocks = (M + BM - 1) / BM;
  const int64_t chunk_blocks = (row_blocks + T - 1) / T;
  std::vector<Times> per(T);
  Times out;
  double t0 = now();
#pragma omp parallel num_threads(T)
  {
    const int c = omp_get_thread_num();
    typename Loss::Scratch w(L.o);
    for (int64_t ib = c * chunk_blocks; ib < std::min(row_blocks, (c + 1) * chunk_blocks); ++ib) {
      const int64_t i0 = ib * BN, bn = std::min(BN, N - i0);
      for (int64_t j0 = 0; j0 < M; j0 += BM) {
        const double a = now();
        L.logits(w, i0, bn, j0, std::min(BM, M - j0));
        per[c].fwd.push_back(now() - a);
      }
    }
  }
  double t1 = now();
  std::vector<char> dx_on(row_blocks, 0), dy_on(col_blocks, 0);
  for (int p = 0; p < T; ++p) {
#pragma omp parallel num_threads(T)
    {
      const int c = omp_get_thread_num();
      typename Loss::Scratch w(L.o);
      const int64_t q = (c + p) % T;
      for (int64_t ib = c * chunk_blocks; ib < std::min(row_blocks, (c + 1) * chunk_blocks); ++ib) {
        const int64_t i0 = ib * BN, bn = std::min(BN, N - i0);
        L.row_block(w, i0, bn);
        for (int64_t jb = q * col_blocks / T; jb < (q + 1) * col_blocks / T; ++jb) {
          const int64_t j0 = jb * BM, bm = std::min(BM, M - j0);
          const double a = now();
          L.logits(w, i0, bn, j0, bm);
          const double b = now();
          L.grad_x(w, i0, bn, j0, bm, dx_on[ib] != 0);
          const double e = now();
          L.grad_y(w, i0, bn, j0, bm, dy_on[jb] != 0);
          const double f = now();
          dx_on[ib] = dy_on[jb] = 1;
          per[c].logits.push_back(b - a);
          per[c].dx.push_back(e - b);
          per[c].dy.push_back(f - e);
        }
      }
    }
  }
  double t2 = now();
  for (const Times& t : per) {
    out.fwd.insert(out.fwd.end(), t.fwd.begin(), t.fwd.end());
    out.logits.insert(out.logits.end(), t.logits.begin(), t.logits.end());
    out.dx.insert(out.dx.end(), t.dx.begin(), t.dx.end());
    out.dy.insert(out.dy.end(), t.dy.begin(), t.dy.end());
  }
  out.fwd_s = t1 - t0;
  out.bwd_s = t2 - t1;
  return out;
}

uint16_t to_bf16(float f) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
float from_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The user's x, y (n x d, ordinary pages), the packed operands and dx, dy of one problem, and a run.
struct Problem {
  Options o;
  Buffer<float> x, y, dx, dy;
  explicit Problem(const Options& opt, float scale, unsigned seed)
      : o(opt),
        x(opt.n * opt.d, false),
        y(opt.n * opt.d, false),
        dx(opt.n * opt.d, true),
        dy(opt.n * opt.d, true) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> ud(-scale, scale);
    for (int64_t k = 0; k < o.n * o.d; ++k) x.p[k] = ud(rng), y.p[k] = ud(rng);
    if (o.bf16) {  // the bf16 inputs, exactly representable
      for (int64_t k = 0; k < o.n * o.d; ++k)
        x.p[k] = from_bf16(to_bf16(x.p[k])), y.p[k] = from_bf16(to_bf16(y.p[k]));
    }
  }
  Times run_once() {
    const int64_t n = o.n, d = o.d;
    if (!o.bf16) {
      Buffer<float> yt(cpu::f32_packed_size(d, n), !o.small_pages),
          yr(cpu::f32_packed_size(n, d), !o.small_pages);
      cpu::pack_f32(y.p, 1, d, d, n, yt.p, 0, (n + kF32Cols - 1) / kF32Cols);
      cpu::pack_f32(y.p, d, 1, n, d, yr.p, 0, (d + kF32Cols - 1) / kF32Cols);
      return run(F32Loss{o, x.p, yt.p, yr.p, dx.p, dy.p});
    }
    std::vector<uint16_t> xb(n * d), yb(n * d);
    for (int64_t k = 0; k < n * d; ++k) xb[k] = to_bf16(x.p[k]), yb[k] = to_bf16(y.p[k]);
    std::vector<uint16_t> yt(cpu::vnni_packed_size(d, n)), yr(cpu::vnni_packed_size(n, d)), xr(yr.size());
    const int64_t pn = (n + cpu::kVnniCols - 1) / cpu::kVnniCols,
                  pd = (d + cpu::kVnniCols - 1) / cpu::kVnniCols;
    cpu::pack_vnni(yb.data(), 1, d, d, n, yt.data(), 0, pn);
    cpu::pack_vnni(yb.data(), d, 1, n, d, yr.data(), 0, pd);
    cpu::pack_vnni(xb.data(), d, 1, n, d, xr.data(), 0, pd);
    return run(Bf16Loss{o, xb.data(), yt.data(), yr.data(), xr.data(), dx.p, dy.p});
  }
};

// Per-call rate quantiles of one product (GFLOP/s per core, full 256 x 256 tiles only).
void report(const char* name, std::vector<double> t, double flops) {
  std::sort(t.begin(), t.end());
  const size_t n = t.size();
  std::printf("  %-7s per call GFLOP/s per core: q10 %6.1f  median %6.1f  q90 %6.1f  (%zu calls)\n", name,
              flops / t[n - 1 - n / 10], flops / t[n / 2], flops / t[n / 10], n);
}

// dx = 0.5 G y, dy = 0.5 Gᵀ x with G = (x yᵀ) / 1000, odd sizes (partial tiles and panels), against
// float64 (G rounded as the kernel rounds it: to fp32, or to bf16 for the bf16 products).
bool check_one(const Options& o) {
  Problem pr(o, 1.f, unsigned(o.n * 31 + o.d + o.rowmajor_x + 2 * o.small_pages + 4 * o.bf16));
  pr.run_once();
  const int64_t n = o.n, d = o.d;
  const float* x = pr.x.p;
  const float* y = pr.y.p;
  std::vector<double> G(n * n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double u = 0;
      for (int64_t k = 0; k < d; ++k) u += double(x[i * d + k]) * y[j * d + k];
      const float g = float(u) * 1e-3f;
      G[i * n + j] = o.bf16 ? from_bf16(to_bf16(g)) : g;
    }
  double err = 0, scale = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) {
      double rx = 0, ry = 0;
      for (int64_t j = 0; j < n; ++j) {
        rx += G[i * n + j] * y[j * d + k];
        ry += G[j * n + i] * x[j * d + k];
      }
      err = std::max({err, std::abs(0.5 * rx - pr.dx.p[i * d + k]), std::abs(0.5 * ry - pr.dy.p[i * d + k])});
      scale = std::max({scale, std::abs(0.5 * rx), std::abs(0.5 * ry)});
    }
  // fp32: summation order only; bf16: G's rounding may differ where U's fp32 sum does (one bf16 ulp).
  const bool ok = err <= (o.bf16 ? 2e-3 : 1e-5) * scale;
  std::printf("check %s n=%lld d=%lld rowmajor_x=%d small_pages=%d: max error %.2e of %.2e %s\n",
              o.bf16 ? "bf16" : "fp32", (long long)n, (long long)d, o.rowmajor_x, o.small_pages, err, scale,
              ok ? "ok" : "MISMATCH");
  return ok;
}

int check(bool bf16) {
  int bad = 0;
  for (const auto [n, d] : {std::pair<int64_t, int64_t>{300, 72}, {513, 40}, {256, 512}}) {
    for (int mode = 0; mode < (bf16 ? 1 : 4); ++mode) {
      Options o;
      o.n = n, o.d = d, o.rowmajor_x = mode & 1, o.small_pages = mode & 2, o.bf16 = bf16;
      bad += !check_one(o);
    }
  }
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("this CPU has no AVX-512F: nothing to measure\n");
    return 0;
  }
  const bool has_bf16 = __builtin_cpu_supports("avx512bf16");
  Options o;
  for (int k = 1; k < argc; ++k) {
    const std::string a = argv[k];
    if (a == "--check") return check(false) + (has_bf16 ? check(true) : 0) == 0 ? 0 : 1;
    if (a == "--rowmajor-x") {
      o.rowmajor_x = true;
    } else if (a == "--small-pages") {
      o.small_pages = true;
    } else if (a == "--bf16") {
      o.bf16 = true;
    } else if ((a == "--n" || a == "--d" || a == "--reps") && k + 1 < argc && std::atol(argv[k + 1]) > 0) {
      const long v = std::atol(argv[++k]);
      if (a == "--n") o.n = v;
      if (a == "--d") o.d = v;
      if (a == "--reps") o.reps = int(v);
    } else {
      std::fprintf(stderr,
                   "usage: %s [--n N] [--d D] [--reps R] [--bf16] [--rowmajor-x] [--small-pages] | --check\n",
                   argv[0]);
      return 2;
    }
  }
  if (o.bf16 && !has_bf16) {
    std::printf("this CPU has no AVX512_BF16: nothing to measure\n");
    return 0;
  }
  Problem pr(o, 0.05f, 0);
  const int64_t N = o.n, D = o.d;
  const double tile = 2.0 * BN * BM * D / 1e9, total = 8.0 * N * N * D / 1e9;
  std::printf("N = M = %lld, D = %lld, %d threads, %s\n", (long long)N, (long long)D, omp_get_max_threads(),
              o.bf16         ? "bf16 (vdpbf16ps), packs on 4 KB pages"
              : o.rowmajor_x ? (o.small_pages ? "fp32, x_blk row-major, packs on 4 KB pages"
                                              : "fp32, x_blk row-major, packs on 2 MB pages")
                             : (o.small_pages ? "fp32, x_blk packed, packs on 4 KB pages"
                                              : "fp32, x_blk packed, packs on 2 MB pages"));
  for (int r = 0; r < o.reps; ++r) {
    const Times t = pr.run_once();
    std::printf("rep %d: forward %.3f s, backward %.3f s, %.1f GFLOP/s over the 4 products\n", r, t.fwd_s,
                t.bwd_s, total / (t.fwd_s + t.bwd_s));
    if (N % BN == 0) {
      report("fwd", t.fwd, tile);
      report("logits", t.logits, tile);
      report("grad_x", t.dx, tile);
      report("grad_y", t.dy, tile);
    }
  }
  return 0;
}
