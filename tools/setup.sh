#!/usr/bin/env bash
# Install what mmfast needs and build mmfast._C in place (CUDA kernels too when a toolkit matching
# torch's CUDA is found). Idempotent: a second run only rebuilds what changed.
#   MMFAST_BUILD_CUDA=0 bash tools/setup.sh    # CPU-only, quick
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python -m pip install -q -r requirements.txt
log=build/setup.log
mkdir -p build
echo "mmfast: building the extension (log: $log) ..."
if ! MAX_JOBS="${MAX_JOBS:-2}" MMFAST_PTXAS_VERBOSE="${MMFAST_PTXAS_VERBOSE:-1}" \
    python setup.py build_ext --inplace > "$log" 2>&1; then
  tail -n 60 "$log"
  exit 1
fi
python -c "import mmfast, json; print('mmfast', json.dumps(mmfast.build_info()))"
