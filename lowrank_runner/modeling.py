"""From a resolved run to an adapted model: backbone + head + targets + method.

Shared by ``inspect`` (meta device: shapes only, nothing loaded), ``run`` (pretrained
weights) and ``export`` (weights + the trained adapter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowrank_runner import backbones
from lowrank_runner.errors import LrrError, RecipeKeyError, warn
from lowrank_runner.methods.inject import (Injection, count_adapter_params, head_parameter_names, inject, is_adaptable,
                                           is_adapter_param, layer_sizes, mark_trainable)
from lowrank_runner.methods.registry import get_method_spec
from lowrank_runner.targets import SYMBOL_ROLES, TargetError, TargetModule, resolve_targets


class TargetResolutionError(RecipeKeyError):
    pass


class BackboneWeightsError(LrrError):
    pass


class TaskLengthError(RecipeKeyError):
    """task.max_length beyond the backbone's positions."""


@dataclass
class AdaptedModel:
    model: object  # transformers PreTrainedModel with adapters injected
    injection: Injection
    targets: list[TargetModule]
    head_names: list[str]
    trainable_names: list[str]
    backbone: backbones.BackboneRef
    config: object  # transformers PretrainedConfig (task head settings applied)
    # export: per trained backbone tensor, its change from the pretrained one (export/source.py: base_updates)
    base_updates: dict = field(default_factory=dict)

    @property
    def method(self):
        return self.injection.method

    @property
    def base_names(self) -> list[str]:
        """Backbone parameters the method trains itself (full fine-tuning, BitFit), saved
        with the adapter; [] for adapter methods."""
        return self.injection.base_names


class MethodConfigError(RecipeKeyError):
    pass


def build_method(method_cfg: dict):
    """The method object; a method rejects impossible settings with ``ValueError``."""
    spec = get_method_spec(method_cfg["name"])
    params = {k: v for k, v in method_cfg.items() if k != "name"}
    try:
        return spec.load()(**params)
    except ValueError as exc:
        raise MethodConfigError(f"method: {exc}", "method") from None


def uses_targets(method_cfg: dict) -> bool:
    """Whether the method puts adapters on the recipe's ``targets``; a schema saying
    ``"x-targets": false`` (full fine-tuning, BitFit) trains backbone parameters instead
    and the targets are not resolved (documented in its schema)."""
    return get_method_spec(method_cfg["name"]).schema.get("x-targets", True) is not False


def check_fixed_targets(run_config: dict) -> None:
    """A method that places its modules itself (its schema's ``x-targets`` lists the
    symbols: the bottleneck adapters) takes exactly those targets, in any order: anything
    else is an error at ``targets``."""
    spec = get_method_spec(run_config["method"]["name"])
    fixed, given = spec.fixed_targets, run_config.get("targets") or []
    if fixed is None or (sorted(given) == sorted(fixed)):
        return
    places = " and ".join(f"{s} ({SYMBOL_ROLES.get(s, s)})" for s in fixed)
    raise TargetResolutionError(
        f"targets: method '{spec.name}' inserts its modules at fixed places, after {places}; set targets: "
        f"[{', '.join(fixed)}] (got [{', '.join(map(str, given))}])", "targets")


def find_targets(model, targets: list[str], model_type: str) -> list[TargetModule]:
    """Targets as module paths; every matched module must be one an adapter can wrap."""
    modules = dict(model.named_modules())
    try:
        return resolve_targets(targets, model_type, list(modules),
                               not_adaptable={name: type(m).__name__ for name, m in modules.items() if not is_adaptable(m)})
    except TargetError as exc:
        raise TargetResolutionError(f"targets: {exc}", "targets") from None


def rank_parameters(method_cfg: dict) -> dict[str, int]:
    """The method's parameters that are a rank of every adapted module: ``r`` (or what
    the schema's ``x-rank`` names), and the
    parameters its schema declares ``r`` cannot exceed (``x-le``: TriAdaptLoRA's
    ``r <= r_ref <= max_rank``). Those declared not to exceed ``r`` (LoRA2's
    ``target_rank``) are bounded through ``r`` already."""
    schema = get_method_spec(method_cfg["name"]).schema
    bounds = schema.get("x-le", {})
    names, todo = [], [schema.get("x-rank", "r")]  # AdaLoRA's rank parameter is init_r
    while todo:
        name = todo.pop(0)
        if name not in names:
            names.append(name)
            todo += [large for small, large in bounds.items() if small == name]
    values = {n: method_cfg.get(n) for n in names}
    return {n: v for n, v in values.items() if isinstance(v, int) and not isinstance(v, bool)}


