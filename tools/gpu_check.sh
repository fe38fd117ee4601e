#!/usr/bin/env bash
# The prepared GPU check (issue 15), run from the repository with what the GPU machine has: nothing to
# install, no network. Writes one Markdown report, $OUT/gpu_check.md (default ./gpu_check_out), and the
# sections' output beside it in gpu_check.log.
#
#   bash tools/gpu_check.sh            # everything, at most 8 minutes
#   bash tools/gpu_check.sh --quick    # a shorter second run
#   bash tools/gpu_check.sh --dry-run  # CPU only, tiny sizes: does the script work? (CI runs this)
#   bash tools/gpu_check.sh --sections decode,memory   # a subset
#
# The sections, their time limits and the report are tools/gpu_check.py; this wrapper sets the environment.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Compiled kernels: tests/conftest.py turns the Triton interpreter on unless the variable is already set.
export TRITON_INTERPRET=0
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OUT="${OUT:-$PWD/gpu_check_out}"
PYTHON="${PYTHON:-python3}"
# gpu_check.py keeps each section and the whole run inside their limits (465 s, --quick 275 s);
# `timeout` is only the backstop should the Python process itself hang.
backstop=480
for arg in "$@"; do
    case "$arg" in
        --quick) backstop=300 ;;
        --dry-run) backstop=1200 ;;
    esac
done
exec timeout --kill-after=10 "$backstop" "$PYTHON" tools/gpu_check.py --out "$OUT" "$@"
