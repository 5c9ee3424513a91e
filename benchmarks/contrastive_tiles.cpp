// Per-product rates of the fp32 contrastive loss's tile loop, without torch.
//
// The loss (csrc/contrastive/cpu.cpp, AVX-512 path) spends ~95% of its time in four tile products
// of common/cpu_gemm_f32.h: the forward's logits, and the backward's logits, grad_x and grad_y. On a
// shared 2-core host a whole-loss timing moves by 5-30% from run to run, far more than a change to
// one product's cache behaviour. This program replays the loss's loop order with the same kernels
// and operand layouts (x and y row-major, yᵀ and y packed once, x_blk packed per row block, T
// threads in T phases, 256 x 256 tiles) and times every product call. The median over the calls of
// a product hardly moves when another process takes a core for a while, so two layouts can be
// compared in one sitting (benchmarks/PERFORMANCE.md). The epilogues are replaced by a store of
// G = U / 1000, so the figures are the products' own.
//
//   g++ -O3 -mavx2 -mfma -fopenmp -Icsrc benchmarks/contrastive_tiles.cpp csrc/common/cpu_gemm_f32.cpp \
//       -o /tmp/tiles
//   OMP_NUM_THREADS=2 /tmp/tiles [--n 8192] [--d 512] [--reps 3] [--rowmajor-x] [--small-pages]
//   /tmp/tiles --check            small shapes against a float64 reference, exit code 1 on mismatch
//
// --rowmajor-x: grad_y reads x_blk in place (the older layout; the loss packs it per row block).
// --small-pages: the packed operands on 4 KB pages (the loss takes them from 2 MB pages).
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

#include "common/cpu_gemm_f32.h"

