// Unit tests of the SIMT emulation (csrc/common/emu.h through portable.cuh), torch-free.
//
// Build: g++ -std=c++17 -O1 -g -pthread -Icsrc csrc/emu/emu_selftest.cpp -o emu_selftest
// Run:   ./emu_selftest [test ...]   (no argument: every test). Prints "PASS name" or "FAIL name: why"
//        per test and exits non-zero when any test fails. tests/test_emulation.py drives it.
//
// Each test is a small kernel written against portable.cuh, exactly like real device code, and an
// independent host-side expectation (plain loops; the PTX fragment layouts are NOT used to build the
// expectation, so a wrong layout in the emulation shows up as a mismatch).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/portable.cuh"

using namespace mmfast::port;
using mmfast::emu::Dim3;

namespace {

std::string g_why;  // failure message of the current test

bool check(bool ok, const std::string& why) {
  if (!ok && g_why.empty()) g_why = why;
  return ok;
}

// ---- shuffles ---------------------------------------------------------------------------------

// Butterfly sum with shfl_xor: every lane ends with the warp's total; shfl broadcasts lane 5's value,
// and reads the lane above (rotation).
void shuffle_kernel(float* sums, int* rot, float* bcast) {
  const int t = thread_x(), l = lane_id();
  float v = static_cast<float>(t * t % 37);
  for (int m = 16; m >= 1; m /= 2) v += shfl_xor(v, m);
  sums[t] = v;
  rot[t] = shfl(t, (l + 1) % 32);
  bcast[t] = shfl(static_cast<float>(t) * 0.5f, 5);
}

bool test_shuffle() {
  const int n = 64;
  std::vector<float> sums(n), bcast(n);
  std::vector<int> rot(n);
  MMFAST_LAUNCH(shuffle_kernel, Dim3(1), Dim3(n), 0, 0, sums.data(), rot.data(), bcast.data());
  bool ok = true;
  for (int t = 0; t < n; ++t) {
    const int w = t / 32;
    float want = 0;
    for (int u = 32 * w; u < 32 * w + 32; ++u) want += static_cast<float>(u * u % 37);
    ok &= check(sums[t] == want, "shfl_xor sum, thread " + std::to_string(t));
    ok &= check(rot[t] == 32 * w + (t % 32 + 1) % 32, "shfl rotation, thread " + std::to_string(t));
    ok &= check(bcast[t] == (32 * w + 5) * 0.5f, "shfl broadcast, thread " + std::to_string(t));
  }
  return ok;
}

// ---- barriers ---------------------------------------------------------------------------------

// Ring relay through shared memory: in each round every thread reads its neighbour's value from the
// previous round. Without the barriers the values are wrong (and TSAN reports the race).
void barrier_kernel(int* out, int rounds) {
  int* s = dynamic_smem<int>();
  const int t = thread_x(), n = block_dim_x();
  s[t] = t + 1000 * block_x();
  block_sync();
  for (int r = 0; r < rounds; ++r) {
    const int v = s[(t + 1) % n] + 1;
    block_sync();
    s[t] = v;
    block_sync();
  }
  out[block_x() * n + t] = s[t];
}

bool test_barrier() {
  const int n = 96, blocks = 3, rounds = 7;
  std::vector<int> out(n * blocks, -1);
  MMFAST_LAUNCH(barrier_kernel, Dim3(blocks), Dim3(n), n * sizeof(int), 0, out.data(), rounds);
  bool ok = true;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < n; ++t)
      ok &= check(out[b * n + t] == (t + rounds) % n + 1000 * b + rounds,
                  "relay value at block " + std::to_string(b) + " thread " + std::to_string(t));
  return ok;
}

// ---- indices ---------------------------------------------------------------------------------

void index_kernel(int* out) {
  const int t = thread_x() + block_dim_x() * thread_y();
  const int b = block_x() + grid_dim_x() * block_y();
  out[b * block_dim_x() * block_dim_y() + t] = 10000 * b + 100 * thread_y() + thread_x() + 0 * lane_id();
}

bool test_indices() {
  std::vector<int> out(2 * 3 * 32 * 2, -1);
  MMFAST_LAUNCH(index_kernel, Dim3(2, 3), Dim3(32, 2), 0, 0, out.data());
  bool ok = true;
  for (int b = 0; b < 6; ++b)
    for (int y = 0; y < 2; ++y)
      for (int x = 0; x < 32; ++x)
        ok &= check(out[b * 64 + y * 32 + x] == 10000 * b + 100 * y + x, "index " + std::to_string(b));
  return ok;
}

