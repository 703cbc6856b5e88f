"""``report.md``: the human-readable report of a run, rendered from its ``report.json``
(and the per-epoch rows and plots written beside it). Torch-free."""

from __future__ import annotations

import shlex
from pathlib import Path


def fmt(value) -> str:
    """Numbers for people: floats with 4 decimals (or 4 significant digits when tiny)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if value and abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def _num(value) -> str:
    """A quantity without padding zeros (1.0 → 1, 549.9 → 549.9)."""
    return "–" if value is None else f"{value:,.6g}" if isinstance(value, float) else fmt(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c.replace("|", "\\|") for c in row) + " |"
            for row in rows]
    return out + [""]


def _metric_names(*evals) -> list[str]:
    return list(dict.fromkeys(k for e in evals if e for k in e))


def _short(text: str | None, n: int = 12) -> str:
    return f"`{text[:n]}`" if text else "–"


def run_markdown(report: dict, plots_at: str | None = None) -> str:
    """The report; its plots as images (``report.md``), or, with ``plots_at`` (the run
    directory, for a terminal, which shows no images), as the paths of their PNG files."""
    r, lines = report, []
    rec, run = r.get("recipe", {}), r.get("run", {})
    parts = [rec.get("name"), run.get("task"), None if run.get("seed") is None else f"seed {run['seed']}"]
    title = " · ".join(str(x) for x in parts if x is not None)
    lines += [f"# Run report: {title}" if title else "# Run report", ""]
    status = r.get("status", "unknown")
    lines.append(f"**Status:** {status}" + (f" — {r['error']}" if r.get("error") else "")
                 + (f" · started {r['started_at']} · finished {r['finished_at']} (UTC)" if r.get("finished_at") else ""))
    lines.append("")

    if not rec:  # a run that failed before it got far: its status is all there is
        return "\n".join(lines).rstrip() + "\n"
    lines += ["## Reproduce", ""]
    if r.get("command"):
        lines += ["```", shlex.join(r["command"]), "```", ""]
    lines += [f"- recipe: `{rec.get('source')}` (run from `{r.get('cwd', '?')}`)",
              f"- recipe hash `{rec.get('hash')}` · this run's config hash `{rec.get('config_hash')}` "
              "(SHA-256 of the resolved recipe's canonical JSON; the resolved recipe is in `recipe.yaml`)"]
    if rec.get("overrides"):
        lines.append("- overrides: " + ", ".join(f"`--set {o}`" for o in rec["overrides"]))
    seeds = r.get("seeds")
    if seeds:
        lines.append(f"- seeds: run {seeds['run']} (Python/NumPy/torch), data order {seeds['data_order']}, "
                     f"holdout split {fmt(seeds['holdout_split'])}; the recipe's seeds: {seeds['recipe']}")
    if run.get("resumed_from_step"):
        lines.append(f"- resumed from the checkpoint at step {run['resumed_from_step']} (wall time counts since then)")
    early = r.get("stopped_early")
    if early:  # train/stopping.py: early stopping or a search's pruner ended training
        lines.append(f"- stopped early at step {early.get('step')}: {early.get('reason')}")
    for tracker in r.get("trackers") or ():  # output.trackers (train/tracking.py)
        lines.append(f"- tracked with {tracker.get('name')}: {tracker.get('writes')}")
    lines.append("")

    lines += _results(r, plots_at)
    lines += _model(r)
    lines += _data(r)
    lines += _compute(r)
    return "\n".join(lines).rstrip() + "\n"


def _results(r: dict, plots_at: str | None = None) -> list[str]:
    best = r.get("best")
    if not best:
        return []
    lines = ["## Results", ""]
    metric = best.get("metric")
    lines.append(f"Selection metric **{metric}**; best checkpoint (saved in `{best.get('checkpoint', 'adapter/')}`): "
                 f"**{fmt(best.get('value'))}** at step {best.get('step')} (epoch {_num(best.get('epoch'))}).")
    lines.append("")
    final, test = r.get("final_eval"), r.get("test")
    names = _metric_names(best.get("eval"), final, test)
    rows = [["best checkpoint (step %s)" % best.get("step"), *[(best.get("eval") or {}).get(n) for n in names]],
            ["last evaluation (step %s)" % (r.get("steps") or {}).get("total"), *[(final or {}).get(n) for n in names]]]
    if test:
        rows.append(["test: selected checkpoint on the test set", *[test.get(n) for n in names]])
    lines += _table(["", *names], rows)
    epochs = r.get("per_epoch") or []
    if epochs:
        names = _metric_names(*(e["eval"] for e in epochs))
        lines += ["Per epoch (training loss: mean of the logged steps; evaluation: the epoch's last):", ""]
        lines += _table(["epoch", "last step", "train loss", "eval step", *names],
                        [[e["epoch"], e["last_step"], e["train_loss"], e["eval_step"],
                          *[(e["eval"] or {}).get(n) for n in names]] for e in epochs])
    lines += _plots((r.get("files") or {}).get("plots") or {}, plots_at)
    pattern = r.get("rank_pattern")
    if pattern:
        lines += [f"Final rank pattern: total rank {pattern['total_rank']} over {pattern['modules']} modules "
                  f"(`{pattern['file']}`; heatmap `{pattern['heatmap']}`):", ""]
        lines += _table(["module", "rank"], [[f"`{m}`", rank] for m, rank in (pattern.get("pattern") or {}).items()])
    return lines


def _plots(plots: dict, at: str | None) -> list[str]:
    if at is None:
        return [line for name, caption in plots.items() for line in (f"![{caption}]({name})", "")]
    if not plots:
        return []
    return ["Plots (PNG files):", "", *(f"- {caption}: `{Path(at) / name}`" for name, caption in plots.items()), ""]


def _model(r: dict) -> list[str]:
    b = r.get("backbone")
    if not isinstance(b, dict):
        return []
    lines = ["## Model", ""]
    if b.get("source") == "hub":
        ident = f"hub `{b['location']}` revision {b.get('revision') or 'main'} → commit {_short(b.get('commit'), 40)}"
    else:
        ident = f"{b.get('source')} directory `{b.get('location')}`"
    lines.append(f"- backbone `{b.get('name')}`: {ident}; files fingerprint {_short(b.get('fingerprint'), 16)}")
    for name, f in (b.get("files") or {}).items():
        digest = f.get("sha256") or f.get("blob")
        extra = f" ({fmt(f['bytes'])} bytes, {f['method']})" if "bytes" in f else ""
        lines.append(f"  - `{name}` {_short(digest, 16)}{extra}")
    if b.get("tokenizer"):
        lines.append(f"- tokenizer `{b['tokenizer']['name']}`: fingerprint {_short(b['tokenizer'].get('fingerprint'), 16)}")
    m = r.get("method") or {}
    params = ", ".join(f"{k}={v}" for k, v in m.items() if k != "name")
    lines.append(f"- method **{m.get('name')}**({params}) on targets {r.get('targets')} ({r.get('modules')} modules)")
    origin = r.get("init_from")
    if origin:
        lines.append(f"- adapter started from `{origin['path']}` (task {origin.get('task')}, recipe hash "
                     f"{_short(origin.get('recipe_hash'), 16)}); the task head was trained fresh")
    lines.append(f"- parameters: adapter {fmt(r.get('adapter_params'))}"
                 + (f" (allocated {fmt(r['adapter_params_allocated'])})" if r.get("adapter_params_allocated") else "")
                 + f" · trainable {fmt(r.get('trainable_params'))} ({fmt(r.get('trainable_percent'))}% of "
                 f"{fmt(r.get('total_params'))})")
    lines += _precision(r.get("precision"))
    lines.append("")
    return lines


def _precision(p: dict | None) -> list[str]:
    """The dtypes a run trained with (train/memory.py: precision_record)."""
    if not isinstance(p, dict):
        return []
    quant = p.get("quantization")
    base = f"{p.get('backbone_dtype')}" + (f", quantized {quant.get('bits')}-bit {quant.get('type') or ''}".rstrip()
                                           if isinstance(quant, dict) else "")
    return [f"- precision: backbone {base} · adapters {p.get('adapter_dtype') or '–'} · head {p.get('head_dtype') or '–'}"
            f" · optimizer state {p.get('optimizer_state_dtype') or '–'} · gradient checkpointing "
            f"{'on' if p.get('gradient_checkpointing') else 'off'}"]


def _data(r: dict) -> list[str]:
    d = r.get("data")
    if not isinstance(d, dict):
        return []
    lines = ["## Data", ""]
    if d.get("source") == "hub":
        lines.append(f"- task `{d.get('task')}` from hub dataset `{d.get('dataset')}` at commit {_short(d.get('revision'), 40)}")
    else:
        lines.append(f"- task `{d.get('task')}` from local files (fingerprint {_short(d.get('fingerprint'), 16)}):")
        for f in d.get("files") or []:
            lines.append(f"  - {f['role']}: `{f['path']}` sha256 `{f['sha256']}` ({fmt(f['bytes'])} bytes)")
    splits = d.get("splits") or {}
    if splits:
        lines.append("- loaded splits: " + ", ".join(f"{n} {fmt(s['rows'])} rows (datasets fingerprint "
                                                        f"`{s['fingerprint']}`)" for n, s in splits.items()))
    steps = r.get("steps") or {}
    lines.append(f"- {fmt(r.get('train_examples'))} training and {fmt(r.get('eval_examples'))} selection examples; "
                 f"{fmt(steps.get('total'))} optimizer steps ({fmt(steps.get('per_epoch'))} per epoch, "
                 f"{fmt(steps.get('warmup'))} warmup)")
    if r.get("batch"):  # plan/schedule.py's batch plan
        b = r["batch"]
        lines.append(f"- batch {fmt(b['effective'])} per optimizer step = {fmt(b['per_device'])} per device x "
                     f"{fmt(b['accumulation'])} accumulation x {fmt(b['processes'])} process(es) "
                     f"(training.batch_size_per: {b['batch_size_per']})")
    if r.get("holdout"):
        h = r["holdout"]
        lines.append(f"- checkpoint selected on a held-out {h['fraction']} of train (seed {h['seed']}); "
                     f"test examples: {h['test_examples']}")
    elif r.get("test_examples"):
        lines.append(f"- selected checkpoint scored once on the test set(s); test examples: {r['test_examples']}")
    lines.append("")
    return lines


def _compute(r: dict) -> list[str]:
    env = r.get("environment")
    if not isinstance(env, dict):
        return []
    hw, own = env.get("hardware", {}), env.get("lowrank_runner", {})
    mem = r.get("peak_memory") or {}
    gpus = ", ".join(hw.get("gpus") or []) or "none"
    lines = ["## Compute and environment", "",
             f"- wall time {_num(r.get('wall_time_s'))} s; peak memory: "
             + ", ".join(f"{k.removesuffix('_mb')} {_num(v)} MB" for k, v in mem.items()),
             f"- {hw.get('cpu')} ({hw.get('cpu_count')} CPUs); GPUs ({hw.get('gpu_count', len(hw.get('gpus') or []))}): "
             f"{gpus}; CUDA {hw.get('cuda') or '–'}; device {hw.get('device', '?')} × {hw.get('num_processes', 1)} "
             f"process(es), mixed precision {hw.get('mixed_precision', '?')}",
             f"- Python {env.get('python')} on {env.get('platform')}",
             f"- lowrank-runner {own.get('version')} (git commit {_short(own.get('commit'), 12)}"
             + ("" if own.get("dirty") is None else ", uncommitted changes" if own.get("dirty") else ", clean") + ")",
             ""]
    packages = env.get("packages") or {}
    lines += _table(["package", "version"], [[k, v or "not installed"] for k, v in packages.items()])
    return lines


def recipe_markdown(name: str, recipe_hash: str, source: str, command: list[str] | None, runs: list[dict],
                    results_md: str | None) -> str:
    """The root ``report.md`` of a multi-run recipe: the results table and one row per run
    linking its own report."""
    lines = [f"# Recipe report: {name}", "", f"Recipe `{source}`, hash `{recipe_hash}`."]
    if command:
        lines += ["", "```", shlex.join(command), "```"]
    lines.append("")
    if results_md:
        lines += ["## Results", "", results_md.rstrip(), ""]
    lines += ["## Runs", ""]
    rows = []
    for run in runs:
        best = run.get("best") or {}
        link = f"[{run['slug']}]({run['slug']}/report.md)" if run.get("has_report") else run["slug"]
        rows.append([link, run["task"], str(run["seed"]), run["status"], best.get("metric") or "–",
                     best.get("value"), best.get("step"), run.get("error") or ""])
    lines += _table(["run", "task", "seed", "status", "metric", "best", "step", "note"], rows)
    lines.append("Compare runs side by side with `lrr report <run dir> <run dir> ...` (or this directory).")
    return "\n".join(lines) + "\n"
