"""Inference latency of a merged checkpoint against its base model and the unmerged
adapter model, in one process, on the same batch. Not a test: numbers go to
docs/benchmarks.md (bench/gpu_check.sh runs it on a GPU).

A merged checkpoint has the base architecture, so its latency should equal the base
model's (ratio ~1.00); the adapter model pays for the extra low-rank products.

    python bench/bench_latency.py --run runs/qs --merged runs/qs-merged [--batch 32 --seq 128 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def timed(model, batch, iters: int, warmup: int, device) -> float:
    """Median seconds of one forward pass (no gradients)."""
    import torch

    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(**batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the run directory the merged checkpoint was exported from")
    ap.add_argument("--merged", required=True, help="the merged checkpoint (lrr export RUN --merge --out DIR)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import torch
    import transformers

    from lowrank_runner.export.source import load_trained_model
    from lowrank_runner.quiet import quiet_libraries

    quiet_libraries()  # no load reports or progress bars in the Markdown block

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    adapter_model, _, _, _ = load_trained_model(args.run)
    base_model, _, _, _ = load_trained_model(args.run, with_adapter=False)
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(args.merged, trust_remote_code=False)
    models = {"base": base_model, "merged": merged, "adapter (unmerged)": adapter_model}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, merged.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = {}
    for name, model in models.items():
        model.to(device=device, dtype=dtype).eval()
        rows[name] = timed(model, batch, args.iters, args.warmup, device)
        model.to("cpu")
    base = rows["base"]
    print(f"forward latency, batch {args.batch} x {args.seq} tokens, {args.dtype}, device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, median of {args.iters}")
    print("| model | latency (ms) | / base |")
    print("|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {1000 * seconds:.2f} | {seconds / base:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "latency_s": rows, "device": str(device)}, f, indent=2)


if __name__ == "__main__":
    main()
