#!/usr/bin/env bash
# GPU check for mmfast, in one call, on a machine with one NVIDIA GPU and no network (< 8 minutes on
# an H200 with 16 cores):
#   1. environment report (nvidia-smi, torch, nvcc);
#   2. build mmfast._C in place for this GPU only (TORCH_CUDA_ARCH_LIST from nvidia-smi / torch);
#   3. python -m pytest -m gpu (cuda and triton backends against the reference at realistic sizes);
#   4. benchmark, forward+backward, median of CUDA-event timings:
#        cross_attention bf16: cuda vs triton vs every SDPA backend, B=16 H=16 L=2048 D=128 and
#        B=64 H=12 Lq=32 Lk=1024 D=64;
#        info_nce bf16 N=65536 D=768: cuda vs triton (vs inf-cl when installed), as a fraction of
#        the bf16 matmul rate measured in the same run (8 N^2 D FLOPs).
# Writes <step>.log files, summary.md (steps, exit codes, seconds) and results.md / results.json
# (benchmark table) into ${OUT:-./device-results}. Every step is time-limited; a failed step is
# recorded and the script goes on, exiting non-zero at the end if any step failed.
#
# Usage: bash benchmarks/device_check.sh        Environment: OUT, BUILD_S, TESTS_S, BENCH_S (limits).
set -uo pipefail  # no -e: every step runs and records its status; the exit code says if one failed

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-./device-results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 2
BUILD_S="${BUILD_S:-240}"
TESTS_S="${TESTS_S:-120}"
BENCH_S="${BENCH_S:-100}"
PY="${PYTHON:-python}"
SUMMARY="$OUT/summary.md"
FAILED=0
printf '# mmfast device check (%s)\n\n| step | exit | seconds |\n|---|---|---|\n' "$(date -u +%FT%TZ)" >"$SUMMARY"

# step NAME LIMIT_S CMD...: run CMD with a time limit, output to $OUT/NAME.log, a summary row.
step() {
  local name="$1" limit="$2" start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && echo "[timed out after ${limit}s]" >>"$OUT/$name.log"
  echo "| $name | $rc | $(($(date +%s) - start)) |" >>"$SUMMARY"
  [ "$rc" -ne 0 ] && FAILED=1 && echo "   $name failed (exit $rc), see $OUT/$name.log"
  return 0
}

# 1. Environment.
step env 60 bash -c "nvidia-smi; $PY -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'; command -v nvcc && nvcc --version; $PY -c 'import triton; print(\"triton\", triton.__version__)'; nproc"

# 2. Build for this GPU's architecture only.
ARCH="$(timeout 30 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')"
if [ -z "$ARCH" ]; then
  ARCH="$(timeout 60 "$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null)"
fi
echo "arch: ${ARCH:-unknown}" | tee -a "$SUMMARY"
# Each .cu file is one nvcc process; --split-compile=0 spreads its device optimization over all cores.
step build "$BUILD_S" env TORCH_CUDA_ARCH_LIST="${ARCH:-9.0}" MMFAST_BUILD_CUDA=1 MAX_JOBS="$(nproc)" \
  NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} --split-compile=0" MMFAST_PTXAS_VERBOSE=1 \
  "$PY" setup.py build_ext --inplace

# 3. The gpu-marked tests.
step gpu_tests "$TESTS_S" "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests

# 4. Benchmark.
cat >"$OUT/bench.py" <<'PYEOF'
"""Forward+backward timings on one GPU; writes results.md and results.json into argv[1]."""

import json
import math
import sys
import time

import torch
import torch.nn.functional as F

import mmfast
import mmfast._C  # noqa: F401 - registers torch.ops.mmfast.*

OUT = sys.argv[1]
DEV = "cuda"
rows = []


