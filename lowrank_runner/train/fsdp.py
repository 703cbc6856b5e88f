"""FSDP through Accelerate: the frozen backbone sharded, the trained tensors whole.

Two ways in, never both (a run that gets both is refused):

- the recipe: ``training.fsdp: {enabled: true, strategy, auto_wrap, cpu_offload}``
  (schemas/recipe.schema.json), used when the run is launched on several processes
  (``accelerate launch --num_processes N lrr run ...`` or ``torchrun``); or
- Accelerate's own config: ``accelerate launch --config_file fsdp.yaml lrr run ...`` with
  ``distributed_type: FSDP`` and ``fsdp_version: 2`` (Accelerate passes it to the run as
  ``ACCELERATE_USE_FSDP``/``FSDP_*`` environment variables; the recipe key stays off).

Both build one :class:`accelerate.utils.FullyShardedDataParallelPlugin` with
``fsdp_version=2`` (``fully_shard``; FSDP1 is refused), and Accelerate's ``prepare``
shards the model. The design (docs/parallel.md, "FSDP"):

- **What is sharded:** every frozen backbone tensor, per transformer block (the model's
  ``_no_split_modules``: LlamaDecoderLayer, BertLayer, ...) plus the embeddings and the
  final norm/output layer, as Accelerate's FSDP2 wrapping does.
- **What stays whole on every process:** every module that holds a trained tensor: the
  adapters (``*.lrr_adapter``), the method's shared parameters (``lrr_shared``: CondLoRA's
  maps), the task head and, for full/BitFit, the modules of the backbone tensors they
  train. They are FSDP2 ``ignored_params`` (the plugin's ``ignored_modules``): plain
  tensors, so the methods' hooks (``extra_loss`` after the forward, the rank decisions of
  LoRA2/TriAdaptLoRA/AdaLoRA in ``after_optimizer_step``, reading parameters and
  gradients) see whole tensors exactly as on one process, no ``summon_full_params``
  needed. FSDP does not reduce the gradients of ignored parameters, so
  :meth:`Sharding.average_gradients` all-reduces (averages) them once per optimizer
  step, before clipping: what DDP does. Every process therefore holds identical trained
  tensors and optimizer state, rank decisions are identical (and checked:
  ``methods/base.py: check_same_across_processes``), and a checkpoint or the exported
  adapter is written whole by the main process, as without FSDP.
- **Evaluation:** its forward passes have no backward, so the units that keep their
  gathered parameters after a forward (``reshard_after_forward=False``) are left
  unsharded; :meth:`Sharding.after_evaluation` reshards every unit on every process, so
  the main process reading the trained tensors alone (``state_dict()``, whose FSDP2 hook
  reshards) cannot leave the processes in different states for the next step.
- **CPU processes:** Accelerate 1.x enables FSDP only on accelerator devices; on CPU
  processes (gloo) it would silently fall back to DDP. :meth:`Sharding.attach` switches
  the Accelerator's state to FSDP there, so the same FSDP2 code path runs (and is
  tested) on CPU processes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from lowrank_runner.errors import LrrError

# What `accelerate launch` handed this process, read before any Accelerator of ours sets
# ACCELERATE_USE_FSDP itself (it does when it is given a plugin).
_LAUNCH_FSDP = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
_LAUNCH_DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
ADAPTER_MODULE, SHARED_MODULE = "lrr_adapter", "lrr_shared"


class FsdpError(LrrError):
    """FSDP settings this run cannot take (conflicting sources, FSDP1, DeepSpeed on CPU)."""


def _note(text: str) -> None:
    """A note on stderr, from the main process only."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {text}", file=sys.stderr, flush=True)


def launched_with_fsdp() -> bool:
    """Whether ``accelerate launch`` gave this process an FSDP config."""
    return _LAUNCH_FSDP


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def whole_modules(model: torch.nn.Module, trainable_names) -> list[torch.nn.Module]:
    """The modules FSDP must leave whole: each one that directly holds a trained tensor
    (an adapter, ``lrr_shared``, the head, a full/BitFit backbone tensor's module)."""
    owners = dict.fromkeys(_owner(n) for n in trainable_names)
    modules = dict(model.named_modules())
    return [modules[o] for o in owners if o in modules]


