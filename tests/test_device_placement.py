"""Device placement, proven on the CPU.

On a GPU, a tensor made without an explicit device (``torch.zeros(n)``, ``arange``,
``eye``, ``ones``, ``tensor(...)``, ``randn``, a mask, a grown rank's new entries,
allocator state, a rank decision) lands on the CPU beside weights on the GPU: the step
fails, or data silently moves between host and device at every step. This machine has
no GPU, so the check gives such tensors *another* device than the weights':

* :class:`DeviceAudit`, a ``TorchFunctionMode``, sees every tensor factory call (the
  functions ``torch.set_default_device`` redirects: ``zeros``, ``ones``, ``empty``,
  ``full``, ``arange``, ``eye``, ``tensor``, ``rand*``, ``tril_indices``, ...). One made
  by the code under test (``lowrank_runner``, PEFT's AdaLoRA ``RankAllocator``, the
  example plugin, the toy adapters below) without ``device=`` is made on the **meta**
  device instead, and its call site is recorded. The weights stay on the CPU, so using
  that tensor with them raises as it would on a GPU (``Tensor on device meta is not on
  the expected device cpu``, ``Cannot copy out of meta tensor``); a use that does not
  raise (an index tensor, a host-side value) is still reported at the end by its site.
  The backbone's own code (transformers, bitsandbytes) and torch's are not audited: a
  plain ``torch.set_default_device("meta")`` around the whole step would also move
  tensors they make on the host by design (transformers' attention-mask checks, AdamW's
  step counters) and fail there, not in the code under test.
* The rank decisions the methods all-reduce across processes
  (``check_same_across_processes``; NCCL takes GPU tensors only) must be on the weights'
  device.

Every registered method (the example plugin included) is injected, trained for a few
steps with schedules that grow (TriAdaptLoRA) or prune (LoRA2, AdaLoRA) ranks within
them (the method's state through a checkpoint file and back after step 2), then asked for
everything the loop, checkpoints and exports read (rank pattern, counts, method state,
compact adapter state, ΔW, LoRA factors, update norms, the merge), all under the audit;
the methods that read ``W0`` or change ranks also on a 4-bit (bitsandbytes) LLaMA base.
:func:`test_the_audit_catches_each_kind_of_mistake` shows the check failing for a
deliberately broken toy adapter, one mistake at a time, and passing for the same adapter
done right.
"""

from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import lowrank_runner
from lowrank_runner.methods import adalora, base, increlora, lora2, triadaptlora
from lowrank_runner.methods.base import Adapter, AdapterMethod, leaf_items
from lowrank_runner.methods.inject import (adapter_state_dict, head_parameter_names, inject, load_adapter_state,
                                           mark_trainable, merge_adapters, update_norms)
from lowrank_runner.methods.registry import method_specs
from lowrank_runner.modeling import build_method, uses_targets
from lowrank_runner.targets import resolve_targets
from tests.conftest import PLUGINS, save_tiny_backbone, tiny_classifier, token_batch
from tests.test_conformance import REFUSED, SETTINGS, TARGETS, targets_for

STEPS = 5
# Schedules that change ranks within a planned run of STEPS steps: TriAdaptLoRA grows
# after steps 2..4 (r 1 → r_ref 3 per module; the last evaluation spends the rest);
# LoRA2 and AdaLoRA mask after steps 2 and 3, down to 1 (LoRA2) and 2 (AdaLoRA) ranks
# per module, and keep the final mask after steps 4 and 5 (AdaLoRA: PEFT re-applies it).
DYNAMIC = {
    "triadaptlora": {"r": 1, "r_ref": 3, "grow_by": 1, "t_init": 1, "grow_interval": 1, "growth": "linear"},
    "lora2": {"r": 4, "k": 2, "target_rank": 1, "t_init": 1, "t_final": 2, "mask_interval": 1},
    "adalora": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1},
    # SoRA: the proximal step (0.3 per step, the lr-scaled threshold 30 x lr 1e-2) zeroes gates within the steps
    "sora": {"r": 4, "threshold": 30.0, "threshold_scale": "lr"},
    # IncreLoRA: reserves after step 1, 5 of the 10 modules grow after steps 2..5 (r 1 → target_rank 3)
    "increlora": {"r": 1, "target_rank": 3, "top_h": 5, "incre_rank_num": 1, "init_warmup": 0, "incre_interval": 1},
}
# nn.Linear, and GPT-2's fused Conv1D (per-group adapters, MTLoRA's coupled one); LLaMA
# is the 4-bit base below. MTLoRA's structures differ in T alone: all four on GPT-2.
FAMILIES = ["bert", "gpt2"]
LABELS = torch.tensor([0, 2, 1])
WEIGHTS = torch.device("cpu")
try:  # the factory functions torch.set_default_device redirects (a private list, with a fallback)
    from torch.utils._device import _device_constructors

    FACTORIES = frozenset(_device_constructors())