def check_ranks(model, targets: list[TargetModule], method_cfg: dict) -> None:
    """A rank above ``min(in, out)`` of a module (per q/k/v group of a fused projection)
    adds parameters and no expressiveness (PEFT allows it; a demanding user wants to
    know): an error naming the modules, their sizes and the largest valid value."""
    sizes = {t.path: layer_sizes(model.get_submodule(t.path), t.groups) for t in targets}
    largest = min((min(s) for s in sizes.values()), default=None)
    problems, keys = [], []
    for name, value in rank_parameters(method_cfg).items():
        over = [(path, s) for path, s in sizes.items() if value > min(s)]
        if over:
            keys.append(f"method.{name}")
            shown = ", ".join(f"{path} ({i} in, {o} out)" for path, (i, o) in over[:3])
            more = f" and {len(over) - 3} more" if len(over) > 3 else ""
            problems.append(f"method.{name} {value} is above the rank a module can have, min(in, out), for {len(over)} "
                            f"adapted module(s): {shown}{more}; the largest valid method.{name} for these targets is {largest}")
    if problems:
        raise MethodConfigError("; ".join(problems), keys[0])


POSITION_TABLES = ("position_embeddings", "wpe")  # BERT/RoBERTa/DeBERTa (absolute), GPT-2
POSITION_KEYS = ("n_positions", "max_position_embeddings")  # GPT-2 aliases the second to the first


def positions_needed(task_cfg: dict) -> tuple[int, str]:
    """Token positions a task's sequences reach, and the recipe keys that set it
    (generation appends max_new_tokens to a source of at most max_length // 2)."""
    length = task_cfg.get("max_length")
    generation = task_cfg.get("generation") or {}
    if generation.get("max_new_tokens") and length // 2 + generation["max_new_tokens"] > length:
        return length // 2 + generation["max_new_tokens"], (
            f"task.max_length {length} // 2 + task.generation.max_new_tokens {generation['max_new_tokens']}")
    return length, f"task.max_length {length}"


def check_positions(model, config, task_cfg: dict, ref: backbones.BackboneRef, extra: int = 0) -> None:
    """Sequences longer than the model's absolute position table fail (index error) or
    silently misbehave: an error naming both numbers. A model without such a table
    (DeBERTa with relative attention and position_biased_input false, rotary LLaMA) runs
    longer inputs than it was pretrained on: a warning. ``extra``: positions the method
    places before every input (:meth:`AdapterMethod.extra_positions`: a prefix)."""
    from torch import nn

    if not task_cfg.get("max_length"):
        return
    needed, what = positions_needed(task_cfg)
    if extra:
        needed, what = needed + extra, f"{what} + the {extra} positions method.name places before the input"
    declared = next(((k, getattr(config, k)) for k in POSITION_KEYS if isinstance(getattr(config, k, None), int)), None)
    where = f"{ref.location}/config.json" if ref.local else f"{ref.describe()} config.json"
    tables = [m for name, m in model.named_modules()
              if isinstance(m, nn.Embedding) and name.rpartition(".")[2] in POSITION_TABLES]
    if tables:
        table = tables[0]
        offset = table.padding_idx + 1 if table.padding_idx is not None else 0  # RoBERTa counts from pad + 1
        limit = table.num_embeddings - offset
        if needed > limit:
            source = f"{declared[0]} {declared[1]} in {where}" if declared else f"its position table in {where}"
            source += f", less {offset} reserved by its padding offset" if offset else ""
            raise TaskLengthError(f"{what} needs {needed} token positions, beyond the {limit} of backbone "
                                  f"'{ref.name}' ({source}); lower task.max_length so that at most {limit} are needed",
                                  "task.max_length")
    elif declared and needed > declared[1]:
        warn(f"{what} needs {needed} token positions, beyond the {declared[1]} backbone '{ref.name}' was pretrained "
             f"with ({declared[0]} in {where}); it has no absolute position table (relative or rotary positions), so "
             "longer inputs run, but the model never saw them in pretraining", once=True)


class NotALanguageModel(RecipeKeyError):
    """A task that trains a causal language model on a backbone pretrained as something else."""


