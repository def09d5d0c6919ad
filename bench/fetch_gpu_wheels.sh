#!/usr/bin/env bash
# Download the pure-Python wheels the GPU machine lacks (it has Python 3.12 and no network) into bench/wheels/
# (git-ignored), so bench/gpu_check.sh can install them there. About 7 MB. Versions: what this project's venv runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
mkdir -p bench/wheels
$PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d bench/wheels \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection "typing_extensions>=4.16" \
  webdataset==1.0.2 braceexpand hjson einops torch-pruning==1.6.1
# DeepSpeed has no wheel on PyPI: build one without ops (bf16 with a torch optimizer needs none)
DS_BUILD_OPS=0 $PIP wheel --quiet --no-deps --no-build-isolation -w bench/wheels deepspeed==0.19.8
ls -la bench/wheels