except ImportError:  # pragma: no cover
    FACTORIES = frozenset(getattr(torch, n) for n in (
        "arange", "as_tensor", "asarray", "empty", "empty_strided", "eye", "full", "linspace", "logspace", "ones", "rand",
        "randint", "randn", "randperm", "range", "scalar_tensor", "tensor", "tril_indices", "triu_indices", "zeros"))
FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}  # from a tensor: its device (not a factory's default)
# the code under test: this package, PEFT's AdaLoRA layer file (its RankAllocator runs
# inside our after_optimizer_step), the example plugin, and this file's toy adapters
PEFT = importlib.util.find_spec("peft")
AUDITED = (str(Path(lowrank_runner.__file__).parent), str(PLUGINS), __file__) + (
    (str(Path(PEFT.origin).parent / "tuners" / "adalora" / "layer.py"),) if PEFT else ())


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class MisplacedTensor(AssertionError):
    """A tensor made without a device by the code under test."""


class DeviceAudit(TorchFunctionMode):
    """Factory calls without ``device=`` from files under ``roots``: made on ``elsewhere``
    (not the weights' device), and their call sites recorded in :attr:`sites`."""

    def __init__(self, roots=AUDITED, elsewhere: str = "meta"):
        super().__init__()
        self.roots, self.elsewhere = tuple(roots), elsewhere
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in FACTORIES and kwargs.get("device") is None and not (
                func in FROM_DATA and args and isinstance(args[0], torch.Tensor)):
            caller = sys._getframe(1)
            path = caller.f_code.co_filename
            if path.startswith(self.roots):
                site = f"torch.{func.__name__} at {short(path)}:{caller.f_lineno} ({caller.f_code.co_name})"
                if site not in self.sites:
                    self.sites.append(site)
                kwargs["device"] = self.elsewhere
        return func(*args, **kwargs)


def short(path: str) -> str:
    for marker in ("lowrank_runner/", "site-packages/", "tests/"):
        if marker in path:
            return path[path.index(marker):]
    return path


@contextmanager
def tensors_off_the_weights_device(monkeypatch, weights: torch.device = WEIGHTS):
    """Run the block under :class:`DeviceAudit` with every rank decision checked to be on
    ``weights``; raise :class:`MisplacedTensor` naming every site that made a tensor
    without a device (the error the misplaced tensor caused, if any, as its cause)."""
    original = base.check_same_across_processes

    def on_the_weights_device(decision, what, step):
        if decision.device != weights:
            raise MisplacedTensor(f"{what}: its rank decision is on {decision.device}, the weights on {weights} "
                                  "(an all-reduce over NCCL takes GPU tensors only)")
        return original(decision, what, step)

    for module in (base, lora2, triadaptlora, adalora, increlora):
        monkeypatch.setattr(module, "check_same_across_processes", on_the_weights_device)
    audit = DeviceAudit()
    try:
        with audit:
            yield audit
    except MisplacedTensor as exc:
        if not audit.sites:
            raise
        raise MisplacedTensor(f"{exc}\n{described(audit.sites)}") from exc
    except Exception as exc:
        if not audit.sites:
            raise
        raise MisplacedTensor(described(audit.sites)) from exc
    if audit.sites:
        raise MisplacedTensor(described(audit.sites))


def described(sites) -> str:
    return "tensors made without a device (on a GPU: on the CPU, beside GPU weights):\n  " + "\n  ".join(sites)