def timed(fn, warmup=2, iters=6):
    """Median milliseconds of fn() over iters runs (CUDA events), after warmup runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def record(case, provider, fn, flops, note=""):
    t0 = time.time()
    try:
        ms = timed(fn)
        rows.append(dict(case=case, provider=provider, ms=ms, tflops=flops / ms * 1e-9, note=note))
    except Exception as e:  # noqa: BLE001 - one provider failing must not stop the others
        rows.append(dict(case=case, provider=provider, ms=None, tflops=None, note=f"{type(e).__name__}: {e}"[:200]))
    torch.cuda.empty_cache()
    print(f"{case} {provider}: {rows[-1]['ms']} ms ({time.time() - t0:.1f}s)", flush=True)
    write_tables()


# Machine peak: a large bf16 matmul.
MAT = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
mm_ms = timed(lambda: MAT @ MAT, warmup=3, iters=10)
MM_TFLOPS = 2 * 8192**3 / mm_ms * 1e-9
rows.append(dict(case="matmul 8192^3 bf16", provider="torch", ms=mm_ms, tflops=MM_TFLOPS, note="peak reference"))
MAT = None


def write_tables():
    """results.json and results.md so far (rewritten after every measurement: a time limit keeps them)."""
    with open(f"{OUT}/results.json", "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), matmul_tflops=MM_TFLOPS, rows=rows), f, indent=1)
    best_sdpa = {}
    for r in rows:
        if r["provider"].startswith("sdpa") and r["ms"]:
            best_sdpa[r["case"]] = min(best_sdpa.get(r["case"], math.inf), r["ms"])
    lines = [
        f"# {torch.cuda.get_device_name(0)}: bf16 matmul {MM_TFLOPS:.0f} TFLOP/s\n",
        "| case | provider | ms | TFLOP/s | % of matmul | vs best SDPA | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] else "-"
        tf = f"{r['tflops']:.0f}" if r["tflops"] else "-"
        frac = f"{100 * r['tflops'] / MM_TFLOPS:.0f}%" if r["tflops"] else "-"
        vs = f"{best_sdpa[r['case']] / r['ms']:.2f}x" if r["ms"] and r["case"] in best_sdpa else "-"
        lines.append(f"| {r['case']} | {r['provider']} | {ms} | {tf} | {frac} | {vs} | {r['note']} |")
    with open(f"{OUT}/results.md", "w") as f:
        f.write("\n".join(lines) + "\n")


def attention_case(name, B, H, Lq, Lk, D):
    q, k, v = (torch.randn(B, H, L, D, device=DEV, dtype=torch.bfloat16) for L in (Lq, Lk, Lk))
    do = torch.randn(B, H, Lq, D, device=DEV, dtype=torch.bfloat16)
    scale = D**-0.5
    flops = 4 * B * H * Lq * Lk * D * 3.5  # forward 4 BHLqLkD, backward 2.5x the forward

    def cuda():
        o, lse = torch.ops.mmfast.cross_attention_forward(q, k, v, None, None, False, scale, 0.0, 0)
        torch.ops.mmfast.cross_attention_backward(do, q, k, v, o, lse, None, None, False, scale, 0.0, 0, False)

    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def triton():
        mmfast.cross_attention(qg, kg, vg, backend="triton").backward(do)

    note = ""
    try:  # correctness at this size: the cuda forward against SDPA's math backend in fp32
        o, _ = torch.ops.mmfast.cross_attention_forward(q, k, v, None, None, False, scale, 0.0, 0)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        note = f"max |out - sdpa fp32| = {(o.float() - ref).abs().max().item():.2e}"
    except Exception as e:  # noqa: BLE001
        note = f"{type(e).__name__}: {e}"[:200]
    record(name, "cuda", cuda, flops, note)
    record(name, "triton", triton, flops)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):

        def sdpa(backend=backend):
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(qg, kg, vg).backward(do)

        record(name, f"sdpa {backend.name.lower()}", sdpa, flops)


def info_nce_case(N=65536, D=768):
    name = f"info_nce bf16 N={N} D={D}"
    img = F.normalize(torch.randn(N, D, device=DEV), dim=-1).to(torch.bfloat16).requires_grad_()
    txt = F.normalize(torch.randn(N, D, device=DEV), dim=-1).to(torch.bfloat16).requires_grad_()
    scale = torch.tensor(14.3, device=DEV, requires_grad=True)
    flops = 8 * N * N * D
    for backend in ("cuda", "triton"):
        record(name, backend, lambda b=backend: mmfast.info_nce(img, txt, scale, backend=b).backward(), flops)
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        rows.append(dict(case=name, provider="inf-cl", ms=None, tflops=None, note="inf-cl not installed"))
        write_tables()
        return
    img32, txt32 = (x.detach().float().requires_grad_() for x in (img, txt))

    def infcl():  # bidirectional: one call per direction (fp32 inputs, as inf-cl takes)
        loss = (cal_inf_loss(img32, txt32, scale=scale) + cal_inf_loss(txt32, img32, scale=scale)) / 2
        loss.backward()

    record(name, "inf-cl", infcl, flops)


attention_case("cross_attention bf16 B=16 H=16 L=2048 D=128", 16, 16, 2048, 2048, 128)
attention_case("cross_attention bf16 B=64 H=12 Lq=32 Lk=1024 D=64", 64, 12, 32, 1024, 64)
info_nce_case()

write_tables()
print(open(f"{OUT}/results.md").read())
PYEOF
step bench "$BENCH_S" env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$OUT/bench.py" "$OUT"

echo
cat "$SUMMARY"
[ -f "$OUT/results.md" ] && cat "$OUT/results.md"
exit "$FAILED"
