#!/usr/bin/env bash
# Install what mmfast needs, then mmfast itself as an editable package: `pip install -e .` builds
# mmfast._C in place (CUDA kernels too when a toolkit matching torch's CUDA is found), puts the
# repository on sys.path (import mmfast from any folder) and `mmfast-bench` on PATH.
# Idempotent: a second run only recompiles what changed (ninja; objects in build/temp.*).
#   MMFAST_BUILD_CUDA=0 bash tools/setup.sh                          # CPU-only, quick
#   MMFAST_REQUIREMENTS=requirements-ci.txt bash tools/setup.sh      # CI's exact versions
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
reqs="${MMFAST_REQUIREMENTS:-requirements.txt}"
echo "mmfast: installing the requirements ($reqs) ..."
set +e
python -m pip install --progress-bar off -r "$reqs" | grep --line-buffered -v "^Requirement already satisfied: .*(from "
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 0 ] || exit "$rc"

log=build/setup.log
mkdir -p build
echo "mmfast: building and installing (pip install -e . --no-build-isolation; full log: $log) ..."
# pip -v streams the build; keep its whole output in the log and show ninja's [n/m] line per file.
set +e
MAX_JOBS="${MAX_JOBS:-2}" MMFAST_PTXAS_VERBOSE="${MMFAST_PTXAS_VERBOSE:-1}" \
  python -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee "$log" |
  sed -u -n -E -e 's#^ *(\[[0-9]+/[0-9]+\]) .* -c [^ ]*/(csrc/[^ ]+) -o .*#  \1 \2#p' \
    -e 's#^ *(mmfast: .*)#  \1#p' -e 's#^ *ninja: no work to do.*#  ninja: nothing to recompile#p'
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
  grep -v "^ *$" "$log" | tail -n 60
  exit "$rc"
fi
grep "^Successfully installed" "$log" || true
python -m mmfast