// ---- conversions -------------------------------------------------------------------------------

bool test_convert() {
  bool ok = true;
  // bf16: round to nearest even on the upper 16 bits.
  ok &= check(to_float(from_float<bf16_t>(1.0f)) == 1.0f, "bf16 1.0");
  ok &= check(to_float(from_float<bf16_t>(1.0f + 1.0f / 256)) == 1.0f, "bf16 tie to even (down)");
  ok &= check(to_float(from_float<bf16_t>(1.0f + 3.0f / 256)) == 1.0f + 4.0f / 256, "bf16 tie to even (up)");
  ok &= check(std::isnan(to_float(from_float<bf16_t>(NAN))), "bf16 NaN");
  ok &= check(std::isinf(to_float(from_float<bf16_t>(INFINITY))), "bf16 inf");
  ok &= check(to_float(from_float<half_t>(65504.0f)) == 65504.0f, "fp16 max");
  ok &= check(std::isinf(to_float(from_float<half_t>(70000.0f))), "fp16 overflow");
  ok &= check(to_float(from_float<half_t>(1.0f + 1.0f / 2048)) == 1.0f, "fp16 tie to even");
  ok &= check(to_float(from_float<half_t>(5.96046448e-08f)) == 5.96046448e-08f, "fp16 subnormal");
  const uint32_t r = pack2<bf16_t>(1.5f, -2.0f);
  ok &= check(unpack<bf16_t>(r, 0) == 1.5f && unpack<bf16_t>(r, 1) == -2.0f, "pack2 order (lo first)");
  return ok;
}

// ---- mma + ldmatrix ---------------------------------------------------------------------------

// C (M x N, fp32, row-major) = A (M x K, row-major) * B^T where B is stored (N x K) ("nk") or
// B' (K x N) ("kn", loaded with ldmatrix .trans). One warp per 16-row strip, tiles of 16x8x16.
// Shared layout: A [M][K], B [N][K] or [K][N], 16-bit elements.
struct MmaArgs {
  const uint16_t* a;  // M x K
  const uint16_t* b;  // N x K (nk) or K x N (kn)
  float* c;           // M x N
  int m, n, k;
  bool b_kn;
};

template <class T>
void mma_kernel(MmaArgs p) {
  uint16_t* sa = dynamic_smem<uint16_t>();
  uint16_t* sb = sa + p.m * p.k;
  const int t = thread_x(), nt = block_dim_x();
  // Stage both operands in shared memory with cp.async (16 bytes = 8 elements per copy).
  for (int i = t; i < p.m * p.k / 8; i += nt) cp_async_16(sa + 8 * i, p.a + 8 * i);
  for (int i = t; i < p.n * p.k / 8; i += nt) cp_async_16(sb + 8 * i, p.b + 8 * i);
  cp_async_commit();
  cp_async_wait<0>();
  block_sync();
  const int l = lane_id(), w = warp_id(), g = l >> 2, q = l % 4;
  for (int m0 = 16 * w; m0 < p.m; m0 += 16 * (nt / 32)) {
    for (int n0 = 0; n0 < p.n; n0 += 8) {
      float acc[4] = {0, 0, 0, 0};
      for (int k0 = 0; k0 < p.k; k0 += 16) {
        uint32_t a[4], b[2];
        ldmatrix_x4(a, sa + (m0 + l % 16) * p.k + k0 + (l / 16) * 8);
        if (p.b_kn) {
          // B'[k][n]: matrix 0 = rows k0..k0+7, matrix 1 = rows k0+8..k0+15 (lanes 0-15 give rows).
          ldmatrix_x2_trans(b, sb + (k0 + l % 16) * p.n + n0);
        } else {
          // B[n][k]: matrix 0 = k0..k0+7, matrix 1 = k0+8..k0+15, rows n0..n0+7.
          ldmatrix_x2(b, sb + (n0 + l % 8) * p.k + k0 + ((l / 8) % 2) * 8);
        }
        mma_m16n8k16<T>(acc, a, b, acc);
      }
      p.c[(m0 + g) * p.n + n0 + 2 * q] = acc[0];
      p.c[(m0 + g) * p.n + n0 + 2 * q + 1] = acc[1];
      p.c[(m0 + g + 8) * p.n + n0 + 2 * q] = acc[2];
      p.c[(m0 + g + 8) * p.n + n0 + 2 * q + 1] = acc[3];
    }
  }
}

