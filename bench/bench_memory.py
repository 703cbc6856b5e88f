"""Peak memory and training-step time of a ~300M-parameter LLaMA-shaped model: float32 vs
bfloat16 base, with and without gradient checkpointing, a 4-bit (nf4) base, our LoRA vs
HF PEFT's LoRA under the same settings, with ratios (ours / PEFT), in one run.

The model is LLaMA-shaped (hidden 1024, 20 layers, 16 heads, 8 key-value heads, MLP 2816,
vocabulary 32000: 307M parameters) with random weights, built from a ``LlamaConfig`` and
saved once (safetensors + a word-level tokenizer) to a local directory, so both sides
load the same checkpoint from disk. Each configuration runs in a FRESH subprocess:

* ours: the recipe (``bench_memory`` recipe written next to the model, the configuration
  as ``--set`` overrides, exactly as ``lrr run recipe --set ...``) is loaded and validated
  by ``lowrank_runner.recipe.load_recipe``; the adapted model is built by
  ``modeling.build_adapted_model`` (what ``lrr run`` calls: dtype, quantization, targets,
  injection, trainable parameters) and checkpointing is switched on by
  ``train.memory.enable_gradient_checkpointing`` (the one place ``lrr`` does it);
* PEFT: ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``BitsAndBytesConfig``) and
  ``peft.get_peft_model`` with the same r, alpha, dropout and target modules; checkpointing
  by transformers' ``gradient_checkpointing_enable(use_reentrant=False)`` with
  ``enable_input_require_grads``.

Both then run the same loop: a fixed random batch (``--batch`` x ``--seq`` tokens, labels =
inputs), forward + backward + ``torch.optim.AdamW`` step over the trainable parameters,
``--warmup`` unmeasured steps then ``--steps`` measured ones (median step time). Memory:
on CPU the peak resident set of the training phase (``VmHWM`` after resetting it through
``/proc/self/clear_refs`` once the model is built) and of loading (``VmHWM`` before the
reset); on CUDA ``torch.cuda.max_memory_allocated`` over each phase. A training step of a full ``lrr run`` is the same computation; the
in-process loop leaves out what would blur the comparison (data pipeline, evaluation,
Accelerate's wrappers are the same bytes on both sides or absent on PEFT's).

    python bench/bench_memory.py                              # CPU: 8 configurations (+ 4-bit with --quantize 4)
    python bench/bench_memory.py --device cuda --quantize 4 --json out.json
    python bench/bench_memory.py --configs fp32,bf16-ckpt --impls ours,peft --steps 3

Not a test: numbers go to docs/benchmarks.md ("Memory: large backbones").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# name -> (base dtype, gradient checkpointing, quantization bits); the 4-bit base computes in bfloat16
CONFIGS = {
    "fp32": ("float32", False, None),
    "fp32-ckpt": ("float32", True, None),
    "bf16": ("bfloat16", False, None),
    "bf16-ckpt": ("bfloat16", True, None),
    "nf4": ("bfloat16", False, 4),
    "nf4-ckpt": ("bfloat16", True, 4),
}
DEFAULT_CONFIGS = ("fp32", "fp32-ckpt", "bf16", "bf16-ckpt")
IMPLS = ("ours", "peft")
TARGETS = ["Wq", "Wk", "Wv", "Wa", "Wm", "Wo"]  # every linear layer of a LLaMA block (QLoRA's choice)
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"]
SHAPES = {  # --size: LLaMA-shaped configs (hidden, layers, heads, kv heads, MLP, vocabulary)
    "300m": dict(hidden_size=1024, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=2816, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),  # smoke runs of this script only
}
DEVICE_DEFAULTS = {"batch": (1, 8), "seq": (256, 1024), "steps": (1, 5), "warmup": (1, 2)}  # (CPU, CUDA)
QUANTIZATION = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}


# --------------------------------------------------------------------------- the model


def save_model(directory: Path, size: str, max_positions: int) -> Path:
    """A random-weight LLaMA-shaped causal LM and a word-level fast tokenizer, saved as a
    local model directory (config.json + model.safetensors + tokenizer files)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    if (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file():
        return directory
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPES[size], max_position_embeddings=max(max_positions, 512), bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, safe_serialization=True)
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(directory)
    return directory


def write_recipe(directory: Path, model_dir: Path, r: int, seq: int) -> Path:
    """The recipe `ours` loads: LoRA r/alpha=2r on every linear layer of the model, the
    data-to-text task on a two-line file (only the recipe's model settings are used)."""
    data = directory / "train.jsonl"
    data.write_text('{"source": "w1 w2", "target": "w3"}\n{"source": "w4", "target": "w5 w6"}\n')
    recipe = directory / "bench_memory.yaml"
    recipe.write_text(
        "name: bench-memory\n"
        f"backbone: {{name: {json.dumps(str(model_dir))}}}\n"
        f"targets: [{', '.join(TARGETS)}]\n"
        f"method: {{name: lora, r: {r}, alpha: {2 * r}, dropout: 0.0}}\n"
        f"task: {{name: data_to_text, data: {{train: {json.dumps(str(data))}, validation: {json.dumps(str(data))}}}, "
        f"max_length: {seq}}}\n"
        "training: {batch_size: 2, max_steps: 1}\n")
    return recipe


