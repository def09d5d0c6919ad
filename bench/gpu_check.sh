#!/usr/bin/env bash
# The data-path check of issue 8 on one machine (GPU or not): no Ray, in-process cache + torchrun training.
#   SIZE=full bash bench/gpu_check.sh      # on a GPU box (target: <= 6 minutes on one H200)
#   SIZE=tiny bash bench/gpu_check.sh      # on a CPU box, a couple of minutes: how this script is tested
# Missing pure-Python packages (pydantic, webdataset, deepspeed, ...) are installed from bench/wheels/
# (fetch them beforehand with bench/fetch_gpu_wheels.sh) into bench/out/site, which goes first on PYTHONPATH.
# Environment overrides: SIZE, IMAGES, SHARDS, TEACHER, STUDENT, PX, BATCH, EPOCHS, DECODE_PROCS, WORK, PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=bench/out/site
export WORK=${WORK:-bench/out/gpu_check}
rm -rf "$WORK"
mkdir -p "$WORK" "$SITE"
missing=()
for mod in pydantic webdataset deepspeed hjson einops braceexpand yaml click; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if ((${#missing[@]})); then
  echo "missing: ${missing[*]}; installing from bench/wheels"
  ls bench/wheels/*.whl >/dev/null 2>&1 || { echo "no wheels in bench/wheels: run bench/fetch_gpu_wheels.sh" >&2; exit 2; }
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" bench/wheels/*.whl
fi
export PYTHONPATH="$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/bench/out/torch_extensions}
"$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || export DS_ACCELERATOR=cpu
exec "$PY" -m bench.gpu_check  # -m: bench/teacher_cache.py must not shadow the package
