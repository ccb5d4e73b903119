#!/usr/bin/env bash
# The GPU check in one device call (no network there): installs nothing but the wheels carried in .whl/ (make
# gpu-wheels builds them here: albumentations and what it needs beyond torch, timm, opencv, pandas, scikit-learn),
# then runs seedlings.lab.gpu_check: throughput table, peak memory, one shortened fold; JSON in $OUT (or runs/gpu-check).
#   device run:  bash scripts/gpu-check.sh            (carry: .whl; about 5 minutes on one H100, estimated)
#   here:        bash scripts/gpu-check.sh --dry-run  (toy sizes on CPU; the test suite runs the same code)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && [ "${1:-}" = "--dry-run" ] && PY=.venv/bin/python  # here: the project's own venv
if ! "$PY" -c "import albumentations" 2>/dev/null; then
  [ -d .whl ] || { echo "albumentations missing and no .whl/ to install it from (make gpu-wheels)" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
exec "$PY" -m seedlings.lab.gpu_check --out "${OUT:-runs/gpu-check}" "$@"
