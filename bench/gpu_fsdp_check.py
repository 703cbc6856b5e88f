"""FSDP check on GPUs (for bench/gpu_check.sh): ``training.fsdp`` on every visible GPU
(one is enough: the wrapping, the whole adapters and the checkpoint paths are the same).

A tiny LLaMA (random weights, built from a config) with LoRA2 (rank decisions inside the
run) and CondLoRA (shared maps): the FSDP run on N GPUs (torchrun, what ``accelerate
launch`` starts), stopped after step 3 and resumed, against a plain 1-process run;
then ``lrr export --merge`` of the sharded run. Prints one JSON line per method and
exits 1 when a check fails.

    python bench/gpu_fsdp_check.py [--processes N] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = {
    "lora2": "{name: lora2, r: 4, k: 2, alpha: 8, target_rank: 1, t_init: 1, t_final: 2, mask_interval: 1}",
    "condlora": "{name: condlora, r: 4, alpha: 8}",
}


def write_inputs(work: Path) -> Path:
    """The tiny LLaMA, the data and the recipe (FSDP on, full precision for an exact comparison)."""
    from tests.conftest import save_tiny_backbone, write_sentiment_data

    backbone = save_tiny_backbone(work / "llama", "llama")
    train, validation = write_sentiment_data(work)
    points = "\n".join(f"    - {m}" for m in METHODS.values())
    recipe = work / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: gpu-fsdp
        backbone: {{name: {backbone}}}
        targets: [Wq, Wv]
        method: {{name: lora, r: 4, alpha: 8}}
        task:
          name: classification
          data: {{train: {train}, validation: {validation}}}
          max_length: 16
        training: {{learning_rate: 1.0e-2, epochs: 1, batch_size: 16, seed: 0, log_every: 1, mixed_precision: "no",
                    fsdp: {{enabled: true}}}}
        sweep:
          method:
        """).lstrip() + points + "\n")
    return recipe


def lrr(args: list[str], processes: int = 0) -> float:
    """Run ``lrr`` (under torchrun with ``processes`` > 0); its wall time. Exits on failure."""
    cmd = [sys.executable, "-m", "lowrank_runner", *args]
    if processes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m",
               "lowrank_runner", *args]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.time() - start


def losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln
            and '"eval"' not in ln]


def compare(one: Path, two: Path) -> dict:
    """Loss curves and adapter tensors of the two runs (largest relative difference)."""
    from safetensors.torch import load_file

    la, lb = losses(one), losses(two)
    a, b = load_file(one / "adapter" / "adapter.safetensors"), load_file(two / "adapter" / "adapter.safetensors")
    loss_rel = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la, lb)) if len(la) == len(lb) else math.inf
    tensor_rel = max((((a[k] - b[k].to(a[k])).abs().max() / a[k].abs().max().clamp_min(1e-12)).item()
                      for k in a if a[k].numel()), default=0.0) if a.keys() == b.keys() else math.inf
    report = json.loads((two / "report.json").read_text())
    return {"steps": len(lb), "loss_rel": loss_rel, "adapter_rel": tensor_rel, "fsdp": report.get("fsdp")}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=max(torch.cuda.device_count(), 1))
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lrr-fsdp-"))
    recipe = write_inputs(work)
    t_one = lrr(["run", str(recipe), "--output", str(work / "one")])  # one plain process: FSDP off (a note says so)
    t_stop = lrr(["run", str(recipe), "--output", str(work / "fsdp"), "--stop-after-step", "3"], args.processes)
    t_resume = lrr(["run", str(recipe), "--output", str(work / "fsdp"), "--resume"], args.processes)
    failed = False
    for method in METHODS:
        sub = Path("classification") / f"method={method}" / "seed0"
        row = {"method": method, "processes": args.processes, **compare(work / "one" / sub, work / "fsdp" / sub)}
        row["ok"] = row["steps"] == 6 and row["loss_rel"] < 1e-3 and row["adapter_rel"] < 1e-3 and bool(row["fsdp"])
        failed |= not row["ok"]
        print(json.dumps(row))
    t_export = lrr(["export", str(work / "fsdp" / "classification" / "method=condlora" / "seed0"), "--merge",
                    "--out", str(work / "merged")])
    print(json.dumps({"seconds": {"one_process": round(t_one, 1), "fsdp_stop": round(t_stop, 1),
                                  "fsdp_resume": round(t_resume, 1), "export_merge": round(t_export, 1)},
                      "work": str(work)}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
