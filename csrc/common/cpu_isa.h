// What this CPU can execute, detected once at load time, and the CPU code-path options every CPU
// kernel reads (one struct, set from Python through mmfast.cpu_options; no environment variables).
//
// Detection: cpuid (through <cpuid.h>) for AVX2/FMA, AVX-512F/BW/VL, AVX512_BF16 and AMX-TILE/BF16/
// FP16, XGETBV for the OS-enabled register state (AVX, AVX-512), and on Linux
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) for AMX: a process must ask for the tile data
// state before its first tile instruction, or the kernel kills it with SIGILL.
//
// Paths of the tile products (the GEMMs under the fused epilogues), per input dtype:
//   fp32: "avx512" (own 8x32 register tiles), "avx2" (own 6x16 tiles), "blas" (MKL SGEMM)
//   bf16: "amx" (MKL's bf16 GEMM, which runs on the AMX tiles), "avx512_bf16" (own vdpbf16ps
//         kernels), "blas" (MKL's bf16 GEMM on a CPU without AMX)
//   fp16, fp64: "blas"
// "auto" takes, per dtype, the first path this CPU has in the order above. Forcing a path the CPU
// lacks is an error naming the missing feature; a path of another dtype leaves that dtype on auto.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cpuid.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mmfast::cpu {

struct Isa {
  bool avx2 = false, avx512 = false, avx512_bf16 = false;  // avx512: F + BW + VL + DQ, OS-enabled
  bool amx_bf16 = false, amx_fp16 = false;                 // tile instructions, OS permission granted
  std::string amx_why;                                     // why AMX is off when the CPU reports it
};

namespace detail {

inline uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

// Linux: ask for the AMX tile data state (XFEATURE_XTILEDATA = 18) for this process.
inline bool request_amx_permission(std::string& why) {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kReqXcompPerm = 0x1023, kXtileData = 18;
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) != 0) {
    why = "the OS refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)";
    return false;
  }
  return true;
#else
  why = "AMX permission is only requested on Linux";
  return false;
#endif
}

inline Isa detect() {
  Isa isa;
  uint32_t a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return isa;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12);
  const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6, os_avx512 = (xcr0 & 0xE6) == 0xE6;
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;  // XTILECFG and XTILEDATA
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return isa;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512dq = b & (1u << 17);
  const bool avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
  uint32_t a1 = 0, b1, c1, d1;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  const bool avx512_bf16 = a1 & (1u << 5), amx_fp16 = a1 & (1u << 21);
  isa.avx2 = avx2 && fma && os_avx;
  isa.avx512 = isa.avx2 && avx512f && avx512dq && avx512bw && avx512vl && os_avx512;
  isa.avx512_bf16 = isa.avx512 && avx512_bf16;
  if (amx_tile && amx_bf16) {
    if (!os_amx) {
      isa.amx_why = "the OS does not enable the AMX tile state (XCR0)";
    } else if (request_amx_permission(isa.amx_why)) {
      isa.amx_bf16 = true;
      isa.amx_fp16 = amx_fp16;
    }
  } else {
    isa.amx_why = "this CPU has no AMX-BF16";
  }
  return isa;
}

}  // namespace detail

inline const Isa& isa() {
  static const Isa detected = detail::detect();
  return detected;
}

// The tile-product paths; kAuto resolves per dtype (see the top of this file).
enum class Gemm : int { kAuto = 0, kAmx, kAvx512Bf16, kAvx512, kAvx2, kBlas };

inline const char* gemm_name(Gemm g) {
  switch (g) {
    case Gemm::kAmx:
      return "amx";
    case Gemm::kAvx512Bf16:
      return "avx512_bf16";
    case Gemm::kAvx512:
      return "avx512";
    case Gemm::kAvx2:
      return "avx2";
    case Gemm::kBlas:
      return "blas";
    default:
      return "auto";
  }
}

// Empty when this CPU can run path g; otherwise the missing feature.
inline std::string gemm_missing(Gemm g) {
  const Isa& i = isa();
  switch (g) {
    case Gemm::kAmx:
      return i.amx_bf16 ? "" : "AMX-BF16 (" + i.amx_why + ")";
    case Gemm::kAvx512Bf16:
      return i.avx512_bf16 ? "" : "AVX512_BF16";
    case Gemm::kAvx512:
      return i.avx512 ? "" : "AVX-512 (F, BW, VL, DQ)";
    case Gemm::kAvx2:
      return i.avx2 ? "" : "AVX2 and FMA";
    default:
      return "";
  }
}

inline std::string gemm_missing_by_name(const std::string& name) {
  for (Gemm g : {Gemm::kAmx, Gemm::kAvx512Bf16, Gemm::kAvx512, Gemm::kAvx2}) {
    if (name == gemm_name(g)) return gemm_missing(g);
  }
  return "";
}

// Process-wide options of the CPU kernels (atomics: a kernel reads them once per call).
struct Options {
  std::atomic<int> gemm{static_cast<int>(Gemm::kAuto)};
  std::atomic<bool> hugepages{true};         // outputs of >= 8 MB on 2 MB pages (see cpu_alloc.h)
  std::atomic<int64_t> block_cache_mb{256};  // cap of the cache of freed huge-page blocks
};

inline Options& options() {
  static Options opts;
  return opts;
}

inline Gemm forced_gemm() { return static_cast<Gemm>(options().gemm.load(std::memory_order_relaxed)); }

// Sets the forced path; an error naming the missing feature when this CPU cannot run it.
inline void set_gemm(const std::string& name) {
  static const std::vector<Gemm> all = {Gemm::kAuto,   Gemm::kAmx,  Gemm::kAvx512Bf16,
                                        Gemm::kAvx512, Gemm::kAvx2, Gemm::kBlas};
  for (Gemm g : all) {
    if (name != gemm_name(g)) continue;
    const std::string missing = gemm_missing(g);
    TORCH_CHECK(missing.empty(), "mmfast.cpu_options: gemm='", name, "' needs ", missing,
                ", which this CPU does not have");
    options().gemm.store(static_cast<int>(g), std::memory_order_relaxed);
    return;
  }
  TORCH_CHECK(false,
              "mmfast.cpu_options: gemm must be one of 'auto', 'amx', 'avx512_bf16', 'avx512', 'avx2', "
              "'blas', got '",
              name, "'");
}

// The path of the tile products for inputs of dtype dt, under the current options.
inline Gemm gemm_for(c10::ScalarType dt) {
  const Gemm forced = forced_gemm();
  const Isa& i = isa();
  if (dt == c10::ScalarType::Float) {
    if (forced == Gemm::kAvx512 || forced == Gemm::kAvx2 || forced == Gemm::kBlas) return forced;
    return i.avx512 ? Gemm::kAvx512 : i.avx2 ? Gemm::kAvx2 : Gemm::kBlas;
  }
  if (dt == c10::ScalarType::BFloat16) {
    if (forced == Gemm::kAmx || forced == Gemm::kAvx512Bf16 || forced == Gemm::kBlas) return forced;
    return i.amx_bf16 ? Gemm::kAmx : i.avx512_bf16 ? Gemm::kAvx512Bf16 : Gemm::kBlas;
  }
  return Gemm::kBlas;
}

}  // namespace mmfast::cpu