namespace {

using mmfast::cpu::f32_packed_size;
using mmfast::cpu::gemm_f32;
using mmfast::cpu::gemm_f32_epilogue;
using mmfast::cpu::kF32Cols;
using mmfast::cpu::pack_f32;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A float buffer on 2 MB pages (madvise) or ordinary ones, 2 MB aligned either way.
struct Buffer {
  float* p = nullptr;
  size_t bytes = 0;
  Buffer(size_t n, bool huge) : bytes((n * sizeof(float) + (2u << 20) - 1) & ~size_t((2u << 20) - 1)) {
    p = static_cast<float*>(std::aligned_alloc(2u << 20, bytes));
    if (p == nullptr) std::abort();
    if (huge) madvise(p, bytes, MADV_HUGEPAGE);
    std::memset(p, 0, bytes);
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// The logits' epilogue: G = U / 1000 stored (the loss computes its softmax gradient here).
struct StoreG : mmfast::cpu::NoBegin {
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

struct Options {
  int64_t n = 8192, d = 512;
  int reps = 3;
  bool rowmajor_x = false, small_pages = false;
};

struct Times {
  std::vector<double> fwd, logits, dx, dy;  // seconds per tile product
  double fwd_s = 0, bwd_s = 0;
};

// One forward (logits only) and one backward (logits, dx += s G y_blk, dy += s Gᵀ x_blk) over the
// tiles, in the loss's order. dx and dy are overwritten by each block's first product.
Times run(const Options& o, const float* x, const float* y, const float* yt, const float* yr, float* dx,
          float* dy) {
  const int64_t N = o.n, M = o.n, D = o.d, BN = 256, BM = 256;
  const int T = omp_get_max_threads();
  const int64_t row_blocks = (N + BN - 1) / BN, col_blocks = (M + BM - 1) / BM;
  const int64_t chunk_blocks = (row_blocks + T - 1) / T;
  std::vector<Times> per(T);
  Times out;
  double t0 = now();
#pragma omp parallel num_threads(T)
  {
    const int c = omp_get_thread_num();
    std::vector<float> U(BN * BM);
    StoreG epi{{}, U.data(), BM};
    for (int64_t ib = c * chunk_blocks; ib < std::min(row_blocks, (c + 1) * chunk_blocks); ++ib) {
      const int64_t i0 = ib * BN, bn = std::min(BN, N - i0);
      for (int64_t j0 = 0; j0 < M; j0 += BM) {
        const double a = now();
        gemm_f32_epilogue(bn, std::min(BM, M - j0), D, x + i0 * D, D, 1, yt + j0 * D, kF32Cols, D * kF32Cols,
                          epi);
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
      std::vector<float> U(BN * BM);
      Buffer xp(f32_packed_size(BN, D), !o.small_pages);
      StoreG epi{{}, U.data(), BM};
      const int64_t q = (c + p) % T;
      for (int64_t ib = c * chunk_blocks; ib < std::min(row_blocks, (c + 1) * chunk_blocks); ++ib) {
        const int64_t i0 = ib * BN, bn = std::min(BN, N - i0);
        if (!o.rowmajor_x) pack_f32(x + i0 * D, D, 1, bn, D, xp.p, 0, (D + kF32Cols - 1) / kF32Cols);
        for (int64_t jb = q * col_blocks / T; jb < (q + 1) * col_blocks / T; ++jb) {
          const int64_t j0 = jb * BM, bm = std::min(BM, M - j0);
          const double a = now();
          gemm_f32_epilogue(bn, bm, D, x + i0 * D, D, 1, yt + j0 * D, kF32Cols, D * kF32Cols, epi);
          const double b = now();
          gemm_f32(bn, D, bm, 0.5f, U.data(), BM, 1, yr + j0 * kF32Cols, kF32Cols, M * kF32Cols, dx + i0 * D,
                   D, dx_on[ib] != 0);
          const double e = now();
          if (o.rowmajor_x) {
            gemm_f32(bm, D, bn, 0.5f, U.data(), 1, BM, x + i0 * D, D, kF32Cols, dy + j0 * D, D,
                     dy_on[jb] != 0);
          } else {
            gemm_f32(bm, D, bn, 0.5f, U.data(), 1, BM, xp.p, kF32Cols, bn * kF32Cols, dy + j0 * D, D,
                     dy_on[jb] != 0);
          }
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

// Per-call rate quantiles of one product (GFLOP/s per core, full 256 x 256 tiles only).
void report(const char* name, std::vector<double> t, double flops) {
  std::sort(t.begin(), t.end());
  const size_t n = t.size();
  std::printf("  %-7s per call GFLOP/s per core: q10 %6.1f  median %6.1f  q90 %6.1f  (%zu calls)\n", name,
              flops / t[n - 1 - n / 10], flops / t[n / 2], flops / t[n / 10], n);
}

int check() {
  // dx = 0.5 G y, dy = 0.5 Gᵀ x with G = (x yᵀ) / 1000, odd sizes (partial tiles and panels).
  int bad = 0;
  for (const auto [n, d] : {std::pair<int64_t, int64_t>{300, 72}, {513, 40}, {256, 512}}) {
    for (int mode = 0; mode < 4; ++mode) {
      Options o;
      o.n = n;
      o.d = d;
      o.rowmajor_x = mode & 1;
      o.small_pages = mode & 2;
      std::mt19937 rng(n * 31 + d + mode);
      std::normal_distribution<float> nd;
      Buffer x(n * d, false), y(n * d, false), yt(f32_packed_size(d, n), true),
          yr(f32_packed_size(n, d), true);
      Buffer dx(n * d, true), dy(n * d, true);
      for (int64_t k = 0; k < n * d; ++k) x.p[k] = nd(rng), y.p[k] = nd(rng);
      pack_f32(y.p, 1, d, d, n, yt.p, 0, (n + kF32Cols - 1) / kF32Cols);
      pack_f32(y.p, d, 1, n, d, yr.p, 0, (d + kF32Cols - 1) / kF32Cols);
      run(o, x.p, y.p, yt.p, yr.p, dx.p, dy.p);
      std::vector<double> G(n * n);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double u = 0;
          for (int64_t k = 0; k < d; ++k) u += double(x.p[i * d + k]) * y.p[j * d + k];
          G[i * n + j] = float(float(u) * 1e-3f);  // the kernel rounds U, then G, to fp32
        }
      double err = 0, scale = 0;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < d; ++k) {
          double rx = 0, ry = 0;
          for (int64_t j = 0; j < n; ++j) {
            rx += G[i * n + j] * y.p[j * d + k];
            ry += G[j * n + i] * x.p[j * d + k];
          }
          err = std::max({err, std::abs(0.5 * rx - dx.p[i * d + k]), std::abs(0.5 * ry - dy.p[i * d + k])});
          scale = std::max({scale, std::abs(0.5 * rx), std::abs(0.5 * ry)});
        }
      const bool ok = err <= 1e-5 * scale;
      bad += !ok;
      std::printf("check n=%lld d=%lld rowmajor_x=%d small_pages=%d: max error %.2e of %.2e %s\n",
                  (long long)n, (long long)d, mode & 1, mode >> 1, err, scale, ok ? "ok" : "MISMATCH");
    }
  }
  return bad == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("this CPU has no AVX-512F: nothing to measure\n");
    return 0;
  }
  Options o;
  for (int k = 1; k < argc; ++k) {
    const std::string a = argv[k];
    if (a == "--check") return check();
    if (a == "--rowmajor-x") {
      o.rowmajor_x = true;
    } else if (a == "--small-pages") {
      o.small_pages = true;
    } else if ((a == "--n" || a == "--d" || a == "--reps") && k + 1 < argc && std::atol(argv[k + 1]) > 0) {
      const long v = std::atol(argv[++k]);
      if (a == "--n") o.n = v;
      if (a == "--d") o.d = v;
      if (a == "--reps") o.reps = int(v);
    } else {
      std::fprintf(stderr, "usage: %s [--n N] [--d D] [--reps R] [--rowmajor-x] [--small-pages] | --check\n",
                   argv[0]);
      return 2;
    }
  }
  const int64_t N = o.n, D = o.d;
  Buffer x(N * D, false), y(N * D, false);  // the user's tensors: ordinary pages
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> ud(-0.05f, 0.05f);
  for (int64_t k = 0; k < N * D; ++k) x.p[k] = ud(rng), y.p[k] = ud(rng);
  Buffer yt(f32_packed_size(D, N), !o.small_pages), yr(f32_packed_size(N, D), !o.small_pages);
  Buffer dx(N * D, true), dy(N * D, true);  // the loss's gradients are on 2 MB pages
  pack_f32(y.p, 1, D, D, N, yt.p, 0, (N + kF32Cols - 1) / kF32Cols);
  pack_f32(y.p, D, 1, N, D, yr.p, 0, (D + kF32Cols - 1) / kF32Cols);
  const double tile = 2.0 * 256 * 256 * D / 1e9, total = 8.0 * N * N * D / 1e9;
  std::printf("N = M = %lld, D = %lld, %d threads, x_blk %s, packs on %s pages\n", (long long)N, (long long)D,
              omp_get_max_threads(), o.rowmajor_x ? "row-major" : "packed", o.small_pages ? "4 KB" : "2 MB");
  for (int r = 0; r < o.reps; ++r) {
    const Times t = run(o, x.p, y.p, yt.p, yr.p, dx.p, dy.p);
    std::printf("rep %d: forward %.3f s, backward %.3f s, %.1f GFLOP/s over the 4 products\n", r, t.fwd_s,
                t.bwd_s, total / (t.fwd_s + t.bwd_s));
    if (N % 256 == 0) {
      report("fwd", t.fwd, tile);
      report("logits", t.logits, tile);
      report("grad_x", t.dx, tile);
      report("grad_y", t.dy, tile);
    }
  }
  return 0;
}