template <class T>
bool run_mma(int m, int n, int k, int warps, bool b_kn, const char* what) {
  std::mt19937 rng(1234 + m + n + k + b_kn);
  std::normal_distribution<float> dist;
  std::vector<uint16_t> a(m * k), b(n * k);
  std::vector<float> af(m * k), bf(n * k);  // the rounded values, for the expectation
  for (int i = 0; i < m * k; ++i) {
    const T x = from_float<T>(dist(rng));
    a[i] = bits_of(x);
    af[i] = to_float(x);
  }
  for (int i = 0; i < n * k; ++i) {
    const T x = from_float<T>(dist(rng));
    b[i] = bits_of(x);
    bf[i] = to_float(x);
  }
  // bf holds B[n][k]; the kn variant stores its transpose.
  std::vector<uint16_t> b_store(n * k);
  for (int j = 0; j < n; ++j)
    for (int kk = 0; kk < k; ++kk) {
      if (b_kn) {
        b_store[kk * n + j] = b[j * k + kk];
      } else {
        b_store[j * k + kk] = b[j * k + kk];
      }
    }
  std::vector<float> c(m * n, NAN);
  MmaArgs p{a.data(), b_store.data(), c.data(), m, n, k, b_kn};
  MMFAST_LAUNCH(mma_kernel<T>, Dim3(1), Dim3(32 * warps), (m + n) * k * 2, 0, p);
  bool ok = true;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double want = 0;
      for (int kk = 0; kk < k; ++kk) want += static_cast<double>(af[i * k + kk]) * bf[j * k + kk];
      const double err = std::fabs(c[i * n + j] - want);
      ok &= check(err <= 1e-4 * (1 + std::fabs(want)),
                  std::string(what) + ": C[" + std::to_string(i) + "][" + std::to_string(j) +
                      "] = " + std::to_string(c[i * n + j]) + ", want " + std::to_string(want));
    }
  return ok;
}

bool test_mma_bf16_tile() { return run_mma<bf16_t>(16, 8, 16, 1, false, "bf16 16x8x16"); }
bool test_mma_fp16_tile() { return run_mma<half_t>(16, 8, 16, 1, false, "fp16 16x8x16"); }
bool test_mma_bf16_trans() { return run_mma<bf16_t>(16, 8, 16, 1, true, "bf16 16x8x16 ldmatrix.trans"); }
bool test_mma_fp16_gemm() { return run_mma<half_t>(64, 32, 48, 4, false, "fp16 64x32x48, 4 warps"); }
bool test_mma_bf16_gemm_trans() {
  return run_mma<bf16_t>(32, 24, 64, 2, true, "bf16 32x24x64 trans, 2 warps");
}

// ---- ldmatrix x1 / x4.trans directly against the documented element map -----------------------

void ldm_kernel(const uint16_t* src, uint32_t* out) {
  uint16_t* s = dynamic_smem<uint16_t>();
  const int l = lane_id();
  for (int i = l; i < 4 * 64; i += 32) s[i] = src[i];  // four 8x8 matrices, row-major, back to back
  warp_sync();
  uint32_t r1[1], r4[4];
  ldmatrix_x1(r1, s + (l % 8) * 8);
  ldmatrix_x4_trans(r4, s + l * 8);  // lane l gives row l%8 of matrix l/8
  out[l] = r1[0];
  for (int i = 0; i < 4; ++i) out[32 + 4 * l + i] = r4[i];
}

bool test_ldmatrix() {
  std::vector<uint16_t> src(256);
  for (int i = 0; i < 256; ++i) src[i] = static_cast<uint16_t>(i * 7 + 3);
  std::vector<uint32_t> out(32 * 5);
  MMFAST_LAUNCH(ldm_kernel, Dim3(1), Dim3(32), 512, 0, src.data(), out.data());
  auto el = [&](int mat, int row, int col) { return static_cast<uint32_t>(src[mat * 64 + row * 8 + col]); };
  bool ok = true;
  for (int l = 0; l < 32; ++l) {
    const uint32_t want1 = el(0, l / 4, 2 * (l % 4)) | (el(0, l / 4, 2 * (l % 4) + 1) << 16);
    ok &= check(out[l] == want1, "ldmatrix.x1 lane " + std::to_string(l));
    for (int i = 0; i < 4; ++i) {
      const uint32_t want = el(i, 2 * (l % 4), l / 4) | (el(i, 2 * (l % 4) + 1, l / 4) << 16);
      ok &= check(out[32 + 4 * l + i] == want, "ldmatrix.x4.trans lane " + std::to_string(l));
    }
  }
  return ok;
}

