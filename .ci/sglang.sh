#!/usr/bin/env bash
# CI, part 2: BD3-LM served by SGLang (docs/sglang.md). SGLang gets an environment of its own, apart from the
# main one: `pip install -e ".[sglang]"` pins sglang==0.5.23, which pins torch==2.14.1 (a CUDA build; it runs
# on CPU) and its own transformers. Then tests/test_sglang.py runs there, on CPU (about 6 min install, 5 min tests
# on a 2-core machine). BD3LM_SGLANG_VENV: where the environment goes (default /tmp/bd3lm-sglang-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${BD3LM_SGLANG_VENV:-/tmp/bd3lm-sglang-venv}"
start=$(date +%s)
python -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -e ".[sglang]" pytest
echo "sglang environment at $VENV: $(du -sh "$VENV" | cut -f1), built in $(( $(date +%s) - start )) s"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --basetemp="$VENV-pytest" tests/test_sglang.py