def recipe_overrides(config: str) -> list[str]:
    """The ``--set`` overrides of one configuration (what a user writes on the command line)."""
    dtype, checkpointing, bits = CONFIGS[config]
    out = [f"backbone.dtype={dtype}", f"training.gradient_checkpointing={'true' if checkpointing else 'false'}"]
    if bits:
        out.append("backbone.quantization=" + json.dumps(QUANTIZATION, separators=(", ", ": ")).replace('"', ""))
    return out


# --------------------------------------------------------------------------- one configuration


def build_ours(args, device):
    """Our LoRA, built as ``lrr run`` builds it: the recipe with the configuration's
    ``--set`` overrides is loaded and validated, and the training loop's own model set-up
    (``TrainingRun._setup_model``: ``modeling.build_adapted_model``, the trainable
    parameters' dtype, ``train.memory.enable_gradient_checkpointing``) builds the model."""
    from lowrank_runner.backbones import resolve
    from lowrank_runner.recipe.load import load_recipe
    from lowrank_runner.tasks.base import build_task
    from lowrank_runner.train.loop import TrainingRun

    recipe = load_recipe(args.recipe, recipe_overrides(args.config))
    run = recipe.runs[0]
    trainer = TrainingRun(recipe, run, Path(args.recipe).parent / "run", argv=[])
    trainer.task, trainer.ref = build_task(run.config["task"]), resolve(run.config["backbone"])
    trainer._setup_model()
    return place(trainer.adapted.model, device), trainer.method, trainer.adapters


def build_peft(args, device):
    """PEFT's LoRA on the same checkpoint, with the same dtype, quantization, r, alpha,
    dropout and target modules; checkpointing as transformers/PEFT users switch it on.
    (``prepare_model_for_kbit_training`` is not called: it would upcast the embeddings,
    norms and output layer to float32, which our side does not do.)"""
    import peft
    import torch
    import transformers

    dtype, checkpointing, bits = CONFIGS[args.config]
    kwargs = {"dtype": getattr(torch, dtype)}
    if bits:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=QUANTIZATION["type"], bnb_4bit_use_double_quant=QUANTIZATION["double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, QUANTIZATION["compute_dtype"]))
        if device.type == "cuda":
            kwargs["device_map"] = {"": 0}
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                       target_modules=PEFT_TARGETS, task_type="CAUSAL_LM"))
    return place(model, device), None, None


def place(model, device):
    """The model on the device (a quantized model is placed where it was loaded)."""
    if device.type == "cuda" and next(model.parameters()).device.type != "cuda":
        model = model.to(device)
    return model.train()


def memory_now(device) -> float:
    """MB in use now: CUDA allocated memory, or this process's resident set."""
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return _proc_status("VmRSS")


