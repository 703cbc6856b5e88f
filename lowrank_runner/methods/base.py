"""The protocol every adapter method implements.

A method contributes, for each targeted weight ``W0`` (``out x in``), a low-rank update
``ΔW`` applied as ``h = W0 x + ΔW x``. It never materialises ``ΔW`` in the training
forward when a low-rank product is cheaper; it produces ``ΔW`` explicitly only for
merging. The training loop calls only this protocol and never names a method.

* :class:`Adapter` (per adapted module): ``forward(x, w0) -> ΔW x`` and
  ``delta_weight(w0) -> ΔW``. ``w0`` is the frozen weight in ``out x in`` orientation
  (a free transposed view for GPT-2's ``Conv1D``); most methods ignore it, CondLoRA
  derives its factors from it.
* :class:`AdapterMethod` (per model): builds adapters, may own parameters shared by
  several adapters (CondLoRA), may add a regulariser (``extra_loss``) and act after each
  optimizer step (``after_optimizer_step``, for rank allocation). A method with a step
  schedule checks it against the planned steps (``schedule_problems``: errors stop the
  run, warnings are printed by ``lrr inspect`` and ``lrr run``).

Two kinds of method share this protocol. *Weight updates* (every low-rank method) act on
the module's input: ``h = W0 x + adapter(x, w0)``, and can be merged (``ΔW``). *Inserted
modules* (Houlsby and Pfeiffer bottleneck adapters) act on the module's output: the
adapter says ``acts_on = "output"`` and gets the base layer's output ``h``, giving
``h + adapter(h)``; such a module is no ``ΔW`` of any weight, so it says
``mergeable = False`` (``delta_weight``/``lora_factors`` raise; ``lrr export --merge`` and
``--peft`` refuse the method, which declares ``"x-kind": "inserted"`` in its schema).

Fused projections (GPT-2's ``c_attn`` holding q, k and v) are adapted per selected group
by :class:`GroupedAdapter` unless a method overrides :meth:`AdapterMethod.create_fused_adapter`
(MTLoRA couples the groups through one transformation matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from lowrank_runner.errors import Problem
from lowrank_runner.targets import FUSED_GROUPS


@dataclass(frozen=True)
class LayerInfo:
    """What a method needs to know about the weight it adapts."""

    path: str
    symbols: tuple[str, ...]
    in_features: int
    out_features: int
    fan_in_fan_out: bool  # GPT-2 Conv1D stores the weight as (in, out)
    groups: tuple[str, ...] | None  # selected q/k/v groups of a fused projection
    device: torch.device
    dtype: torch.dtype

    @property
    def group_size(self) -> int:
        return self.out_features // len(FUSED_GROUPS)

    def group_slice(self, group: str) -> slice:
        i = FUSED_GROUPS.index(group)
        return slice(i * self.group_size, (i + 1) * self.group_size)

    def for_group(self, group: str) -> "LayerInfo":
        symbol = {"q": "Wq", "k": "Wk", "v": "Wv"}[group]
        return replace(self, path=f"{self.path}[{group}]", symbols=(symbol,), out_features=self.group_size, groups=None)


class Adapter(nn.Module):
    """The trainable update of one module.

    ``reads_w0``: whether :meth:`forward` uses its ``w0`` argument. On a quantized base
    (``backbone.quantization``) ``w0`` is not a view but a dequantized copy made in every
    forward (:func:`weight_out_in`); an adapter that ignores it sets ``reads_w0 = False``
    and gets ``None`` there instead, saving that work. True by default (always correct)."""

    reads_w0: bool = True
    # "input": forward(x, w0) gets the adapted module's input and returns ΔW x (weight
    # updates); "output": it gets the module's output h and returns what is added to it,
    # h + adapter(h) (inserted modules: bottleneck adapters).
    acts_on: str = "input"
    # Whether the adapter is a ΔW of its module's weight (delta_weight): False for inserted
    # modules, which cannot be merged into the backbone or written as a LoRA pair.
    mergeable: bool = True
    # Names of this adapter's own parameters trained without weight decay (SoRA's gate);
    # every other adapter parameter is decayed (train/optim.py).
    no_weight_decay: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:  # ΔW x, shape (..., out_features)
        raise NotImplementedError

    def delta_weight(self, w0: torch.Tensor) -> torch.Tensor:  # ΔW, (out_features, in_features), float32
        raise NotImplementedError

    def lora_factors(self, w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``ΔW`` as a standard LoRA pair: ``(B, A, scale)`` with ``ΔW = scale · B A``
        exactly (up to float32 rounding), ``B`` (out × r), ``A`` (r × in), float32, ``r``
        the active rank (0: the module is not updated). What ``lrr export --peft`` writes;
        a method whose update has no such form raises ``NotImplementedError``."""
        raise NotImplementedError(f"{type(self).__name__} has no LoRA factorisation")

    def compact_state(self) -> dict[str, torch.Tensor] | None:
        """The adapter's state at its active ranks only (dynamic-rank methods, so no dead
        capacity is saved), keyed like ``state_dict()``; None: the state dict as it is."""
        return None

    def load_compact_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`compact_state` returned (ranks read from the shapes)."""
        raise NotImplementedError

    def release(self) -> None:
        """Undo what the method installed on the model besides its modules (prefix-tuning's
        forward hook) when the adapters are taken off. Default: nothing."""

    def is_compact(self, state: dict[str, torch.Tensor]) -> bool:
        """Whether ``state`` (this adapter's tensors, keys relative to it) is what
        :meth:`compact_state` returned rather than the full state: by default, when a tensor's
        shape differs from the adapter's own (smaller active ranks)."""
        own = self.state_dict()
        return any(state[k].shape != own[k].shape for k in state if k in own)

    def entry_starts(self) -> dict[str, torch.Tensor] | None:
        """For parameters whose entries start training at different optimizer steps (IncreLoRA's
        ranks added during training): per parameter name, an int64 tensor broadcastable to
        it holding, per entry, the step after which it trains (``0``: from the start, as any
        parameter; ``s``: from step ``s + 1`` on, with a fresh Adam state and the run's
        learning-rate schedule restarted there over the remaining steps, warm-up included;
        ``-1``: frozen, never updated). The training optimizer reads it every step
        (train/optim.py); None (the default): every entry trains from the start."""
        return None


class GroupedAdapter(Adapter):
    """Independent adapters on selected output groups of a fused projection; the other
    groups' outputs are left unchanged (their ΔW rows are zero)."""

    def __init__(self, layer: LayerInfo, adapters: dict[str, Adapter]):
        super().__init__()
        self.layer = layer
        self.groups = nn.ModuleDict(adapters)
        self.reads_w0 = any(a.reads_w0 for a in adapters.values())

    def forward(self, x, w0):
        outputs = {g: a(x, None if w0 is None else w0[self.layer.group_slice(g)]) for g, a in self.groups.items()}
        some = next(iter(outputs.values()))
        zeros = some.new_zeros(*some.shape[:-1], self.layer.group_size)
        return torch.cat([outputs.get(g, zeros) for g in FUSED_GROUPS], dim=-1)

    def delta_weight(self, w0):
        delta = torch.zeros(self.layer.out_features, self.layer.in_features, device=w0.device, dtype=torch.float32)
        for group, adapter in self.groups.items():
            rows = self.layer.group_slice(group)
            delta[rows] = adapter.delta_weight(w0[rows])
        return delta

    def lora_factors(self, w0):
        """The groups' pairs side by side: ``A`` stacks theirs, ``B`` puts each group's in
        its rows and its own columns (zero elsewhere), so ``B A`` is :meth:`delta_weight`.
        A scale the groups do not share is folded into their ``B``."""
        pairs = {g: a.lora_factors(w0[self.layer.group_slice(g)]) for g, a in self.groups.items()}
        scales = {scale for _, _, scale in pairs.values()}
        common = scales.pop() if len(scales) == 1 else 1.0
        return stacked_pair(self.layer, {g: (b * (s / common), a) for g, (b, a, s) in pairs.items()}) + (common,)


class AdapterMethod:
    """Base class of a registered method. ``params`` are the recipe's, defaults filled."""

    name: str = ""

    def __init__(self, **params):
        self.params = params

    def before_adapters(self, layers: list[LayerInfo]) -> None:
        """Called once by ``inject`` before any adapter is created, with every module the
        method will adapt (each selected q/k/v group of a fused projection on its own), for
        methods whose adapters depend on the whole set (IncreLoRA sizes each module's rank
        capacity by the number of modules). Default: nothing."""

    def create_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        raise NotImplementedError

    def create_fused_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        """Adapter for selected q/k/v groups of a fused projection: one per group."""
        return GroupedAdapter(
            layer, {g: self.create_adapter(layer.for_group(g), w0[layer.group_slice(g)]) for g in layer.groups}
        )

    def trainable_base_parameters(self, model: nn.Module) -> list[str]:
        """Names (as ``model.named_parameters()`` gives them, adapters injected) of the
        backbone's own parameters this method trains, task head excluded (it trains by
        ``training.train_head``): full fine-tuning names every one, BitFit the biases.
        They are unfrozen, optimised, checkpointed and saved with the adapter (in
        ``adapter.safetensors``, under these names), counted as the method's parameters,
        and a merged export is the backbone holding them. Default: none (adapter methods
        leave the backbone frozen). Raise ``ValueError`` when the model has none to train."""
        return []

    def shared_modules(self) -> nn.Module | None:
        """Parameters shared across adapters, registered once on the model as ``lrr_shared``
        after all adapters were created."""
        return None

    def attach(self, model: nn.Module) -> nn.Module | None:
        """For a method that acts on the whole model instead of targeted layers (prefix-tuning):
        called once by ``inject`` after the adapters, with the model; it may install forward
        hooks and return its module, registered as ``lrr_shared`` (its parameters trained,
        saved and loaded like any adapter's). Raise ``ValueError`` for a model it cannot act
        on. Default: nothing."""
        return None

    def extra_positions(self) -> int:
        """Token positions the method places before every input (prefix-tuning's length):
        the backbone's position table must hold them beside ``task.max_length``. Default 0."""
        return 0

    def on_train_begin(self, total_steps: int, adapters: dict[str, Adapter] | None = None) -> None:
        """Called once before training (before a resumed run's state is loaded) with the
        planned number of optimizer steps and the model's adapters as training starts
        (``training.init_from`` loaded); raise ``ValueError`` for settings that cannot
        work with that many steps (:meth:`schedule_problems` errors)."""
        raise_schedule_errors(self, total_steps)

    def schedule_problems(self, total_steps: int) -> list[Problem]:
        """What the method's step schedule does wrong in ``total_steps`` optimizer steps,
        each a :class:`~lowrank_runner.errors.Problem` at its recipe path
        (``method.t_init``) without a location: severity ``error`` for a schedule that
        cannot work (the run is refused), ``warning`` for one that can act only partly.
        ``lrr inspect`` and ``lrr run`` call it once the steps are planned. The default
        asks the method's ``x-schedule`` function (torch-free: ``lrr validate`` calls it
        too, where the steps are known without data)."""
        from lowrank_runner.methods.registry import method_specs

        spec = method_specs().get(self.name)
        return spec.schedule_problems(self.params, total_steps) if spec is not None else []

    def checkpoint_eligible(self, step: int) -> bool:
        """Whether the model after ``step`` may be selected as the best checkpoint
        (a pruning method allows only steps at its final budget)."""
        return True

    def rank_pattern(self, adapters: dict[str, Adapter]) -> dict[str, int] | None:
        """Active rank per adapted module, for methods whose ranks change (else None)."""
        return None

    def extra_loss(self, adapters: dict[str, Adapter]) -> torch.Tensor | None:
        """A regulariser added to the task loss (already weighted), or None."""
        return None

    def after_optimizer_step(self, step: int, adapters: dict[str, Adapter], optimizer=None) -> dict | None:
        """Called once after every optimizer step, before gradients are cleared; may
        return values to log. ``optimizer`` is the training optimizer (for methods that
        must reset the state of parameters they re-initialise); its ``param_groups`` hold
        the learning rates this step used (the scheduler advances after the hook). On a
        step the optimizer skipped (fp16 loss scaling found inf/NaN gradients) it is
        still called, with the gradients already cleared (``None``): an allocator reading
        gradients must take a missing or non-finite gradient as no evidence and leave its
        statistics."""
        return None

    def active_parameter_count(self, adapters: dict[str, Adapter]) -> int | None:
        """Adapter parameters in use now, for methods that pre-allocate capacity (else None:
        every allocated parameter is in use)."""
        return None

    def state_dict(self) -> dict:
        """The method's own training state (rank-allocator statistics), saved in
        checkpoints; tensors and plain Python values only."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (on ``lrr run --resume``)."""


def stacked_pair(layer: LayerInfo, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(B, A)`` pair for a fused projection from per-group pairs ``{group: (B_g, A_g)}``
    (``B_g``: the group's rows × ``r_g``; ``A_g``: ``r_g × in``): ``A`` stacks the ``A_g``,
    ``B`` (out × Σ r_g) holds ``B_g`` in group ``g``'s rows and columns, zeros elsewhere."""
    a = torch.cat([a for _, a in pairs.values()], dim=0)
    b = a.new_zeros(layer.out_features, a.shape[0])
    col = 0
    for group, (b_g, _) in pairs.items():
        b[layer.group_slice(group), col: col + b_g.shape[1]] = b_g
        col += b_g.shape[1]
    return b, a


def raise_schedule_errors(method: AdapterMethod, total_steps: int) -> None:
    """``ValueError`` with the first error of :meth:`AdapterMethod.schedule_problems`."""
    for problem in method.schedule_problems(total_steps):
        if problem.severity == "error":
            raise ValueError(problem.message)


def check_same_across_processes(decision: torch.Tensor, what: str, step: int) -> None:
    """Under several processes every rank must take the same rank decision (gradients are
    all-reduced, so the scores agree); a divergence would silently desynchronise the
    replicas, so it stops training instead."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    low, high = decision.clone(), decision.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"{what}: processes took different rank decisions at step {step}")


def weight_out_in(module: nn.Module, fan_in_fan_out: bool) -> torch.Tensor:
    """The module's weight as ``out x in``: a view (no copy), or, for a bitsandbytes
    4-bit/8-bit layer (``backbone.quantization``), its dequantized float weight
    (:func:`dequantized_weight`: a new tensor each call, never stored)."""
    if is_quantized_weight(module.weight):
        return dequantized_weight(module)
    return module.weight.T if fan_in_fan_out else module.weight


def is_quantized_weight(weight) -> bool:
    """A bitsandbytes weight holding quantized data (``Params4bit`` once quantized,
    ``Int8Params`` in int8), not a float tensor."""
    kind = type(weight).__name__
    if kind == "Params4bit":
        return getattr(weight, "quant_state", None) is not None
    return kind == "Int8Params" and weight.dtype == torch.int8


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """A bitsandbytes layer's weight dequantized (``out x in``), by transformers' helper
    over bitsandbytes' own functions (``dequantize_4bit``: in the dtype the weight was
    loaded in; ``int8_vectorwise_dequant``: float32): the values the layer multiplies
    by, before its cast to the compute dtype. Frozen: no gradient reaches it."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    with torch.no_grad():
        return dequantize_bnb_weight(module.weight, getattr(module, "state", None))


def gaussian_parameter(shape, std: float, device) -> nn.Parameter:
    """A float32 parameter drawn from N(0, std²) (left uninitialised on the meta device)."""
    p = nn.Parameter(torch.empty(*shape, device=device, dtype=torch.float32))
    if torch.device(device).type != "meta":
        nn.init.normal_(p, mean=0.0, std=std)
    return p


def orthonormal_parameter(shape, std: float, device) -> nn.Parameter:
    """A float32 parameter with orthonormal columns (rows when it is wide), ``nn.init.
    orthogonal_``; ``std`` is unused (the signature of :func:`gaussian_parameter`)."""
    p = nn.Parameter(torch.empty(*shape, device=device, dtype=torch.float32))
    if torch.device(device).type != "meta":
        nn.init.orthogonal_(p)
    return p


def kaiming_parameter(shape, device) -> nn.Parameter:
    """A float32 parameter initialised like ``nn.Linear.weight`` (Kaiming-uniform, a=√5)."""
    p = nn.Parameter(torch.empty(*shape, device=device, dtype=torch.float32))
    if torch.device(device).type != "meta":
        nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return p


def gram_penalty(gram: torch.Tensor) -> torch.Tensor:
    """``‖G − I‖²_F`` for a square Gram matrix ``G``."""
    return (gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)).pow(2).sum()


def adapter_input(x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Adapters keep float32 parameters; outside autocast, bring the activations to them
    (a bf16 backbone feeds bf16 activations). Under autocast, matmuls pick the dtype."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(param.dtype)


def leaf_items(adapters: dict[str, Adapter]):
    """``(path, adapter)`` pairs, each fused projection's per-group adapters listed
    individually as ``path[group]``."""
    for path, adapter in adapters.items():
        if isinstance(adapter, GroupedAdapter):
            for group, leaf in adapter.groups.items():
                yield f"{path}[{group}]", leaf
        else:
            yield path, adapter


def leaf_adapters(adapters: dict[str, Adapter]):
    """Adapters, with each fused projection's per-group adapters listed individually."""
    return (leaf for _, leaf in leaf_items(adapters))
