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
        "Unmap the huge-page output blocks cached for reuse (see MMFAST_CPU_POOL_MB).");
}
