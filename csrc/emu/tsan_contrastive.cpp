// ThreadSanitizer driver for the contrastive kernels: runs kernel.cuh's forward and backward under
// the SIMT emulation (a real thread per CUDA thread, so a missing block_sync() is a data race TSAN
// reports) on small inputs, and checks them against a naive double-precision loop. Torch-free.
//
// Build: g++ -std=c++17 -fsanitize=thread -O1 -g -pthread -Icsrc csrc/emu/tsan_contrastive.cpp
// Run:   ./a.out   -> prints "ok <case>" per case; exits 1 on a numerical mismatch (TSAN itself makes
//        the exit code non-zero and prints "WARNING: ThreadSanitizer: data race" on a race).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "contrastive/launch.cuh"

namespace {

using namespace mmfast::contrastive;
using mmfast::port::bf16_t;

struct Expected {
  double loss, ds, db;
  std::vector<double> dx, dy;
};

// Naive float64 InfoNCE (direction both) or SigLIP, reduction mean, grad_loss = 1.
Expected naive(int loss, const std::vector<double>& x, const std::vector<double>& y, int n, int d, double s,
               double b) {
  std::vector<double> dot(n * n), l(n * n), rl(n, 0), cl(n, 0), dl(n * n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      double acc = 0;
      for (int k = 0; k < d; ++k) acc += x[i * d + k] * y[j * d + k];
      dot[i * n + j] = acc;
      l[i * n + j] = s * acc + (loss == kSigLIP ? b : 0.0);
    }
  Expected e{0, 0, 0, std::vector<double>(n * d, 0), std::vector<double>(n * d, 0)};
  if (loss == kInfoNCE) {
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        rl[i] += std::exp(l[i * n + j]);
        cl[j] += std::exp(l[i * n + j]);
      }
    for (int i = 0; i < n; ++i) e.loss += 0.5 * (std::log(rl[i]) + std::log(cl[i]) - 2 * l[i * n + i]) / n;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        const double p = std::exp(l[i * n + j]) / rl[i], q = std::exp(l[i * n + j]) / cl[j];
        dl[i * n + j] = 0.5 / n * (p + q - 2.0 * (i == j));
      }
  } else {
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        const double z = i == j ? 1 : -1, v = -z * l[i * n + j];
        e.loss += (std::max(v, 0.0) + std::log1p(std::exp(-std::fabs(v)))) / n;
        dl[i * n + j] = -z / (1 + std::exp(-v)) / n;
      }
  }
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      const double g = dl[i * n + j];
      e.ds += g * dot[i * n + j];
      e.db += g;
      for (int k = 0; k < d; ++k) {
        e.dx[i * d + k] += s * g * y[j * d + k];
        e.dy[j * d + k] += s * g * x[i * d + k];
      }
    }
  return e;
}

int failures = 0;

void expect_close(const char* what, double got, double want, double tol) {
  if (!(std::fabs(got - want) <= tol * (1 + std::fabs(want)))) {
    std::printf("MISMATCH %s: got %.8g want %.8g\n", what, got, want);
    ++failures;
  }
}

template <class T>
void run_case(const char* name, int loss, int n, int d, double tol, bool vec) {
  std::mt19937 rng(7 + n + d + loss);
  std::normal_distribution<float> dist;
  std::vector<T> x(n * d), y(n * d);
  std::vector<double> xd(n * d), yd(n * d);
  for (int k = 0; k < n * d; ++k) {
    x[k] = mmfast::port::from_float<T>(0.3f * dist(rng));
    y[k] = mmfast::port::from_float<T>(0.3f * dist(rng));
    xd[k] = mmfast::port::to_float(x[k]);
    yd[k] = mmfast::port::to_float(y[k]);
  }
  float scale = 2.5f, bias = -1.5f;
  Problem pb{x.data(), y.data(), d, d, n, n, d, &scale, &bias, nullptr, loss, kBoth, kMean, false};
  pb.vec = vec && (d * sizeof(T)) % 16 == 0;  // std::vector data is 16-byte aligned
  const int stripes = 2;
  std::vector<int> t(n), u(n);
  std::vector<float> row_stat(n), col_stat(n), col_part(stripes * n * 2), img(n), txt(n), out(1);
  FwdBuffers fb{t.data(),        u.data(),        row_stat.data(),
                col_stat.data(), col_part.data(), img.data(),
                txt.data(),      out.data(),      imin(stripes, row_tiles(n)),
                nullptr};
  forward<T>(pb, fb, 0);

  float grad = 1.0f, norm = 0, dscale = 0, dbias = 0, parts[2] = {0, 0};
  std::vector<float> a(n), c(n), acc_x(n * d, 0.0f), acc_y(n * d, 0.0f), red(kRed * row_tiles(n));
  std::vector<T> dx(n * d), dy(n * d);
  BwdBuffers bb{t.data(),     u.data(),   a.data(),        c.data(),        &norm, acc_x.data(),
                acc_y.data(), red.data(), row_stat.data(), col_stat.data(), &grad, dx.data(),
                dy.data(),    parts,      &dscale,         &dbias,          true,  true};
  backward<T>(pb, bb, 0);

  const Expected e = naive(loss, xd, yd, n, d, scale, bias);
  const int before = failures;
  expect_close("loss", out[0], e.loss, tol);
  expect_close("dscale", dscale, e.ds, tol);
  if (loss == kSigLIP) expect_close("dbias", dbias, e.db, tol);
  for (int k = 0; k < n * d; ++k) {
    expect_close("dx", mmfast::port::to_float(dx[k]), e.dx[k], tol);
    expect_close("dy", mmfast::port::to_float(dy[k]), e.dy[k], tol);
  }
  std::printf("%s %s\n", failures == before ? "ok" : "FAILED", name);
}

}  // namespace

int main() {
  // 70 rows: two row tiles on two stripes, two column tiles; D = 40: two feature chunks.
  run_case<float>("info_nce fp32 n=70 d=40 (element loads)", kInfoNCE, 70, 40, 1e-4, false);
  run_case<bf16_t>("info_nce bf16 n=70 d=40 (cp.async + mma)", kInfoNCE, 70, 40, 3e-2, true);
  run_case<bf16_t>("siglip bf16 n=33 d=24 (cp.async + mma)", kSigLIP, 33, 24, 3e-2, true);
  return failures ? 1 : 0;
}
