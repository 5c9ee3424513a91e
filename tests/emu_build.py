"""Build helpers for the emulated CUDA kernels (tests only; shared by the CUDA test files).

* ``build_executable(name, source, ...)``: a torch-free g++ executable (the emulation self-test, the
  ThreadSanitizer driver), cached under ``build/emu`` by a hash of the compiler flags and every file
  under ``csrc/`` it can include.
* ``load_module(name, source)``: a small torch extension (via ``torch.utils.cpp_extension.load``)
  that runs device headers under emulation on CPU tensors; cached the same way (the hash goes into
  the module name because torch's own cache does not look at headers).
* ``nvcc()``: the nvcc to use for compile-only checks, or None.
* ``run(cmd)``: run a command, returning (returncode, stdout + stderr).

Every build is written to a temporary name and renamed, so parallel test workers never see half a
file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "emu"

BASE_FLAGS = ["-std=c++17", "-pthread", f"-I{CSRC}"]


def _headers_digest() -> str:
    """Hash of every header under csrc/ and every source under csrc/emu (what an emulated build reads)."""
    h = hashlib.sha256()
    for p in sorted(CSRC.rglob("*")):
        if p.is_file() and (p.suffix in (".h", ".cuh") or (p.suffix == ".cpp" and p.parent.name == "emu")):
            h.update(str(p.relative_to(CSRC)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _key(*parts: object) -> str:
    h = hashlib.sha256(_headers_digest().encode())
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()[:12]


def run(cmd: list[str], timeout: float = 900, env: dict | None = None) -> tuple[int, str]:
    """Run ``cmd``; (returncode, combined output). A timeout counts as a failure (rc -9)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -9, out + f"\n[timed out after {timeout}s]"
    return p.returncode, p.stdout + p.stderr


def cxx() -> str:
    return os.environ.get("CXX", "g++")


def build_executable(name: str, source: str, flags: tuple[str, ...] = ("-O1", "-g")) -> Path:
    """Compile csrc/``source`` into a cached executable; raises RuntimeError with the compiler log."""
    flags = tuple(flags)
    exe = BUILD / f"{name}-{_key(name, source, flags, cxx())}"
    if exe.exists():
        return exe
    BUILD.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(exe.name + f".tmp{os.getpid()}")
    cmd = [cxx(), *BASE_FLAGS, *flags, str(CSRC / source), "-o", str(tmp)]
    rc, log = run(cmd)
    if rc != 0:
        raise RuntimeError(f"building {source} failed:\n{' '.join(cmd)}\n{log}")
    os.replace(tmp, exe)
    return exe


def load_module(name: str, source: str, extra_cflags: tuple[str, ...] = ("-O2",)):
    """Build (or reuse) the torch extension compiled from csrc/``source`` and import it."""
    from torch.utils.cpp_extension import load

    key = _key(name, source, tuple(extra_cflags))
    mod_name = f"{name}_{key}"
    build_dir = BUILD / mod_name
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name=mod_name,
        sources=[str(CSRC / source)],
        extra_include_paths=[str(CSRC)],
        extra_cflags=list(extra_cflags),
        extra_ldflags=["-pthread"],
        build_directory=str(build_dir),
        verbose=False,
    )


def nvcc() -> str | None:
    """The nvcc matching torch's CUDA (tools/find_cuda.py), or any nvcc on PATH; None if absent."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import torch
        from find_cuda import find_cuda_home

        home, _ = find_cuda_home(torch.version.cuda)
    except Exception:  # noqa: BLE001 - no toolkit matching torch; fall back to PATH
        home = None
    finally:
        sys.path.pop(0)
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")