def plugin_from_recipe(fsdp: dict):
    """The FSDP2 plugin for ``training.fsdp`` (enabled)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=fsdp["strategy"] == "full_shard",
        auto_wrap_policy="transformer_based_wrap" if fsdp["auto_wrap"] == "transformer_layer" else "no_wrap",
        cpu_offload=fsdp["cpu_offload"],
        cpu_ram_efficient_loading=False,  # every process builds the whole model (backbones.py)
        state_dict_type="SHARDED_STATE_DICT",  # unused: lrr saves only the (whole) trained tensors
    )


def plugin_from_launch(where: str):
    """The plugin Accelerate builds from ``accelerate launch --config_file`` (FSDP_* variables).

    The version is checked on the variables, before the plugin is built: Accelerate's
    FSDP1 plugin acts on ``FSDP_SYNC_MODULE_STATES`` (which ``accelerate launch`` sets
    to true by default) and fails on CPU processes. ``FSDP_CPU_RAM_EFFICIENT_LOADING``
    (also true by default) is turned off before the plugin reads it."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    version = os.environ.get("FSDP_VERSION", "1")  # Accelerate's default
    if version.strip() != "2":
        raise FsdpError(
            f"{where}: the accelerate config asks for FSDP version {version}; lrr trains with FSDP2 only "
            "(torch's fully_shard): set fsdp_version: 2 in the config's fsdp_config (or use the recipe key "
            "training.fsdp instead of an accelerate config)")
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in ("1", "true", "yes", "y", "on"):
        _note(f"{where}: fsdp_cpu_ram_efficient_loading is off: every process builds the whole model (with its "
              "adapters) before it is sharded")
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"  # transformers' from_pretrained reads it too
    plugin = FullyShardedDataParallelPlugin()
    plugin.cpu_ram_efficient_loading = False
    return plugin


def describe_settings(fsdp: dict, no_split=None) -> str:
    """One line for ``lrr inspect``: what ``training.fsdp`` does (``no_split``: the
    model's ``_no_split_modules``, the classes sharded one unit each)."""
    if not fsdp.get("enabled"):
        return "off (an FSDP config given to accelerate launch still applies)"
    units = ", ".join(no_split or ()) or "none found"
    wrap = f"one unit per {units}" if fsdp["auto_wrap"] == "transformer_layer" else "the whole model as one unit"
    return (f"FSDP2 {fsdp['strategy']}, sharded {wrap}, cpu_offload {str(fsdp['cpu_offload']).lower()}; "
            "adapters, shared maps and head kept whole on every process (launch with several processes)")