// ---- cp.async: zero fill, and data only guaranteed after the wait ------------------------------

void cp_async_kernel(const float* src, float* out) {
  float* s = dynamic_smem<float>();
  const int t = thread_x();
  // Group 0: thread t copies floats 4t..4t+3 (full); group 1: a partial copy of 2 floats (8 bytes).
  cp_async_16(s + 4 * t, src + 4 * t);
  cp_async_commit();
  cp_async_16(s + 128 + 4 * t, src + 4 * t, 8);
  cp_async_commit();
  cp_async_wait<1>();  // group 0 done; group 1 may still be in flight
  block_sync();
  out[t] = s[(4 * t + 5) % 128];
  cp_async_wait<0>();
  block_sync();
  for (int i = 0; i < 4; ++i) out[32 + 4 * t + i] = s[128 + 4 * t + i];
}

bool test_cp_async() {
  std::vector<float> src(128), out(160, NAN);
  for (int i = 0; i < 128; ++i) src[i] = 0.25f * i;
  MMFAST_LAUNCH(cp_async_kernel, Dim3(1), Dim3(32), 256 * sizeof(float), 0, src.data(), out.data());
  bool ok = true;
  for (int t = 0; t < 32; ++t) {
    ok &= check(out[t] == src[(4 * t + 5) % 128], "cp.async group 0 visible after wait<1>");
    for (int i = 0; i < 4; ++i)
      ok &=
          check(out[32 + 4 * t + i] == (i < 2 ? src[4 * t + i] : 0.0f), "cp.async zero fill past src_bytes");
  }
  return ok;
}

// Shared memory starts poisoned (NaN bytes) in every block, so unwritten reads are visible.
void poison_kernel(float* out) {
  float* s = dynamic_smem<float>();
  if (block_x() == 0) s[thread_x()] = 1.0f;
  block_sync();
  out[block_x() * 32 + thread_x()] = s[thread_x()];
}

bool test_poison() {
  std::vector<float> out(64, 0.0f);
  MMFAST_LAUNCH(poison_kernel, Dim3(2), Dim3(32), 32 * sizeof(float), 0, out.data());
  bool ok = true;
  for (int t = 0; t < 32; ++t) {
    ok &= check(out[t] == 1.0f, "written shared memory");
    ok &= check(std::isnan(out[32 + t]), "shared memory is poisoned again in the next block");
  }
  return ok;
}

struct Test {
  const char* name;
  bool (*fn)();
};
const Test kTests[] = {
    {"shuffle", test_shuffle},
    {"barrier", test_barrier},
    {"indices", test_indices},
    {"convert", test_convert},
    {"ldmatrix", test_ldmatrix},
    {"cp_async", test_cp_async},
    {"poison", test_poison},
    {"mma_bf16_tile", test_mma_bf16_tile},
    {"mma_fp16_tile", test_mma_fp16_tile},
    {"mma_bf16_trans", test_mma_bf16_trans},
    {"mma_fp16_gemm", test_mma_fp16_gemm},
    {"mma_bf16_gemm_trans", test_mma_bf16_gemm_trans},
};

}  // namespace

int main(int argc, char** argv) {
  int failed = 0, ran = 0;
  for (const Test& t : kTests) {
    bool wanted = argc == 1;
    for (int i = 1; i < argc; ++i)
      wanted |= std::strcmp(argv[i], t.name) == 0 || std::strcmp(argv[i], "--list") == 0;
    if (!wanted) continue;
    if (argc == 2 && std::strcmp(argv[1], "--list") == 0) {
      std::printf("%s\n", t.name);
      continue;
    }
    g_why.clear();
    ++ran;
    if (t.fn()) {
      std::printf("PASS %s\n", t.name);
    } else {
      ++failed;
      std::printf("FAIL %s: %s\n", t.name, g_why.c_str());
    }
  }
  if (argc > 1 && ran == 0 && std::strcmp(argv[1], "--list") != 0) {
    std::printf("FAIL no test named %s\n", argv[1]);
    return 2;
  }
  return failed ? 1 : 0;
}