def inject_method(model, method_cfg: dict, model_type: str):
    names = [n for n, _ in model.named_modules()]
    method = build_method(method_cfg) if isinstance(method_cfg, dict) else method_cfg  # a config or a method object
    adapts = uses_targets(method_cfg) if isinstance(method_cfg, dict) else True
    symbols = targets_for(model_type, method_cfg) if isinstance(method_cfg, dict) else TARGETS[model_type]
    targets = resolve_targets(symbols, model_type, names) if adapts else []
    injection = inject(model, method, targets)
    mark_trainable(model, head_parameter_names(model) + injection.base_names)
    return injection


def train(model, injection, steps: int = STEPS, checkpoint: Path | None = None) -> list[dict]:
    """The loop's steps on the model alone: ``on_train_begin`` (a run of ``steps``), then
    per step forward, task loss + ``extra_loss``, backward, AdamW, ``after_optimizer_step``
    (gradients still there), gradients cleared. With ``checkpoint`` (a file), the method's
    state goes through the checkpoint's file format after step 2 and is loaded back, as
    ``lrr run --resume`` does, before the steps that use it."""
    from lowrank_runner.train.checkpoint import load_state, save_state

    method, adapters = injection.method, injection.adapters
    method.schedule_problems(steps)
    method.on_train_begin(steps, adapters=adapters)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    logs = []
    for step in range(1, steps + 1):
        loss = model(**token_batch(), labels=LABELS).loss
        extra = method.extra_loss(adapters)
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        logs.append(method.after_optimizer_step(step, adapters, optimizer) or {})
        optimizer.zero_grad(set_to_none=True)
        if checkpoint is not None and step == 2:
            save_state(checkpoint, method.state_dict())
            method.load_state_dict(load_state(checkpoint, WEIGHTS))
    return logs


def read_back(model, injection, merge: bool = True) -> None:
    """What the loop, checkpoints and exports read of a trained model: rank pattern,
    counts, eligibility, update norms, the method's state (saved and loaded), the compact
    adapter state (saved and loaded), each adapter's ΔW and LoRA pair, the merge (none
    of them for an inserted module: no ΔW)."""
    method, adapters = injection.method, injection.adapters
    method.rank_pattern(adapters), method.active_parameter_count(adapters), method.checkpoint_eligible(STEPS)
    update_norms(model)
    method.load_state_dict(method.state_dict())
    assert not load_adapter_state(model, adapter_state_dict(model, compact=True, base_names=injection.base_names))
    with torch.no_grad():
        for path, adapter in adapters.items():
            if not adapter.mergeable:
                continue
            layer = model.get_submodule(path)
            w0 = base.weight_out_in(layer.base_layer, layer.info.fan_in_fan_out).detach()
            adapter.delta_weight(w0)
            try:
                adapter.lora_factors(w0)
            except NotImplementedError:
                pass
    shared = getattr(model, "lrr_shared", None)
    if merge and all(getattr(a, "mergeable", True) for a in [*adapters.values(), *([shared] if shared is not None else [])]):
        merge_adapters(model)


def method_config(name: str, **over) -> dict:
    spec = method_specs()[name]
    cfg = {"name": name, **spec.defaults(), **SETTINGS.get(name, {}), **DYNAMIC.get(name, {}), **over}
    if "r" in spec.params and name not in SETTINGS and name not in DYNAMIC:
        cfg["r"] = 4
    return cfg


def cases():
    """Every registered method on each family (MTLoRA's four structures on GPT-2)."""
    out = []
    for name in sorted(method_specs()):
        for model_type in FAMILIES:
            structures = ("shim", "icfm", "ctcm", "dtsm") if model_type == "gpt2" else ("shim",)
            if name == "mtlora":
                out += [pytest.param(model_type, method_config(name, structure=s), id=f"mtlora-{s}-{model_type}")
                        for s in structures]
            elif (name, model_type) not in REFUSED:
                out.append(pytest.param(model_type, method_config(name), id=f"{name}-{model_type}"))
    return out


def needs_peft(name: str) -> None:
    if name == "adalora" and PEFT is None:
        pytest.skip("adalora trains with PEFT's RankAllocator: peft is not installed")


