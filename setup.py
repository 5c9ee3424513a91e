"""Build mmfast._C: C++ CPU kernels always; CUDA kernels when a matching toolkit is present.

Install: ``pip install -e . --no-build-isolation`` (torch, ninja and pybind11 installed first; the
package metadata and the ``mmfast-bench`` script are declared in pyproject.toml). Quick in-place
rebuild: ``python setup.py build_ext --inplace``. Both compile into the same object folder, so each
reuses what the other compiled; ninja prints one ``[n/m]`` line per compiled file.

Environment:
  MMFAST_BUILD_CUDA=0|1   force a CPU-only build (quick iteration) or require CUDA (error if absent);
                          unset: build CUDA kernels whenever a toolkit matching torch's CUDA is found.
  TORCH_CUDA_ARCH_LIST    target archs; default with no GPU visible: "8.0;9.0+PTX".
  MAX_JOBS                parallel compile jobs (ninja).
  MMFAST_DEBUG=1          -O0 -g.
  MMFAST_SANITIZE=address,undefined
                          CPU-only build with these -fsanitize= checks (-O1 -g, frame pointers), for the
                          sanitizer pass (tools/sanitize.sh builds it in a copy of the tree, so the normal
                          build is not overwritten). Python needs the runtime preloaded:
                          LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0.
"""

from __future__ import annotations

import os
import sys
import sysconfig

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
import torch  # noqa: E402
from find_cuda import find_cuda_home  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def read_sources() -> list[str]:
    with open(os.path.join(ROOT, "csrc", "sources.txt")) as f:
        lines = [ln.strip() for ln in f]
    return [ln for ln in lines if ln and not ln.startswith("#")]


SANITIZE = [s for s in os.environ.get("MMFAST_SANITIZE", "").replace(" ", "").split(",") if s]


def want_cuda() -> tuple[bool, str | None]:
    flag = os.environ.get("MMFAST_BUILD_CUDA", "").strip()
    if flag == "0" or SANITIZE:  # the sanitizer pass checks the CPU kernels; nvcc would not take the flags
        return False, None
    home, why = find_cuda_home(torch.version.cuda)
    if home is None:
        if flag == "1":
            raise SystemExit(f"MMFAST_BUILD_CUDA=1 but {why}")
        print(f"mmfast: building without CUDA kernels: {why}")
        return False, None
    return True, home


def arch_list() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs
    if torch.cuda.is_available():
        return ";".join(
            f"{a}.{b}" for a, b in {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        )
    return "8.0;9.0+PTX"


with_cuda, cuda_home = want_cuda()
if with_cuda:
    os.environ["CUDA_HOME"] = cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()

import torch.utils.cpp_extension as cpp_ext  # noqa: E402

if with_cuda:
    cpp_ext.CUDA_HOME = cuda_home  # torch guessed at import time; use the toolkit we verified

sources = [s for s in read_sources() if with_cuda or not s.endswith(".cu")]
debug = os.environ.get("MMFAST_DEBUG") == "1"
opt = ["-O0", "-g"] if debug else ["-O3"]
link_flags = ["-fopenmp"]
if SANITIZE:
    # vptr is left out: RTTI of torch/pybind11 types differs across shared objects (false reports).
    san = ["-fsanitize=" + ",".join(SANITIZE)] + (["-fno-sanitize=vptr"] if "undefined" in SANITIZE else [])
    opt = ["-O1", "-g", "-fno-omit-frame-pointer", *san]
    link_flags += san
archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
defines = [
    ("MMFAST_VERSION", f'"{VERSION}"'),
    ("MMFAST_WITH_CUDA", "1" if with_cuda else "0"),
    ("MMFAST_CUDA_ARCHS", f'"{archs}"'),
]
cxx_flags = opt + ["-fopenmp", "-march=native" if os.environ.get("MMFAST_NATIVE") == "1" else "-mavx2", "-mfma"]
nvcc_flags = opt + [
    "--expt-relaxed-constexpr",
    "-lineinfo",
    "-Xptxas=-v" if os.environ.get("MMFAST_PTXAS_VERBOSE") == "1" else "-Xptxas=-warn-spills",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
]
Extension = cpp_ext.CUDAExtension if with_cuda else cpp_ext.CppExtension
ext = Extension(
    name="mmfast._C",
    sources=sources,
    include_dirs=[os.path.join(ROOT, "csrc")],
    define_macros=defines,
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx_flags},
    extra_link_args=link_flags,
)


class BuildExt(cpp_ext.BuildExtension):
    """torch's ninja build, with one object folder for every way of building.

    pip's editable and wheel builds compile in a fresh temporary folder, which would recompile every
    file (minutes) even right after ``setup.py build_ext --inplace``; pointing them all at the
    folder that command uses lets ninja skip what is up to date.
    """

    def finalize_options(self) -> None:
        super().finalize_options()
        tag = f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        self.build_temp = os.path.join(ROOT, "build", tag)

    def build_extensions(self) -> None:
        for e in self.extensions:
            jobs = os.environ.get("MAX_JOBS", "ninja's default")
            print(
                f"mmfast: building {e.name} from {len(e.sources)} files (CUDA kernels: {'yes' if with_cuda else 'no'}, "
                f"jobs: {jobs}, objects in {self.build_temp}); ninja prints a [n/m] line per file",
                flush=True,
            )
        super().build_extensions()


# Name, version, dependencies, packages and the mmfast-bench script: pyproject.toml.
setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