def _proc_status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device) -> bool:
    """Start the training-phase peak here; False where the kernel refuses the RSS reset."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_since_reset(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _proc_status("VmHWM")


def worker(args) -> dict:
    """One configuration in this (fresh) process: build, warm up, time the steps."""
    import resource

    import torch

    import peft  # noqa: F401  both sides import the same libraries first: the same interpreter baseline
    import transformers  # noqa: F401

    import lowrank_runner.train.loop  # noqa: F401

    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    t0 = time.perf_counter()
    model, method, adapters = (build_ours if args.impl == "ours" else build_peft)(args, device)
    load_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    model_mb = memory_now(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    load_peak_mb = peak_since_reset(device)  # the peak so far: loading (a fresh process's VmHWM)
    reset = reset_peak(device)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        extra = method.extra_loss(adapters) if method is not None else None
        (loss if extra is None else loss + extra).backward()
        opt.step()
        if method is not None:
            method.after_optimizer_step(i + 1, adapters, opt)
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        losses.append(float(loss.detach()))
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return {
        "impl": args.impl, "config": args.config, "device": str(device),
        "median_step_s": statistics.median(times), "steps_s": times, "load_s": load_s,
        "model_mb": model_mb, "train_peak_mb": peak_since_reset(device) if reset else None,
        "load_peak_mb": load_peak_mb,
        # ru_maxrss is kept across exec (Linux): it starts at the driver's RSS; VmHWM does not
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_loss": losses[0], "last_loss": losses[-1],
        "params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in trainable),
        "weight_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if not p.requires_grad}),
        "trainable_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in trainable}),
    }


# --------------------------------------------------------------------------- the driver


def run_config(args, impl: str, config: str) -> dict:
    """One configuration in a fresh subprocess; its JSON line (or the failure, shortened)."""
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--config", config, "--model", str(args.model),
           "--recipe", str(args.recipe), "--device", args.device, "--threads", str(args.threads)] + [
        f"--{k}={getattr(args, k)}" for k in ("r", "batch", "seq", "steps", "warmup")]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "config": config, "error": f"timed out after {args.timeout} s"}
    if out.returncode != 0:
        tail = [line for line in out.stderr.strip().splitlines() if line.strip()][-3:]
        return {"impl": impl, "config": config, "error": " | ".join(tail)[-600:] or f"exit {out.returncode}"}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t
    return result


def ratio(a, b) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def table(results: list[dict], configs: list[str], impls: list[str]) -> list[dict]:
    """Rows per (configuration, implementation) with ours/PEFT ratios and ratios to the
    float32 base without checkpointing (same implementation)."""
    by = {(r["config"], r["impl"]): r for r in results}
    rows = []
    for config in configs:
        for impl in impls:
            r = by.get((config, impl))
            if r is None:
                continue
            peak = r.get("train_peak_mb")
            peft_r, base = by.get((config, "peft"), {}), by.get(("fp32", impl), {})
            rows.append({**r, "peak_vs_peft": ratio(peak, peft_r.get("train_peak_mb")) if impl == "ours" else None,
                         "time_vs_peft": ratio(r.get("median_step_s"), peft_r.get("median_step_s")) if impl == "ours" else None,
                         "peak_vs_fp32": ratio(peak, base.get("train_peak_mb"))})
    return rows


def _f(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(rows: list[dict], device: str) -> str:
    """The Markdown table (memory in MB; "train peak" is what the training steps reach)."""
    label = "CUDA max allocated" if device.startswith("cuda") else "peak RSS"
    lines = [f"| config | impl | step (s) | time ours/peft | train {label} (MB) | peak ours/peft | peak / fp32 | "
             f"model (MB) | loading {label} (MB) | trainable | 1st loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['impl']} | failed: {r['error']} |||||||||")
            continue
        lines.append(
            f"| {r['config']} | {r['impl']} | {r['median_step_s']:.3f} | {_f(r['time_vs_peft'], '.3f')} | "
            f"{_f(r['train_peak_mb'], '.0f')} | {_f(r['peak_vs_peft'], '.3f')} | {_f(r['peak_vs_fp32'], '.3f')} | "
            f"{r['model_mb']:.0f} | {r['load_peak_mb']:.0f} | {r['trainable']:,} | {r['first_loss']:.4f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--quantize", type=int, choices=[4], default=None,
                    help="also run the 4-bit nf4 base (bfloat16 compute, double quantization), with and without checkpointing")
    ap.add_argument("--configs", default=None, help=f"comma-separated, from {', '.join(CONFIGS)} (default: "
                    f"{', '.join(DEFAULT_CONFIGS)}, plus nf4 and nf4-ckpt with --quantize 4)")
    ap.add_argument("--impls", default="ours,peft")
    ap.add_argument("--size", choices=sorted(SHAPES), default="300m")
    ap.add_argument("--model", default=None, help="model directory (written there once if empty; default: a temp dir)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: 1 on CPU, 8 on CUDA)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 256 on CPU, 1024 on CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default: 1 on CPU, 5 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="unmeasured steps first (default: 1 on CPU, 2 on CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration before it counts as failed")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--save-model", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for key, (cpu, cuda) in DEVICE_DEFAULTS.items():  # a CPU run of 8-12 configurations in minutes
        if getattr(args, key) is None:
            setattr(args, key, cuda if args.device.startswith("cuda") else cpu)
    return args


def selected_configs(args) -> list[str]:
    configs = args.configs.split(",") if args.configs else list(DEFAULT_CONFIGS) + (["nf4", "nf4-ckpt"] if args.quantize else [])
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"bench_memory.py: --configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    return configs


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.save_model:
        save_model(Path(args.save_model), args.size, args.seq)
        return
    configs, impls = selected_configs(args), args.impls.split(",")
    with tempfile.TemporaryDirectory(prefix="lrr-bench-memory-") as tmp:
        args.model = Path(args.model or Path(tmp) / "model")
        subprocess.run([sys.executable, __file__, "--save-model", str(args.model), "--size", args.size,
                        f"--seq={args.seq}"], check=True)  # in a child: this driver stays small
        args.recipe = write_recipe(Path(tmp), args.model, args.r, args.seq)
        t = time.perf_counter()
        results = [run_config(args, impl, config) for config in configs for impl in impls]
        total = time.perf_counter() - t
    rows = table(results, configs, impls)
    ok = next((r for r in rows if "error" not in r), {})
    print(f"LLaMA-shaped {args.size} ({ok.get('params', 0) / 1e6:.0f}M parameters), LoRA r={args.r} alpha={2 * args.r} on "
          f"q,k,v,o,gate,up,down, batch {args.batch} x {args.seq} tokens, {args.warmup} warm-up + {args.steps} measured "
          f"AdamW steps, device {args.device}, each configuration in a fresh process ({total:.0f} s in all)")
    print()
    print(markdown(rows, args.device))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
