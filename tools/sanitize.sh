#!/usr/bin/env bash
# The sanitizer pass: build mmfast._C's CPU kernels with ASan + UBSan in a copy of the tree
# (build/sanitize/tree, so the normal in-place build is untouched), then run pytest there with the
# runtime preloaded. Any sanitizer report aborts the process, so it fails the test run.
#   bash tools/sanitize.sh                       # build, then the default test selection below
#   bash tools/sanitize.sh tests/test_foo.py -k bar   # build, then these pytest arguments
# Environment: MMFAST_SANITIZE (default address,undefined), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
TREE=build/sanitize/tree
mkdir -p "$TREE"
# Tracked and untracked-but-not-ignored files: the working tree as it is, without build outputs.
# Files gone from the working tree are removed from the copy (build outputs and caches stay).
python - "$TREE" <<'PY'
import os, shutil, subprocess, sys
tree = sys.argv[1]
out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True)
files = {f for f in out.stdout.decode().split("\0") if f and os.path.isfile(f)}
for f in files:
    dst = os.path.join(tree, f)
    if not (os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(f)):
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        shutil.copy2(f, dst)
for top in ("mmfast", "tests", "csrc", "tools"):
    for d, _, names in os.walk(os.path.join(tree, top)):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), tree)
            if rel not in files and not n.endswith((".so", ".pyc")):
                os.remove(os.path.join(tree, rel))
PY
export MMFAST_SANITIZE="${MMFAST_SANITIZE:-address,undefined}"
echo "mmfast: sanitizer build ($MMFAST_SANITIZE, log: $TREE/build/sanitize.log) ..."
mkdir -p "$TREE/build"
start=$(date +%s)
if ! (cd "$TREE" && MAX_JOBS="${MAX_JOBS:-2}" python setup.py build_ext --inplace > build/sanitize.log 2>&1); then
  tail -n 60 "$TREE/build/sanitize.log"
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
# The build must really be instrumented (a lost compile flag would make this pass meaningless).
syms=$(nm -D "$TREE"/mmfast/_C*.so)
for pair in address:__asan_report_load8 undefined:__ubsan_handle_; do
  case ",$MMFAST_SANITIZE," in *",${pair%%:*},"*)
    [[ "$syms" == *"${pair#*:}"* ]] || { echo "sanitizer build lacks ${pair#*:}: not instrumented"; exit 1; } ;;
  esac
done

# detect_leaks=0: CPython and torch keep allocations alive at exit by design.
# halt_on_error / abort_on_error: the first report kills the process (pytest sees the crash).
# libstdc++ too: python does not link it, and ASan must find __cxa_throw when it starts.
LD_PRELOAD_LIBS="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:halt_on_error=1:abort_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
if [ "$#" -eq 0 ]; then
  # The CPU kernel tests, and the property tests of the cpu backend at a third of the ci examples
  # (the sanitize profile): the smallest set that runs every CPU kernel path, empty dimensions,
  # odd shapes and strides included, within CI's budget (.ci/run).
  export MMFAST_HYPOTHESIS_PROFILE="${MMFAST_HYPOTHESIS_PROFILE:-sanitize}"
  set -- tests/test_cross_attention.py tests/test_cross_attention_cpu_paths.py tests/test_cross_attention_ops.py \
    tests/test_contrastive.py tests/test_properties_cross_attention.py tests/test_properties_contrastive.py \
    -k "not triton and not emulated and (cpu or not properties)" -p no:cacheprovider -n 2
fi
cd "$TREE"
export LD_PRELOAD="$LD_PRELOAD_LIBS"
# The copy's package and extension, not an installed one (pip install -e . puts the checkout on sys.path).
python - <<'PY'
import os, mmfast, mmfast._C
here = os.path.realpath(".")
for f in (mmfast.__file__, mmfast._C.__file__):
    assert os.path.realpath(f).startswith(here + os.sep), f"imported {f}, not the sanitized copy in {here}"
print("sanitized build:", mmfast._C.__file__, mmfast.build_info())
PY
python -m pytest -q "$@"