def assert_ranks_changed(name: str, before, after, logs) -> None:
    if name in DYNAMIC:  # the schedule really grew or pruned ranks within the audited steps
        assert before is not None and after != before, (before, after)
        assert logs[-1].get("active_ranks") == sum(after.values())


@pytest.mark.parametrize("model_type, method_cfg", cases())
def test_no_step_makes_a_tensor_off_the_weights_device(monkeypatch, tmp_path, model_type, method_cfg):
    needs_peft(method_cfg["name"])
    model = tiny_classifier(model_type)
    torch.manual_seed(1)
    with tensors_off_the_weights_device(monkeypatch):
        injection = inject_method(model, method_cfg, model_type)
        before = injection.method.rank_pattern(injection.adapters)
        logs = train(model, injection, checkpoint=tmp_path / "method.safetensors")
        after = injection.method.rank_pattern(injection.adapters)
        read_back(model, injection)
    assert_ranks_changed(method_cfg["name"], before, after, logs)
    assert {t.device for t in model.state_dict().values()} == {WEIGHTS}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-llama"), "llama")


# CondLoRA reads the dequantized W0 in its forward; the five dynamic-rank methods grow or
# prune on it. (LoRA, MTLoRA, the plugin never see W0: nothing of theirs depends on the base.)
@pytest.mark.parametrize("name", ["condlora", "triadaptlora", "lora2", "adalora", "sora", "increlora"])
def test_no_step_on_a_4bit_base_makes_a_tensor_off_the_weights_device(monkeypatch, tmp_path, tiny_llama, name):
    pytest.importorskip("bitsandbytes")
    needs_peft(name)
    import transformers

    from lowrank_runner.backbones import dequantize_model
    from lowrank_runner.modeling import build_adapted_model

    config = {"backbone": {"name": str(tiny_llama), "dtype": "float32", "quantization": {"bits": 4}, "revision": None,
                           "trust_remote_code": False},
              "targets": ["Wq", "Wv"], "method": method_config(name), "task": {"max_length": 16},
              "training": {"train_head": True}}
    with tensors_off_the_weights_device(monkeypatch):
        adapted = build_adapted_model(config, transformers.AutoModelForSequenceClassification, {"num_labels": 3},
                                      weights=True)
        model, injection = adapted.model, adapted.injection
        assert all(base.is_quantized_weight(layer.base_layer.weight) for layer in model.modules()
                   if hasattr(layer, "lrr_adapter"))
        before = injection.method.rank_pattern(injection.adapters)
        logs = train(model, injection, checkpoint=tmp_path / "method.safetensors")
        after = injection.method.rank_pattern(injection.adapters)
        read_back(model, injection, merge=False)
        merge_adapters(dequantize_model(model))  # what lrr export --merge does with a quantized base
    assert_ranks_changed(name, before, after, logs)


# --- the check catches the bug class ----------------------------------------------------
# A LoRA-like toy with a rank mask, an orthogonality regulariser, allocator state, a
# pruning step that re-draws a pruned row, and a rank decision; ``mistake`` names the one
# place that makes its tensor without a device (None: every tensor made right).

MISTAKES = {  # mistake: (the factory it calls without a device, whether using its tensor raises by itself)
    "parameter": ("zeros", True),  # a new parameter (capacity, a grown rank) made on the default device
    "forward_mask": ("ones", True),  # a mask built in the forward: torch.ones(r)
    "index": ("arange", False),  # an index tensor: torch.arange(r) (on a GPU: a host-to-device copy every step)
    "eye": ("eye", True),  # the regulariser's identity: torch.eye(r)
    "allocator_state": ("zeros", True),  # importance statistics started with torch.zeros(r)
    "mask_from_list": ("tensor", True),  # a new mask copied in from torch.tensor([...]): a silent host-to-device copy
    "growth_draw": ("randn", True),  # a re-drawn row: torch.randn(n).to(weight.device)
    "decision": ("tensor", False),  # the rank decision all-reduced across processes: torch.tensor([...])
}


