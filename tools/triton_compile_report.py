"""Compile every mmfast Triton kernel ahead of time for sm_80 and sm_90 (no GPU needed).

Each kernel module exposes ``compile_specs() -> [(name, jit_fn, signature, constexprs), ...]`` and
may expose ``compile_attrs(jit_fn, signature)``: the alignment hints the JIT gives real launches on
16-byte aligned tensors (without them loads are not vectorized and ptxas reports spills that real
launches do not have). Modules without it get hints on their pointer arguments.
For each spec and target this compiles the kernel with ``triton.compile`` and reads the cubin's
resource usage (registers, stack, local memory, static shared) with the cuobjdump that ships with
Triton; Triton's own shared-memory figure (``metadata.shared``) is reported too.

Prints one JSON object per line. Must run WITHOUT ``TRITON_INTERPRET`` (the interpreter replaces
@triton.jit functions); tests run it in a subprocess.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

MODULES = ("mmfast.triton.contrastive", "mmfast.triton.cross_attention")
TARGETS = (80, 90)


def resource_usage(cubin: bytes) -> dict[str, int]:
    import triton  # noqa: PLC0415

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        usage[key.lower()] = int(m.group(1)) if m else -1
    return usage


def _pointer_attrs(fn, signature: dict[str, str]) -> dict:
    return {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items() if t.startswith("*")}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile kernels", file=sys.stderr)
        return 2
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    failed = 0
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        specs = mod.compile_specs() if hasattr(mod, "compile_specs") else []
        for name, fn, signature, constexprs in specs:
            for cc in TARGETS:
                row = {"module": mod_name, "kernel": name, "cc": cc}
                try:
                    sig = dict(signature)
                    for k in constexprs:
                        sig.setdefault(k, "constexpr")
                    compiled = triton.compile(
                        ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", cc, 32)
                    )
                    row.update(resource_usage(compiled.asm["cubin"]))
                    row["dyn_shared"] = int(compiled.metadata.shared)
                    row["num_warps"] = int(compiled.metadata.num_warps)
                    row["ok"] = True
                except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
                    failed += 1
                print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
