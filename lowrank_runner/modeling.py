"""From a resolved run to an adapted model: backbone + head + targets + method.

Shared by ``inspect`` (meta device: shapes only, nothing loaded), ``run`` (pretrained
weights) and ``export`` (weights + the trained adapter).
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_runner import backbones
from lowrank_runner.errors import LrrError
from lowrank_runner.methods.inject import Injection, count_adapter_params, inject, is_adapter_param, mark_trainable
from lowrank_runner.methods.registry import get_method_spec
from lowrank_runner.targets import TargetError, TargetModule, resolve_targets


class TargetResolutionError(LrrError):
    pass


class BackboneWeightsError(LrrError):
    pass


@dataclass
class AdaptedModel:
    model: object  # transformers PreTrainedModel with adapters injected
    injection: Injection
    targets: list[TargetModule]
    head_names: list[str]
    trainable_names: list[str]
    backbone: backbones.BackboneRef
    config: object  # transformers PretrainedConfig (task head settings applied)

    @property
    def method(self):
        return self.injection.method


class MethodConfigError(LrrError):
    pass


def build_method(method_cfg: dict):
    """The method object; a method rejects impossible settings with ``ValueError``."""
    spec = get_method_spec(method_cfg["name"])
    params = {k: v for k, v in method_cfg.items() if k != "name"}
    try:
        return spec.load()(**params)
    except ValueError as exc:
        raise MethodConfigError(f"method: {exc}") from None


def find_targets(model, targets: list[str], model_type: str) -> list[TargetModule]:
    names = [n for n, _ in model.named_modules()]
    try:
        return resolve_targets(targets, model_type, names)
    except TargetError as exc:
        raise TargetResolutionError(f"targets: {exc}") from None


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
    """
    backbone_cfg = run_config["backbone"]
    ref = ref or backbones.resolve(backbone_cfg)
    config = backbones.load_config(ref, **head_config)
    missing: list[str] = []
    if weights:
        model, info = backbones.load_model(model_class, ref, config, backbone_cfg["dtype"])
        missing = sorted(info.get("missing_keys", []))
    else:
        model = backbones.build_empty(model_class, config)
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        model.config.pad_token_id = config.eos_token_id  # GPT-2/LLaMA classification needs a pad id
    targets = find_targets(model, run_config["targets"], config.model_type)
    method = build_method(run_config["method"])
    injection = inject(model, method, targets)
    head = backbones.head_parameter_names(model) if run_config["training"]["train_head"] else []
    untrained = [n for n in missing if n not in head]
    if untrained:
        fix = (
            "keep training.train_head: true so the new task head is trained"
            if set(untrained) <= set(backbones.head_parameter_names(model))
            else "use a complete checkpoint"
        )
        raise BackboneWeightsError(
            f"backbone '{ref.name}' has no pretrained weights for {', '.join(untrained[:6])}"
            f"{' ...' if len(untrained) > 6 else ''}: they would stay random and frozen; {fix}"
        )
    trainable = mark_trainable(model, head)
    return AdaptedModel(model, injection, targets, head, trainable, ref, config)


def load_plain_model(run_config: dict, model_class, head_config: dict):
    """The pretrained backbone with the task head's config, without adapters."""
    ref = backbones.resolve(run_config["backbone"])
    config = backbones.load_config(ref, **head_config)
    model, _ = backbones.load_model(model_class, ref, config, run_config["backbone"]["dtype"])
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        model.config.pad_token_id = config.eos_token_id
    return model


def parameter_counts(model, adapted: AdaptedModel) -> dict[str, int]:
    """Adapter and trainable parameter counts. Methods that pre-allocate rank capacity
    (TriAdaptLoRA's growth) count the parameters in use; ``adapter_params_allocated``
    is what the tensors hold."""
    allocated = count_adapter_params(model)
    active = adapted.method.active_parameter_count(adapted.injection.adapters)
    adapter = allocated if active is None else active
    params = dict(model.named_parameters())
    head = sum(params[n].numel() for n in adapted.trainable_names if not is_adapter_param(n))
    out = {"adapter_params": adapter, "trainable_params": adapter + head}
    if active is not None:
        out["adapter_params_allocated"] = allocated
    return out