class ToyAdapter(Adapter):
    reads_w0 = False

    def __init__(self, layer, r: int, mistake: str | None):
        super().__init__()
        here = {"device": layer.device}
        self.r, self.mistake = r, mistake
        self.A = nn.Parameter(torch.randn(r, layer.in_features, **here) * 0.1)
        self.B = nn.Parameter(torch.zeros(layer.out_features, r, **({} if mistake == "parameter" else here)))
        self.register_buffer("rank_mask", torch.ones(r, **here))

    def mask(self) -> torch.Tensor:
        if self.mistake == "forward_mask":
            return self.rank_mask * torch.ones(self.r)
        if self.mistake == "index":
            return self.rank_mask[torch.arange(self.r)]
        return self.rank_mask

    def forward(self, x, w0):
        return ((x @ self.A.T) * self.mask()) @ self.B.T

    def delta_weight(self, w0):
        return self.B @ (self.A * self.mask()[:, None])


class ToyMethod(AdapterMethod):
    name = "toy"

    def __init__(self, mistake: str | None = None):
        super().__init__(r=2)
        self.mistake = mistake
        self.importance: dict[str, torch.Tensor] = {}

    def create_adapter(self, layer, w0):
        return ToyAdapter(layer, self.params["r"], self.mistake)

    def on(self, what: str, like: torch.Tensor) -> dict:
        """``device=`` of ``like`` for a factory call, none for the mistake ``what``."""
        return {} if self.mistake == what else {"device": like.device}

    def extra_loss(self, adapters):
        toys = [a for _, a in leaf_items(adapters)]
        return 0.01 * torch.stack([(a.A @ a.A.T - torch.eye(a.r, **self.on("eye", a.A))).pow(2).sum()
                                   for a in toys]).mean()

    def after_optimizer_step(self, step, adapters, optimizer=None):
        pruned = []
        with torch.no_grad():
            for path, a in leaf_items(adapters):
                old = self.importance.get(path)
                if old is None:
                    old = torch.zeros(a.r, **self.on("allocator_state", a.A))
                score = (a.A * a.A.grad).abs().sum(1) if a.A.grad is not None else a.A.abs().sum(1)
                self.importance[path] = 0.85 * old + 0.15 * score
                if step == 2:  # prune the last rank, re-draw its row of A
                    a.rank_mask.copy_(torch.tensor([1.0] * (a.r - 1) + [0.0], **self.on("mask_from_list", a.A)))
                    row = torch.randn(a.A.shape[1], **self.on("growth_draw", a.A))
                    a.A[-1].copy_(row.to(a.A.device))
                    pruned.append(a.r - 1)
            if pruned:
                decision = torch.tensor(pruned, **self.on("decision", next(iter(adapters.values())).A))
                base.check_same_across_processes(decision, "toy pruning", step)
        return {"active_ranks": sum(int(a.rank_mask.sum()) for _, a in leaf_items(adapters))}

    def rank_pattern(self, adapters):
        return {path: int(a.rank_mask.sum()) for path, a in leaf_items(adapters)}


def train_toy(monkeypatch, mistake: str | None) -> None:
    model = tiny_classifier("bert")
    torch.manual_seed(1)
    with tensors_off_the_weights_device(monkeypatch):
        injection = inject_method(model, ToyMethod(mistake), "bert")
        train(model, injection, steps=3)
        read_back(model, injection)


def test_the_audit_passes_the_toy_adapter_done_right(monkeypatch):
    train_toy(monkeypatch, None)


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_the_audit_catches_each_kind_of_mistake(monkeypatch, mistake):
    factory, fails_in_use = MISTAKES[mistake]
    with pytest.raises(MisplacedTensor) as caught:
        train_toy(monkeypatch, mistake)
    message = str(caught.value)
    assert f"torch.{factory} at tests/test_device_placement.py:" in message, message  # the site of the mistake
    assert message.count(" at tests/") == 1, message  # and only that one
    if fails_in_use:  # the misplaced tensor itself made the step fail, as it would on a GPU
        cause = caught.value.__cause__
        assert cause is not None and "meta" in str(cause), repr(cause)
    if mistake == "decision":
        assert "toy pruning: its rank decision is on meta, the weights on cpu" in message
