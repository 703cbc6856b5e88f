"""Per-step cost of the rank allocators: LoRA2 importance pruning and TriAdaptLoRA growth
vs PEFT AdaLoRA.

Both sides adapt the same 72 modules (Wq, Wk, Wv, Wa, Wm, Wo of a 12-layer DeBERTa-v3-base
sized DeBERTa-v2 classifier with random weights) from rank 8 to an average rank of 2 on
the same cubic schedule (t_init, t_final, mask interval, betas). Each step runs, for each
side in turn, a forward/backward on the same random batch and ``optimizer.step()`` (not
timed), then the allocator call alone is timed: ``method.after_optimizer_step`` for ours,
``model.base_model.update_and_allocate`` for AdaLoRA. The sides are interleaved step by
step so machine noise hits both alike. Also counted: how many parameter elements get a
``|p * grad|`` sensitivity per step, read from the allocators' own state after a step.
TriAdaptLoRA grows from rank 1 to the same final budget (r_ref = 2 per module on average),
evaluating ‖L + U‖_F every mask interval after t_init (no gradients are scored).
Not a test: numbers go to docs/benchmarks.md.

    python bench/bench_allocator.py --small            # hidden 256, 4 layers: a quick run
    python bench/bench_allocator.py --steps 100 --json /tmp/allocator.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch
import transformers

from lowrank_runner.methods.inject import head_parameter_names
from lowrank_runner.methods.inject import inject, mark_trainable
from lowrank_runner.methods.registry import get_method_spec
from lowrank_runner.modeling import build_method
from lowrank_runner.targets import resolve_targets

TARGETS = ["Wq", "Wk", "Wv", "Wa", "Wm", "Wo"]
R, TARGET_R, ALPHA, BETA = 8, 2, 16, 0.85


def deberta_config(small: bool) -> transformers.DebertaV2Config:
    layers, hidden = (4, 256) if small else (12, 768)
    size = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
            "intermediate_size": 4 * hidden}
    return transformers.DebertaV2Config(  # DeBERTa-v3's relative attention
        vocab_size=128100, **size, max_position_embeddings=512, type_vocab_size=0, relative_attention=True,
        position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
        max_relative_positions=-1, position_biased_input=False, layer_norm_eps=1e-7, num_labels=2)


def backbone(args):
    torch.manual_seed(args.seed)  # identical random backbone on both sides
    model = transformers.AutoModelForSequenceClassification.from_config(deberta_config(args.small))
    targets = resolve_targets(TARGETS, "deberta-v2", [n for n, _ in model.named_modules()])
    return model, targets


def build_ours(args, schedule):
    model, targets = backbone(args)
    cfg = {"name": "lora2", **get_method_spec("lora2").defaults(), "r": R, "k": 1, "alpha": ALPHA, "dropout": 0.0,
           "init_std": 0.02, "orth_reg": 0.1, "orth_terms": ["PQ", "UV", "uv"], "target_rank": TARGET_R,
           "t_init": schedule["t_init"], "t_final": schedule["t_final"], "mask_interval": schedule["interval"],
           "beta1": BETA, "beta2": BETA}
    method = build_method(cfg)
    injection = inject(model, method, targets)
    mark_trainable(model, head_parameter_names(model))
    method.on_train_begin(args.steps)
    return model, injection, [t.path for t in targets]


def build_triadaptlora(args, schedule):
    model, targets = backbone(args)
    cfg = {"name": "triadaptlora", **get_method_spec("triadaptlora").defaults(), "growth": "linear", "r": 1,
           "r_ref": TARGET_R, "grow_by": 1, "alpha": ALPHA, "t_init": schedule["t_init"],
           "grow_interval": schedule["interval"]}
    method = build_method(cfg)
    injection = inject(model, method, targets)
    mark_trainable(model, head_parameter_names(model))
    method.on_train_begin(args.steps, adapters=injection.adapters)  # as the training loop calls it
    return model, injection


def build_adalora(args, schedule, paths):
    import peft

    model, _ = backbone(args)
    head_modules = sorted({n.split(".")[0] for n in head_parameter_names(model)})  # pooler, classifier
    config = peft.AdaLoraConfig(
        task_type="SEQ_CLS", init_r=R, target_r=TARGET_R, lora_alpha=ALPHA, lora_dropout=0.0, beta1=BETA, beta2=BETA,
        tinit=schedule["t_init"], tfinal=schedule["t_final"], deltaT=schedule["interval"], total_step=args.steps,
        orth_reg_weight=0.1, target_modules=paths, modules_to_save=head_modules)  # exact module paths
    model = peft.get_peft_model(model, config)
    prefix = "base_model.model."
    adapted = sorted(n.removeprefix(prefix) for n, m in model.named_modules()
                     if isinstance(m, peft.tuners.adalora.AdaLoraLayer))
    if adapted != sorted(paths):
        raise SystemExit(f"AdaLoRA adapted other modules than ours: {set(adapted) ^ set(paths)}")
    return model


def phase_of(step: int, total: int, schedule: dict) -> str:
    if step <= schedule["t_init"]:
        return "warm-up"
    return "pruning" if step <= total - schedule["t_final"] else "final"


def summarise(times: list[float], steps: list[int], total: int, schedule: dict) -> dict:
    rows = {}
    for phase in ("warm-up", "pruning", "final", "all"):
        sel = [t for t, s in zip(times, steps) if phase in ("all", phase_of(s, total, schedule))]
        if sel:
            rows[phase] = {"steps": len(sel), "median_ms": 1e3 * statistics.median(sel),
                           "mean_ms": 1e3 * statistics.fmean(sel), "max_ms": 1e3 * max(sel)}
    return rows


def count_by_kind(state: dict[str, torch.Tensor], kinds: tuple[str, ...]) -> dict[str, int]:
    """Elements per parameter kind in an allocator's sensitivity state (one entry per scored tensor)."""
    counts = dict.fromkeys((*kinds, "other"), 0)
    for key, tensor in state.items():
        kind = next((k for k in kinds if k in key.split(".")), "other")
        counts[kind] += tensor.numel()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps (t_init = t_final = steps // 5)")
    ap.add_argument("--interval", type=int, default=10, help="mask interval (AdaLoRA's deltaT)")
    ap.add_argument("--small", action="store_true", help="hidden 256, 4 layers instead of DeBERTa-v3-base size")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results (per-step times included) here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    schedule = {"t_init": args.steps // 5, "t_final": args.steps // 5, "interval": args.interval}

    ours, injection, paths = build_ours(args, schedule)
    tri, tri_injection = build_triadaptlora(args, schedule)
    theirs = build_adalora(args, schedule, paths)
    sides = {"lora2": ours, "triadaptlora": tri, "adalora": theirs}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for k, m in sides.items()}
    method = injection.method

    def allocate(side: str, step: int) -> None:
        if side == "adalora":
            theirs.base_model.update_and_allocate(step)
        elif side == "triadaptlora":
            tri_injection.method.after_optimizer_step(step, tri_injection.adapters, opts["triadaptlora"])
        else:
            method.after_optimizer_step(step, injection.adapters, opts["lora2"])

    g = torch.Generator().manual_seed(args.seed + 1)
    times: dict[str, list[float]] = {k: [] for k in sides}
    elements: dict[str, dict[str, int]] = {}
    for model in sides.values():
        model.train()
    t_start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = torch.randint(1000, 128100, (args.batch, args.seq), generator=g)
        labels = torch.randint(0, 2, (args.batch,), generator=g)
        for side, model in sides.items():
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss  # AdaLoRA adds its orth. reg.
            if side == "lora2":
                loss = loss + method.extra_loss(injection.adapters)
            elif side == "triadaptlora":
                loss = loss + tri_injection.method.extra_loss(tri_injection.adapters)
            loss.backward()
            opts[side].step()
            t = time.perf_counter()
            allocate(side, step)
            times[side].append(time.perf_counter() - t)
            opts[side].zero_grad(set_to_none=True)
        if step == 1:  # what each allocator scored, from its own state
            elements["lora2"] = count_by_kind(method.sensitivity.mean, ("lambda", "u", "U"))
            elements["adalora"] = count_by_kind(theirs.base_model.rankallocator.exp_avg_ipt, ("lora_A", "lora_B", "lora_E"))
    wall = time.perf_counter() - t_start

    steps = list(range(1, args.steps + 1))
    summary = {k: summarise(v, steps, args.steps, schedule) for k, v in times.items()}
    # TriAdaptLoRA scores no gradients: ‖L + U‖_F of each module's r x r block at growth steps only
    elements["triadaptlora"] = {"L+U (per growth step, final ranks)": sum(
        a.r * a.r for a in tri_injection.adapters.values())}
    scored = {k: sum(v.values()) for k, v in elements.items()}
    fewer = 100 * (1 - scored["lora2"] / scored["adalora"])
    final_ranks = {"lora2": sum(method.rank_pattern(injection.adapters).values()),
                   "triadaptlora": sum(tri_injection.method.rank_pattern(tri_injection.adapters).values()),
                   "adalora": sum(sum(v) for v in theirs.peft_config["default"].rank_pattern.values())}

    cfg = deberta_config(args.small)
    print(f"DeBERTa-v2 {cfg.hidden_size}h x {cfg.num_hidden_layers} layers, {len(paths)} adapted modules, "
          f"r {R} -> {TARGET_R}, {args.steps} steps (t_init {schedule['t_init']}, t_final {schedule['t_final']}, "
          f"interval {args.interval}), batch {args.batch} x {args.seq}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; wall {wall:.0f} s")
    print("\n| phase | steps | " + " | ".join(f"{k} median / mean (ms)" for k in sides)
          + " | lora2 / adalora (median) | triadaptlora / adalora (median) |")
    print("|---|---|" + "---|" * (len(sides) + 2))
    for phase in summary["adalora"]:
        row = [summary[k][phase] for k in sides]
        a = summary["adalora"][phase]["median_ms"]
        print(f"| {phase} | {row[0]['steps']} | " + " | ".join(f"{r['median_ms']:.3f} / {r['mean_ms']:.3f}" for r in row)
              + f" | {summary['lora2'][phase]['median_ms'] / a:.3f} | {summary['triadaptlora'][phase]['median_ms'] / a:.3f} |")
    print("\n| side | elements scored per step | by parameter | active ranks at the end |")
    print("|---|---|---|---|")
    for side in sides:
        parts = ", ".join(f"{k} {v:,}" for k, v in elements[side].items() if v)
        print(f"| {side} | {scored[side]:,} | {parts} | {final_ranks[side]} |")
    a = summary["adalora"]["all"]["mean_ms"]
    print(f"\nallocator time per step (overall mean) vs adalora: lora2 {summary['lora2']['all']['mean_ms'] / a:.3f}, "
          f"triadaptlora {summary['triadaptlora']['all']['mean_ms'] / a:.3f}; "
          f"sensitivity elements: {fewer:.2f}% fewer for lora2")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "schedule": schedule, "modules": len(paths), "summary": summary,
                       "sensitivity_elements": elements, "fewer_percent": fewer, "final_active_ranks": final_ranks,
                       "times_s": times, "wall_s": wall, "torch": torch.__version__,
                       "transformers": transformers.__version__, "peft": __import__("peft").__version__,
                       "machine": platform.platform(), "date": datetime.date.today().isoformat()}, f, indent=2)


if __name__ == "__main__":
    main()
