"""Reading an export's source: a run directory written by ``lrr run`` or a bundle written
by ``lrr export --adapter``.

Every file is checked before the backbone is loaded: a damaged or missing file is an
error naming the file and the fix, never a traceback, and never a model exported with a
part silently left untrained. :func:`preflight` is what every export checks before
loading anything; :func:`read_run` reads the checked files (adapter_config.json,
recipe.yaml, the adapter and head tensors) and :func:`load_trained_model` rebuilds the
trained model from them.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowrank_runner.errors import BackboneError, ExportError, LrrError, UsageError
from lowrank_runner.export.common import BUNDLE_FORMAT, EXPORT_INFO, check_out
from lowrank_runner.methods.registry import method_specs
from lowrank_runner.quiet import quiet_bitsandbytes
from lowrank_runner.rundir.adapter import read_adapter_config, read_adapter_json, read_tensors, repair_hint
from lowrank_runner.rundir.files import read_recipe_header
from lowrank_runner.rundir.layout import (ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, CHECKPOINTS_DIR, ERROR_FILE,
                                          HEAD_WEIGHTS, METRICS_LOG, RECIPE_FILE, REPORT_FILE, checkpoint_dirs)
from lowrank_runner.rundir.lock import refuse_if_held
from lowrank_runner.rundir.search import final_runs
from lowrank_runner.tasks.registry import TASKS

quiet_bitsandbytes()  # peft imports bitsandbytes (lowrank_runner.quiet)


def _is_run_dir(source: Path) -> bool:
    return any((source / name).exists() for name in (ADAPTER_DIR, REPORT_FILE, METRICS_LOG, CHECKPOINTS_DIR))


def _unfinished_run(source: Path) -> LrrError | None:
    """An error for a run directory without a finished run's adapter (failed, still
    training or stopped, or its adapter/ deleted); None for a finished run."""
    report = _run_report(source)
    status = report.get("status")
    if status == "failed":
        return UsageError(f"{source}: the run failed ({report.get('error') or 'see ' + ERROR_FILE}), so it has no "
                          f"trained adapter to export; fix the cause and train it again (the traceback is in "
                          f"{source / ERROR_FILE})")
    checkpoints = [p.name for p in checkpoint_dirs(source, finished=False)]
    if (source / ADAPTER_DIR).is_dir() and (status == "completed" or not checkpoints):
        return None
    if status == "completed":
        return ExportError(f"{source / ADAPTER_DIR}: missing: the run completed, but its trained adapter is gone; "
                           f"{repair_hint(source, 'run')}")
    where = f" (latest checkpoint: {CHECKPOINTS_DIR}/{checkpoints[-1]})" if checkpoints else ""
    return UsageError(f"{source}: the run has not finished{where}: its adapter is saved in {ADAPTER_DIR}/ when "
                      "training ends. Continue it with: lrr run RECIPE --output RUN_DIR --resume, then export it")


def source_kind(source: Path) -> tuple[str, Path]:
    """``("run", RUN_DIR/adapter)`` or ``("bundle", DIR)``; a clear error for anything else
    (no such path, a file, an unfinished or failed run, a PEFT adapter, a multi-run root)."""
    if not source.exists():
        raise UsageError(f"{source}: no such run directory")
    if not source.is_dir():
        raise UsageError(f"{source}: not a directory; give a run directory written by 'lrr run' or an adapter bundle "
                         "written by 'lrr export --adapter'")
    config = source / ADAPTER_CONFIG
    bundle = not _is_run_dir(source) and (config.exists() or _exported_format(source) == BUNDLE_FORMAT)
    if bundle:  # its adapter_config.json missing, or a directory: named by read_adapter_json
        data = read_adapter_json(config, source, "bundle")
        if isinstance(data, dict) and "peft_type" in data:
            raise UsageError(f"{source}: a PEFT adapter (written by --peft); load it with peft.PeftModel.from_pretrained")
        return "bundle", source
    if _is_run_dir(source):
        refuse_if_held(source, "export it")  # still training: its adapter is not written yet
        unfinished = _unfinished_run(source)
        if unfinished is not None:
            raise unfinished
        return "run", source / ADAPTER_DIR
    info = _exported_format(source)
    if info is not None:
        raise UsageError(f"{source}: an export of format {info} (lrr_export.json), not a run or an adapter bundle; "
                         "export its source run instead (lrr_export.json 'source_run'), or load it with "
                         "transformers' from_pretrained")
    subruns = _subruns(source)
    hint = f"; it holds several runs, export one of: {', '.join(map(str, subruns))}" if subruns else ""
    raise UsageError(
        f"{source}: not a run directory written by 'lrr run' (no {ADAPTER_DIR}/{ADAPTER_CONFIG}) "
        f"nor an adapter bundle written by 'lrr export --adapter'{hint}"
    )


def _subruns(source: Path) -> list[Path]:
    """The run directories below ``source`` (a recipe's ``TASK-seedN``, a sweep's
    ``TASK/POINT/seedN``, or ``POINT/seedN`` below a sweep's task); in a search's directory its final runs (``best/``) first, then
    its trials."""
    best = final_runs(source)
    roots = [(best, ("", "*", "*/*/*"))] if best is not None else []
    found = []  # "*/*": below a sweep's task directory, POINT/seedN
    for root, patterns in [*roots, (source, ("*", "*/*", "*/*/*"))]:
        found += sorted(p.parent.parent for pattern in patterns
                        for p in root.glob(f"{pattern}/{ADAPTER_DIR}/{ADAPTER_CONFIG}".lstrip("/")))
    return list(dict.fromkeys(found))


def _exported_format(directory: Path) -> str | None:
    """The ``format`` of a directory written by ``lrr export`` (its lrr_export.json; None
    when there is none or it cannot be read)."""
    try:
        info = json.loads((directory / EXPORT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return str(info.get("format")) if isinstance(info, dict) and info.get("format") else None


def read_recipe_config(path: Path, source: Path, kind: str = "run") -> dict:
    """The run's resolved recipe (``recipe.yaml``), checked as ``lrr validate`` checks a
    recipe (schema and per-run checks; not ``training.init_from``, which only trains).
    ``backbone.name`` is left to :func:`backbone_location` (the backbone may have moved), a
    ``task.chat_template`` file to :func:`trained_chat_template` (relative to the run's directory)."""
    from lowrank_runner.errors import RecipeError
    from lowrank_runner.recipe.document import load_yaml
    from lowrank_runner.recipe.schema import document_validator
    from lowrank_runner.recipe.problems import schema_problems
    from lowrank_runner.recipe.validate import run_problems

    if not path.is_file():
        fix = ("restore it from a copy (the run's report.json holds the same config under recipe.config), or train "
               "the run again from its recipe") if kind == "run" else repair_hint(source, kind)
        raise ExportError(f"{path}: missing: the resolved recipe is what rebuilds the model; {fix}")
    try:
        doc = load_yaml(path)
        problems = schema_problems(doc, doc.data, document_validator(), skip=("method",))
        problems += run_problems(doc) if isinstance(doc.data, dict) else []
    except RecipeError as exc:
        doc, problems = None, exc.problems
    backbone = doc.data.get("backbone") if doc is not None and isinstance(doc.data, dict) else None
    named = isinstance(backbone, dict) and isinstance(backbone.get("name"), str)
    task = doc.data.get("task") if doc is not None and isinstance(doc.data, dict) else None
    templated = isinstance(task, dict) and isinstance(task.get("chat_template"), str)  # trained_chat_template finds it
    problems = [p for p in problems if p.severity == "error" and not (named and p.path == "backbone.name")
                and not (templated and p.path == "task.chat_template")]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ExportError(f"{problems[0]}{more}; the run's resolved recipe is damaged: {repair_hint(source, kind)}")
    lacking = _lacking(doc.data, path)
    if lacking:
        more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
        raise ExportError(f"{path}: {lacking[0]}{more} missing, which every run's resolved recipe has (defaults "
                          f"filled), and the file is not the config its header's hash names: it was truncated or "
                          f"edited; {repair_hint(source, kind)}")
    return doc.data


def _lacking(config: dict, path: Path) -> list[str]:
    """The settings of a resolved recipe (every default filled) that ``config`` lacks, as
    dotted keys; none when the header's config hash says the file is whole (written by an
    older lowrank-runner, before those settings existed)."""
    from lowrank_runner.recipe.hashing import canonical_hash
    from lowrank_runner.recipe.schema import resolve

    try:
        missing = _missing_keys(config, resolve(config))
        header = read_recipe_header(path)
        whole = header is not None and header["config_hash"] == canonical_hash(config)
    except (KeyError, ValueError, TypeError):  # an unregistered method (checked before), a value JSON cannot hold
        return []
    return [] if whole else missing


def _missing_keys(data: dict, full: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in full.items():
        if key not in data:
            out.append(prefix + key)
        elif isinstance(value, dict) and isinstance(data[key], dict):
            out += _missing_keys(data[key], value, f"{prefix}{key}.")
    return out


def read_head(adapter_dir: Path, adapter_cfg: dict, source: Path, kind: str) -> dict:
    """The trained head's tensors: exactly the parameters adapter_config.json names under
    ``head`` (a missing file would export an untrained head)."""
    names, path = adapter_cfg["head"], adapter_dir / HEAD_WEIGHTS
    if not names:
        if path.exists():
            raise ExportError(f"{path}: adapter_config.json names no head parameters ('head': []), yet this file "
                              f"exists; {repair_hint(source, kind)}")
        return {}
    if not path.is_file():
        raise ExportError(f"{path}: missing: the run trained a task head ({', '.join(names[:3])}"
                          f"{', ...' if len(names) > 3 else ''}) and without it the export would carry an untrained "
                          f"head; {repair_hint(source, kind)}")
    head = read_tensors(path, source, kind)
    missing, extra = sorted(set(names) - set(head)), sorted(set(head) - set(names))
    if missing or extra:
        what = f"lacks {', '.join(missing[:3])}" if missing else f"holds {', '.join(extra[:3])}, which adapter_config.json does not name"
        raise ExportError(f"{path}: {what} (adapter_config.json 'head': {', '.join(names[:3])}); {repair_hint(source, kind)}")
    return head


def _check_agreement(source: Path, adapter_dir: Path, config: dict, adapter_cfg: dict, kind: str) -> None:
    """recipe.yaml rebuilds the model, adapter_config.json describes the weights: the
    method and targets must be the same in both."""
    for key, default in (("method", None), ("targets", [])):
        if json.dumps(config.get(key, default), sort_keys=True) != json.dumps(adapter_cfg[key], sort_keys=True):
            raise ExportError(
                f"{source / RECIPE_FILE} and {adapter_dir / ADAPTER_CONFIG} disagree on '{key}' "
                f"({json.dumps(config.get(key))} vs {json.dumps(adapter_cfg[key])}): one of them was edited; "
                f"{repair_hint(source, kind)}")


def read_run(source: Path, backbone: str | None = None) -> tuple[dict, dict, dict, dict]:
    """The resolved run config and the adapter (config, weights, head) of a run directory
    or bundle, every file checked; ``backbone`` replaces the backbone location (a moved or
    downloaded copy). The backbone named in the config is checked to exist."""
    source = Path(source)
    kind, adapter_dir = source_kind(source)
    adapter_cfg = read_adapter_config(adapter_dir / ADAPTER_CONFIG, source, kind, methods=method_specs())
    config = read_recipe_config(source / RECIPE_FILE, source, kind)  # beside adapter/ or in the bundle
    _check_agreement(source, adapter_dir, config, adapter_cfg, kind)
    adapter = read_tensors(adapter_dir / ADAPTER_WEIGHTS, source, kind)
    lacking = sorted(set(adapter_cfg.get("base", [])) - set(adapter))
    if lacking:
        raise ExportError(f"{adapter_dir / ADAPTER_WEIGHTS}: lacks the trained backbone tensors "
                          f"{', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''} (adapter_config.json 'base'); "
                          f"{repair_hint(source, kind)}")
    head = read_head(adapter_dir, adapter_cfg, source, kind)
    location = backbone_location(source, config, backbone)
    config["backbone"] = {**config["backbone"], "name": location}
    return config, adapter_cfg, adapter, head


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``org/model``): absolute, ``./``, ``~``, or
    more than one ``/``."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def backbone_location(source: Path, config: dict, override: str | None) -> str:
    """Where to load the backbone from: ``--backbone`` (checked), else the recipe's
    ``backbone.name``; a relative local path is resolved against the directory the run
    was started from (report.json ``cwd``). A local backbone that is gone is an error
    naming the path and ``--backbone``."""
    from lowrank_runner.resources import expand_user, is_pkg_path

    if override is not None:
        return _checked_override(str(override))
    name = config["backbone"]["name"]
    if is_pkg_path(name) or expand_user(name).is_dir():
        return name
    cwd = _run_cwd(source)
    if cwd is not None and not expand_user(name).is_absolute() and (cwd / name).is_dir():
        return str(cwd / name)
    if _looks_like_path(name) or _recorded_local(source):
        relative = cwd is not None and not expand_user(name).is_absolute()
        where = str(cwd / name) if relative else name
        raise BackboneError(
            f"{source}: the run's backbone {where} (backbone.name in {source / RECIPE_FILE}) no longer exists; "
            "if it moved, point at it: lrr export ... --backbone PATH (or load_adapted(..., backbone=PATH))")
    return name


def _run_report(source: Path) -> dict:
    try:
        report = json.loads((source / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _run_cwd(source: Path) -> Path | None:
    cwd = _run_report(source).get("cwd")
    return Path(cwd) if isinstance(cwd, str) and cwd else None


def _recorded_local(source: Path) -> bool:
    backbone = _run_report(source).get("backbone")
    return isinstance(backbone, dict) and backbone.get("source") in ("local", "package")


def loaded_backbone(source: Path, adapter_cfg: dict, ref, override: str | None) -> dict:
    """What an export records of the backbone it loaded (``ref``): the run's entry
    (``name``), where it was actually loaded from (``resolved``; ``override``: the
    ``--backbone`` given, if any), the run's own location (``run_resolved``), and whether
    its files are those the run trained on: ``same_as_run`` compares the fingerprint of
    the loaded files (train/fingerprint.py) with the one the run recorded (report.json
    ``backbone.fingerprint``; a bundle's adapter_config.json ``backbone.fingerprint``),
    None when either is unknown or they are of different kinds (a hub snapshot vs a
    local directory). Files that differ are warned about on stderr (``warning`` holds
    the line): a moved or downloaded copy of the same model is what ``--backbone`` is
    for, another model is not."""
    from lowrank_runner.train.fingerprint import backbone_fingerprint

    recorded = _run_report(source).get("backbone")
    if not (isinstance(recorded, dict) and recorded.get("fingerprint")):
        recorded = adapter_cfg["backbone"]
    try:
        loaded = backbone_fingerprint(ref.name, ref.location, ref.local, ref.revision)
    except OSError:
        loaded = {"source": "local" if ref.local else "hub", "fingerprint": None}
    run_print, run_hub = recorded.get("fingerprint"), recorded.get("source") == "hub"
    comparable = isinstance(run_print, str) and loaded.get("fingerprint") and run_hub == (loaded["source"] == "hub")
    same = (run_print == loaded["fingerprint"]) if comparable else None
    resolved = str(Path(ref.location).resolve()) if ref.local else ref.location
    info = {**adapter_cfg["backbone"], "resolved": resolved, "override": override,
            "run_resolved": adapter_cfg["backbone"].get("resolved"), "source": loaded["source"],
            "fingerprint": loaded.get("fingerprint"), "run_fingerprint": run_print, "same_as_run": same}
    if same is False:
        where = source / (REPORT_FILE if recorded is not adapter_cfg["backbone"] else ADAPTER_CONFIG)
        trained = recorded.get("location") or recorded.get("resolved") or recorded.get("name")
        fix = (f"check that --backbone {override} is the model the run was trained on" if override is not None
               else "its files changed after the run trained on it")
        info["warning"] = (f"the export is of a different backbone than the run trained on: {resolved} (fingerprint "
                           f"{loaded['fingerprint'][:12]}) is not the backbone recorded in {where} ({trained}, "
                           f"fingerprint {run_print[:12]}); {fix}")
    return info


def _checked_override(name: str) -> str:
    """``--backbone``: an existing model directory, or a hub id."""
    from lowrank_runner.backbones import resolve
    from lowrank_runner.resources import expand_user

    path = expand_user(name)
    if path.exists() or _looks_like_path(name):
        if not path.exists():
            raise BackboneError(f"--backbone {name}: no such directory; give the backbone's local directory "
                                "(with config.json) or a hub id")
        if not path.is_dir():
            raise BackboneError(f"--backbone {name}: not a directory; give the backbone's model directory (with config.json)")
        if not (path / "config.json").is_file():
            raise BackboneError(f"--backbone {name}: the directory holds no config.json; give a model directory "
                                "written by save_pretrained")
        return name
    try:
        resolve({"name": name})
    except BackboneError:
        raise BackboneError(f"--backbone {name}: no such local directory, and as a hub id it cannot be loaded here "
                            "(not in the local cache, and the hub is unreachable or HF_HUB_OFFLINE is set); give the "
                            "backbone's local directory (with config.json)") from None
    return name


def head_config_of(adapter_cfg: dict) -> dict:
    head = {k: v for k, v in adapter_cfg["task"].items() if k not in ("name", "model_class")}
    if "id2label" in head:
        head["id2label"] = {int(k): v for k, v in head["id2label"].items()}
    return head


def model_class_of(adapter_cfg: dict):
    import transformers

    name = adapter_cfg["task"]["model_class"]
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained") and hasattr(cls, "from_config")):
        raise ExportError(f"adapter_config.json: task.model_class {name!r} is not a transformers model class this "
                          f"transformers ({transformers.__version__}) has (e.g. AutoModelForSequenceClassification)")
    return cls


def load_error_line(exc: Exception) -> str:
    """The first line that says what does not fit (torch lists every tensor, one a line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = [ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))] or lines or [repr(exc)]
    more = f" (and {len(detail) - 1} more)" if len(detail) > 1 else ""
    return detail[0].rstrip(".") + more


def load_trained_model(source: Path, with_adapter: bool = True, head: bool = True, dtype: str | None = None,
                       backbone: str | None = None):
    """The source's backbone in eval mode with its trained head and, unless
    ``with_adapter=False``, the trained adapter; ``head=False`` leaves the head as built.
    ``dtype`` overrides the recipe's ``backbone.dtype``, ``backbone`` its location."""
    from lowrank_runner.methods.inject import compact_keys, load_adapter_state
    from lowrank_runner.modeling import build_adapted_model, load_plain_model

    source = Path(source)
    config, adapter_cfg, adapter, head_state = read_run(source, backbone)
    build = config if dtype is None else {**config, "backbone": {**config["backbone"], "dtype": dtype}}
    head_config, model_class = head_config_of(adapter_cfg), model_class_of(adapter_cfg)
    hint = "was it trained on another backbone? (--backbone)"
    if not with_adapter:
        model, adapted = load_plain_model(build, model_class, head_config), None
        if head:
            _load_head(model, head_state, source, hint)
        return model.eval(), adapted, config, adapter_cfg
    try:
        adapted = build_adapted_model(build, model_class, head_config, weights=True)
    except ValueError as exc:  # a method's own check of the recipe against the model
        raise ExportError(f"{source / RECIPE_FILE}: the recipe does not fit the backbone: {exc}") from None
    model = adapted.model
    own = set(model.state_dict())
    unknown = sorted((set(adapter) | set(head_state)) - own - set(compact_keys(model, adapter)))
    if unknown:
        raise ExportError(f"{source}: saved weights do not fit the rebuilt model (e.g. {unknown[:3]}); {hint}")
    adapted.base_updates = base_updates(model, adapter, adapted.base_names)
    try:
        missing = load_adapter_state(model, adapter)  # compact (final-rank) tensors included
    except (KeyError, ValueError, RuntimeError, IndexError) as exc:
        raise ExportError(f"{source}: the saved adapter does not fit the rebuilt model: {load_error_line(exc)}; {hint}") from None
    if missing:
        raise ExportError(f"{source}: adapter weights missing for {sorted(missing)[:3]}")
    if head:
        _load_head(model, head_state, source, hint)
    model.eval()
    return model, adapted, config, adapter_cfg


def base_updates(model, saved: dict, names: list[str]) -> dict[str, dict]:
    """For the backbone parameters a method trained itself (full fine-tuning, BitFit):
    per name, the largest |trained − pretrained| (float32, NaN when the trained tensor is
    not finite) and, per export dtype, whether the trained tensor stored in that dtype
    differs from the pretrained one: what a merge check needs, computed one tensor at a
    time while ``model`` still holds the pretrained weights."""
    import torch

    params, out = dict(model.named_parameters()), {}
    with torch.no_grad():
        for name in names:
            new, old = saved[name], params[name].detach()
            if new.shape != old.shape:
                continue  # load_adapter_state names the mismatch
            new = new.to(old.device)
            delta = new.float() - old.float()
            finite = bool(torch.isfinite(delta).all())
            out[name] = {"largest": float(delta.abs().max()) if finite and delta.numel() else (0.0 if finite else float("nan")),
                         "changed": {d: bool((new.to(getattr(torch, d)) != old.to(getattr(torch, d))).any())
                                     for d in ("float32", "bfloat16", "float16")}}
    return out


def _load_head(model, head_state: dict, source: Path, hint: str) -> None:
    try:
        model.load_state_dict(head_state, strict=False)
    except RuntimeError as exc:
        raise ExportError(f"{source}: the saved task head does not fit the rebuilt model: {load_error_line(exc)}; {hint}") from None


def source_tokenizer(source: Path, ref, config: dict):
    """A bundle's own tokenizer if it carries one (a bundle of a chat run: with the
    template it trained with), else the backbone's (``ref``), holding a chat run's
    ``task.chat_template`` as its chat template, so every export renders conversations
    as the run did."""
    from lowrank_runner.backbones import BackboneRef, load_tokenizer

    if (Path(source) / "tokenizer_config.json").exists():  # a directory in its place: named as damaged below
        try:
            return load_tokenizer(BackboneRef(str(source), str(source), True, trust_remote_code=ref.trust_remote_code))
        except BackboneError as exc:
            raise ExportError(f"{exc}; the tokenizer saved in the adapter bundle {source} cannot be loaded: "
                              f"{repair_hint(Path(source), 'bundle')}") from None
    tokenizer = load_tokenizer(ref, config["backbone"].get("tokenizer"))
    template = trained_chat_template(source, config)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def trained_chat_template(source: Path, config: dict) -> str | None:
    """The Jinja text of a ``chat`` run's ``task.chat_template`` (a shipped template, or a
    file: a relative path resolved against the directory the run was started from, as
    the run read it, else the working directory); None when the run used the tokenizer's
    own. A file that is gone is an error naming it."""
    from lowrank_runner.resources import expand_user, is_pkg_path
    from lowrank_runner.tasks.chat_data import named_templates, template_file

    task = config.get("task") or {}
    spec = TASKS.get(task.get("name"))
    value = spec.rules.chat_template(task) if spec is not None else None
    if not value:
        return None
    cwd = _run_cwd(source)
    relative = value not in named_templates() and not is_pkg_path(value) and not expand_user(value).is_absolute()
    path = cwd / value if relative and cwd is not None and (cwd / value).is_file() else template_file(value)
    if path is None:
        where = cwd / value if relative and cwd is not None else value
        raise ExportError(f"{source / RECIPE_FILE}: task.chat_template: the run's chat template {where} no longer "
                          "exists; put the file back there (the exported tokenizer must render conversations as the "
                          "run trained on them); nothing written")
    return path.read_text(encoding="utf-8")


def preflight(source: Path, out: Path) -> None:
    """What every export checks before loading anything: the source is a finished run or
    a bundle, and ``--out`` can be written (option values are checked before this)."""
    source_kind(source)
    check_out(out, source)


def refuse_unmergeable(source: Path, option: str) -> None:
    """``--merge`` and ``--peft`` of a run whose method is no weight update: its schema says
    ``"x-kind": "inserted"`` (bottleneck adapters: new modules in the network) or
    ``"prompt"`` (prompt learning: prefix-tuning's keys and values every layer attends to). There is no
    ``ΔW`` to merge or to write as a LoRA pair. A usage error (exit 2), before anything is
    loaded, naming the export that serves such a run."""
    kind, adapter_dir = source_kind(Path(source))
    adapter_cfg = read_adapter_config(adapter_dir / ADAPTER_CONFIG, source, kind, methods=method_specs())
    name = adapter_cfg["method"]["name"]
    spec = method_specs().get(name)
    if spec is None or spec.kind == "update":
        return
    what = ("learns keys and values that every attention layer attends to before the input" if spec.kind == "prompt"
            else "inserts new modules into the network")
    raise UsageError(f"{option}: this run used '{name}', which {what} instead of updating the backbone's weights: "
                     "there is no update ΔW to merge into them or to write as a LoRA pair; export it as a bundle with "
                     "--adapter (lowrank_runner.load_adapted loads it)")
