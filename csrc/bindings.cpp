// mmfast._C: the one extension module.
//
// Importing it registers every kernel with the dispatcher: each op's schema is declared in its
// cpu.cpp (TORCH_LIBRARY_FRAGMENT(mmfast, m)), with one implementation per device key
// (TORCH_LIBRARY_IMPL(mmfast, CPU|CUDA, m)). The Python side (mmfast/ops) adds fake and autograd
// registrations. This file only owns the namespace, reports how the module was built, and
// measures the CPU's peak multiply-add rate for the benchmarks' floors.
#include <torch/extension.h>
#include <torch/library.h>

#include "common/cpu_alloc.h"
#include "common/cpu_peak.h"

#ifndef MMFAST_VERSION
#define MMFAST_VERSION "0.0.0"
#endif
#ifndef MMFAST_WITH_CUDA
#define MMFAST_WITH_CUDA 0
#endif
#ifndef MMFAST_CUDA_ARCHS
#define MMFAST_CUDA_ARCHS ""
#endif

// The namespace is owned here; ops add themselves with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(mmfast, m) {}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmfast C++/CUDA kernels (registered as torch.ops.mmfast.*)";
  m.attr("__version__") = MMFAST_VERSION;
  m.attr("with_cuda") = static_cast<bool>(MMFAST_WITH_CUDA);
  m.attr("cuda_archs") = std::string(MMFAST_CUDA_ARCHS);
#ifdef __clang__
  m.attr("compiler") = std::string("clang ") + __clang_version__;
#else
  m.attr("compiler") = std::string("gcc ") + __VERSION__;
#endif
  m.attr("torch_version") = std::string(TORCH_VERSION);
  m.def("cpu_peak_gflops", &mmfast::cpu::peak_gflops, pybind11::arg("kind") = "fp32",
        pybind11::arg("iters") = 20000000,
        "Measured peak multiply-add rate (GFLOP/s) of all intra-op threads together: kind 'fp32' "
        "(vfmadd231ps) or 'bf16' (vdpbf16ps; 0 without AVX512_BF16).");
  m.def("release_cpu_block_cache", &mmfast::cpu::release_huge_block_cache,
        "Unmap the huge-page output blocks cached for reuse (see mmfast.cpu_options).");
  m.def(
      "cpu_isa",
      [] {
        const auto& i = mmfast::cpu::isa();
        pybind11::dict d;
        d["avx2"] = i.avx2, d["avx512"] = i.avx512, d["avx512_bf16"] = i.avx512_bf16;
        d["amx_bf16"] = i.amx_bf16, d["amx_fp16"] = i.amx_fp16, d["amx_why"] = i.amx_why;
        return d;
      },
      "What this CPU can run, detected once (AVX2+FMA, AVX-512, AVX512_BF16, AMX with OS permission).");
  m.def(
      "cpu_gemm_missing", [](const std::string& name) { return mmfast::cpu::gemm_missing_by_name(name); },
      "The CPU feature tile-product path `name` needs and this CPU lacks ('' when it can run it).");
  m.def(
      "set_cpu_options",
      [](const std::string& gemm, bool hugepages, int64_t block_cache_mb) {
        TORCH_CHECK(block_cache_mb >= 0, "mmfast.cpu_options: block_cache_mb must be >= 0, got ",
                    block_cache_mb);
        mmfast::cpu::set_gemm(gemm);
        auto& o = mmfast::cpu::options();
        o.hugepages.store(hugepages);
        o.block_cache_mb.store(block_cache_mb);
      },
      pybind11::arg("gemm"), pybind11::arg("hugepages"), pybind11::arg("block_cache_mb"),
      "Set the CPU kernels' options (use mmfast.cpu_options).");
  m.def(
      "get_cpu_options",
      [] {
        auto& o = mmfast::cpu::options();
        pybind11::dict d;
        d["gemm"] = std::string(mmfast::cpu::gemm_name(mmfast::cpu::forced_gemm()));
        d["hugepages"] = o.hugepages.load(), d["block_cache_mb"] = o.block_cache_mb.load();
        return d;
      },
      "The CPU kernels' options.");
  m.def(
      "cpu_gemm_for",
      [](const std::string& dtype) {
        const auto dt = dtype == "float32"    ? c10::ScalarType::Float
                        : dtype == "bfloat16" ? c10::ScalarType::BFloat16
                        : dtype == "float16"  ? c10::ScalarType::Half
                                              : c10::ScalarType::Double;
        return std::string(mmfast::cpu::gemm_name(mmfast::cpu::gemm_for(dt)));
      },
      "The tile-product path the CPU kernels take now for inputs of `dtype` ('float32', 'bfloat16', ...).");
}