def check_language_model(model_class, config, ref: backbones.BackboneRef, task_cfg: dict) -> None:
    """A task that trains a causal LM (``AutoModelForCausalLM``) needs a backbone pretrained
    as one: an encoder (BERT, RoBERTa, MiniLM: a masked language model, not configured as a
    decoder) would get a new, untrained next-token head, which transformers builds for it
    all the same (``BertLMHeadModel``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(model_class, "__name__", "") != "AutoModelForCausalLM" or getattr(config, "is_decoder", False):
        return
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise NotALanguageModel(
            f"backbone '{ref.name}' is an encoder ({config.model_type}: a masked language model), not a causal language "
            f"model, and task '{task_cfg.get('name')}' trains one (AutoModelForCausalLM: it predicts the next token); "
            "choose a causal LM backbone (GPT-2, LLaMA, Qwen2, ...)", "backbone.name")


def check_backbone_fits_task(run_config: dict, ref: backbones.BackboneRef) -> None:
    """What :func:`check_language_model` says, from the run's config alone: a run checks it
    before reading any data (a chat template cannot mend an encoder)."""
    from lowrank_runner.tasks.base import build_task

    model_class = build_task(run_config["task"]).model_class
    check_language_model(model_class, backbones.load_config(ref), ref, run_config["task"])


def build_adapted_model(
    run_config: dict,
    model_class,
    head_config: dict,
    *,
    weights: bool,
    ref: backbones.BackboneRef | None = None,
) -> AdaptedModel:
    """Build the model for a run. ``weights=False`` builds on the meta device (no memory).

    ``head_config`` are the task's config overrides (``num_labels``, ``id2label``, ...).
    Targets, ranks and sequence length are checked on the meta skeleton, before any
    weight is read.
    """
    backbone_cfg = run_config["backbone"]
    ref = ref or backbones.resolve(backbone_cfg)
    config = backbones.load_config(ref, **head_config)
    check_language_model(model_class, config, ref, run_config.get("task", {}))
    model = backbones.build_empty(model_class, config, ref)
    check_fixed_targets(run_config)
    targets = find_targets(model, run_config.get("targets", []), config.model_type) if uses_targets(run_config["method"]) else []
    check_ranks(model, targets, run_config["method"])
    method = build_method(run_config["method"])
    check_positions(model, config, run_config.get("task", {}), ref, method.extra_positions())
    missing: list[str] = []
    mismatched: dict[str, tuple] = {}
    if weights:
        del model
        model, info = backbones.load_model(model_class, ref, config, backbone_cfg["dtype"], backbone_cfg.get("quantization"))
        missing = sorted(info.get("missing_keys", []))
        mismatched = {name: (ckpt, own) for name, ckpt, own in info.get("mismatched_keys", [])}
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        model.config.pad_token_id = config.eos_token_id  # GPT-2/LLaMA classification needs a pad id
    try:
        injection = inject(model, method, targets)
    except ValueError as exc:  # e.g. BitFit on a backbone without biases
        raise MethodConfigError(f"method: {exc}", "method") from None
    head = head_parameter_names(model) if run_config["training"]["train_head"] else []
    check_mismatched(ref, mismatched, head)
    untrained = [n for n in sorted(set(missing) | set(mismatched)) if n not in head]
    if untrained:
        fix = (
            "keep training.train_head: true so the new task head is trained"
            if set(untrained) <= set(head_parameter_names(model))
            else "use a complete checkpoint"
        )
        raise BackboneWeightsError(
            f"backbone '{ref.name}' has no pretrained weights for {', '.join(untrained[:6])}"
            f"{' ...' if len(untrained) > 6 else ''}: they would stay random and frozen; {fix}"
        )
    trainable = mark_trainable(model, head + injection.base_names)
    return AdaptedModel(model, injection, targets, head, trainable, ref, config)


def check_mismatched(ref: backbones.BackboneRef, mismatched: dict[str, tuple], head: list[str]) -> None:
    """Checkpoint tensors whose shape differs from the model config.json describes: an
    error, except for a task head that is trained anyway (another number of labels)."""
    body = {n: shapes for n, shapes in sorted(mismatched.items()) if n not in head}
    if body:
        shape = lambda s: "x".join(str(d) for d in s)  # noqa: E731
        shown = ", ".join(f"{n} is {shape(c)} in the checkpoint, {shape(m)} in the model" for n, (c, m) in list(body.items())[:2])
        more = f" (and {len(body) - 2} more)" if len(body) > 2 else ""
        raise BackboneWeightsError(
            f"backbone '{ref.name}': the weights in {ref.describe()} do not fit the model its config.json describes: "
            f"{shown}{more}; fix config.json (hidden_size, vocab_size, ...) or use the weights it belongs to"
        )


def load_plain_model(run_config: dict, model_class, head_config: dict):
    """The pretrained backbone with the task head's config, without adapters."""
    ref = backbones.resolve(run_config["backbone"])
    config = backbones.load_config(ref, **head_config)
    model, info = backbones.load_model(model_class, ref, config, run_config["backbone"]["dtype"],
                                       run_config["backbone"].get("quantization"))
    check_mismatched(ref, {n: (c, m) for n, c, m in info.get("mismatched_keys", [])}, head_parameter_names(model))
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        model.config.pad_token_id = config.eos_token_id
    return model


def parameter_counts(model, adapted: AdaptedModel) -> dict[str, int]:
    """Adapter and trainable parameter counts. Methods that pre-allocate rank capacity
    (TriAdaptLoRA's growth) count the parameters in use; ``adapter_params_allocated``
    is what the tensors hold. The backbone parameters a method trains itself (full
    fine-tuning, BitFit) count as its adapter parameters; ``trainable_params`` adds the head."""
    params = dict(model.named_parameters())
    base = sum(params[n].numel() for n in adapted.base_names)
    allocated = count_adapter_params(model) + base
    active = adapted.method.active_parameter_count(adapted.injection.adapters)
    adapter = allocated if active is None else active
    trained_base = set(adapted.base_names)
    head = sum(params[n].numel() for n in adapted.trainable_names if not is_adapter_param(n) and n not in trained_base)
    out = {"adapter_params": adapter, "trainable_params": adapter + head}
    if active is not None:
        out["adapter_params_allocated"] = allocated
    return out