@dataclass
class Sharding:
    """FSDP for one run: the plugin (None: no FSDP) and what the loop asks of it."""

    plugin: object | None
    source: str  # "recipe", "accelerate config" or ""
    whole: list | None = None  # the trained parameters FSDP leaves whole (set by keep_whole)

    @classmethod
    def for_run(cls, training: dict, where: str, gradient_checkpointing: bool = False,
                quantized: bool = False) -> "Sharding":
        """The run's FSDP from ``training.fsdp`` or the launch's accelerate config (refused:
        both, DeepSpeed on CPU processes, two activation checkpointings, a quantized base:
        ``lrr validate`` refuses it with the recipe key); no FSDP on a single process that
        was not launched (nothing to shard: a note says so)."""
        from accelerate import PartialState
        from accelerate.utils import DistributedType

        fsdp = training.get("fsdp") or {}
        _check_deepspeed(fsdp, where)
        if fsdp.get("enabled") and _LAUNCH_FSDP:
            raise FsdpError(
                f"{where}: training.fsdp.enabled is true and `accelerate launch` was given an FSDP config too: use "
                "one of them (remove distributed_type: FSDP from the accelerate config, or set training.fsdp.enabled "
                "false)")
        if quantized and _LAUNCH_FSDP:
            raise FsdpError(
                f"{where}: backbone.quantization is set and `accelerate launch` was given an FSDP config: FSDP does "
                "not shard bitsandbytes' packed weights; launch without the FSDP config (a quantized base is small "
                "enough for one device per process) or remove backbone.quantization")
        if not (fsdp.get("enabled") or _LAUNCH_FSDP):
            return cls(None, "")
        from lowrank_runner.train.devices import has_accelerator_device

        if PartialState(cpu=not has_accelerator_device()).distributed_type == DistributedType.NO:  # as run_dirs.py
            _note(f"{where}: training.fsdp: a single process was started (not by accelerate launch or torchrun): "
                  "there is nothing to shard, the run trains without FSDP")
            return cls(None, "")
        if fsdp.get("enabled"):
            plugin, source = plugin_from_recipe(fsdp), "recipe"
        else:
            plugin, source = plugin_from_launch(where), "accelerate config"
        if plugin.activation_checkpointing and gradient_checkpointing:
            raise FsdpError(
                f"{where}: training.gradient_checkpointing is true and the accelerate config sets "
                "fsdp_activation_checkpointing too: the blocks would be checkpointed twice; use one of them")
        return cls(plugin, source)

    @property
    def enabled(self) -> bool:
        return self.plugin is not None

    def after_evaluation(self, model: torch.nn.Module) -> None:
        """After an evaluation (forward passes without a backward, on every process):
        reshard every FSDP2 module, as a training step's backward leaves them.

        A unit built with ``reshard_after_forward=False`` (Accelerate's tail unit, the
        final norm and output layer; every unit under ``strategy: shard_grad_op``) keeps
        its all-gathered parameters after a forward until the backward reshards them; an
        evaluation has no backward, so they stay unsharded. FSDP2's state-dict hook
        reshards a unit whenever ``state_dict()`` is called, and the main process alone
        reads the trained tensors for a checkpoint: its units would then be sharded and
        the other processes' not, and the next training forward would all-gather on the
        main process only (a collective mismatch; tests/test_fsdp.py). Resharding runs no
        collective and frees the gathered parameters. Where torch has it (2.13 does),
        ``reset_iter_state`` on the root unit does so and also forgets the evaluation's
        forward order, which the next backward would otherwise follow to prefetch (gather)
        a unit it does not need."""
        if self.plugin is None:
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if units and hasattr(units[0], "reset_iter_state"):  # units[0]: the root (modules() starts there)
            units[0].reset_iter_state()
            return
        for unit in units:
            unit.reshard()

    def accelerator_options(self) -> dict:
        return {"fsdp_plugin": self.plugin} if self.plugin is not None else {}

    def attach(self, accelerator) -> None:
        """After the Accelerator is built: CPU processes get FSDP too (Accelerate would use
        DDP there), and this process's environment is again what the launch gave it (an
        Accelerator given a plugin sets ACCELERATE_USE_FSDP, which the next run of a
        recipe would otherwise inherit)."""
        from accelerate.utils import DistributedType

        os.environ["ACCELERATE_USE_FSDP"] = "true" if _LAUNCH_FSDP else "false"
        state = accelerator.state
        if self.plugin is not None:  # also this run's plugin, not an earlier run's (the state outlives runs)
            state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, self.plugin
            if accelerator.mixed_precision != "no":  # what Accelerate does for the plugin it is first given
                self.plugin.set_mixed_precision(accelerator.mixed_precision)
        elif state.distributed_type == DistributedType.FSDP:  # an earlier run's, in this process
            cpu = accelerator.device.type == "cpu"
            state.distributed_type = DistributedType.MULTI_CPU if cpu else DistributedType.MULTI_GPU
            state.fsdp_plugin = None

    def keep_whole(self, model: torch.nn.Module, trainable_names, device) -> None:
        """Before ``prepare``: the modules holding trained tensors are FSDP's ignored ones,
        moved to ``device`` (``fully_shard`` moves only what it shards; Accelerate does
        the same for ignored modules named by a pattern). The same parameter objects
        stay, so the optimizer built on them is still right."""
        if self.plugin is None:
            return
        self.plugin.ignored_modules = whole_modules(model, trainable_names)
        for module in self.plugin.ignored_modules:
            module.to(device)
        self.whole = [p for p in model.parameters() if p.requires_grad]
        kept = {id(p): p.numel() for m in self.plugin.ignored_modules for p in m.parameters()}
        total = sum(p.numel() for p in model.parameters())
        if sum(kept.values()) > total / 2:  # full fine-tuning: every module holds a trained tensor
            _note(f"FSDP keeps {100 * sum(kept.values()) / total:.0f}% of the model whole (the modules of the tensors "
                  "the method trains): little is sharded")

    def check_prepared(self) -> None:
        """After ``prepare``: every trained parameter is still a plain (whole) tensor."""
        if self.plugin is None:
            return
        from torch.distributed.tensor import DTensor

        sharded = [p for p in self.whole if isinstance(p, DTensor)]
        if sharded:
            raise RuntimeError(f"FSDP sharded {len(sharded)} trained parameter(s) that must stay whole")

    def average_gradients(self, params) -> None:
        """All-reduce (average) the gradients of the whole trained tensors over the
        processes, as DDP would: FSDP reduces only what it shards. A parameter without a
        gradient on every process keeps none (AdamW then skips it, as on one process)."""
        if self.plugin is None:
            return
        import torch.distributed as dist

        params = list(params)
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        live = [p for p, h in zip(params, has.tolist()) if h]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p, g in zip(live, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
            offset += g.numel()

    def describe(self, accelerator) -> dict | None:
        """What the run report records (None: no FSDP)."""
        if self.plugin is None:
            return None
        from torch.distributed.fsdp import CPUOffloadPolicy

        p = self.plugin
        return {"version": 2, "source": self.source, "processes": accelerator.num_processes,
                "reshard_after_forward": bool(p.reshard_after_forward),
                "wrapped": list(p.transformer_cls_names_to_wrap or []) if p.auto_wrap_policy is not None else [],
                "cpu_offload": isinstance(p.cpu_offload, CPUOffloadPolicy),
                "whole_params": sum(t.numel() for t in self.whole or ())}


def _check_deepspeed(fsdp: dict, where: str) -> None:
    """DeepSpeed comes only from an accelerate config; refused where it cannot apply."""
    if not _LAUNCH_DEEPSPEED:
        return
    if fsdp.get("enabled"):
        raise FsdpError(f"{where}: training.fsdp.enabled is true and `accelerate launch` was given a DeepSpeed config: "
                        "use one of them")
    from lowrank_runner.train.devices import has_accelerator_device

    if not has_accelerator_device():
        raise FsdpError(f"{where}: the accelerate config asks for DeepSpeed, which Accelerate applies only on GPUs (on "
                        "CPU processes it would be ignored silently); launch without it, or on GPUs")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise FsdpError(f"{where}: the accelerate config asks for DeepSpeed, which is not installed: "
                        "pip install deepspeed")
