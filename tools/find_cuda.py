"""Locate a CUDA toolkit that matches the installed torch, for setup.py and CMakeLists.txt.

torch's own guess (``dirname(dirname(which nvcc))``) is wrong whenever ``nvcc`` on PATH is a
wrapper script or a symlink farm, so we look at candidates and keep the first whose ``bin/nvcc``
is a real executable (not a shell script), whose headers are present, and whose major version
matches ``torch.version.cuda``.

Run as a script it prints the toolkit folder (or nothing) so CMake can call it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys


def _nvcc_version(nvcc: str) -> str | None:
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", text)
    return match.group(1) if match else None


def _is_script(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"#!"


def _from_wrapper(path: str) -> list[str]:
    """Folders named by ``exec /some/cuda/bin/nvcc`` lines in a wrapper script."""
    with open(path, errors="replace") as f:
        text = f.read(4096)
    return [os.path.dirname(os.path.dirname(p)) for p in re.findall(r"(/\S+/bin/nvcc)\b", text)]


def candidates(torch_cuda: str | None) -> list[str]:
    out: list[str] = []
    for var in ("MMFAST_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            out.append(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        if _is_script(real):
            out.extend(_from_wrapper(real))
        else:
            out.append(os.path.dirname(os.path.dirname(real)))
    if torch_cuda:
        out.append(f"/usr/local/cuda-{torch_cuda}")
    out.append("/usr/local/cuda")
    seen: list[str] = []
    for c in out:
        c = os.path.realpath(c)
        if c not in seen:
            seen.append(c)
    return seen


def find_cuda_home(torch_cuda: str | None) -> tuple[str | None, str]:
    """Return (toolkit folder or None, why) for a toolkit matching torch's CUDA major version."""
    if not torch_cuda:
        return None, "this torch was built without CUDA"
    tried = []
    for home in candidates(torch_cuda):
        nvcc = os.path.join(home, "bin", "nvcc")
        if not os.path.isfile(nvcc) or _is_script(nvcc):
            tried.append(f"{home}: no real bin/nvcc")
            continue
        if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            tried.append(f"{home}: no include/cuda_runtime.h")
            continue
        version = _nvcc_version(nvcc)
        if version is None or version.split(".")[0] != torch_cuda.split(".")[0]:
            tried.append(f"{home}: nvcc {version} does not match torch's CUDA {torch_cuda}")
            continue
        return home, f"nvcc {version} at {home}"
    return None, "no CUDA toolkit matching torch's CUDA " + torch_cuda + (
        " (" + "; ".join(tried) + ")" if tried else ""
    )


if __name__ == "__main__":
    import torch

    home, _ = find_cuda_home(torch.version.cuda)
    sys.stdout.write(home or "")
