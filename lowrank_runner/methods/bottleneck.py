"""Bottleneck adapters, the second kind of method: modules *inserted* into the network,
not updates of its weights.

* ``houlsby`` (Houlsby et al., 2019): two adapters per transformer layer, one on the
  output of the attention output projection (``Wa``), one on the output of the FFN
  output projection (``Wo``);
* ``pfeiffer`` (Pfeiffer et al., 2021): one, on the output of the FFN output projection.

Each adapter maps the projection's output ``h`` (``d`` features) to
``h + up(act(down(h)))``, ``down``: ``d → b``, ``up``: ``b → d`` (``b`` the
``bottleneck``), both with biases: ``2·d·b + b + d`` parameters. It wraps the output
projection like any adapter (:class:`~lowrank_runner.methods.inject.AdaptedLayer`) but
acts on its output (``acts_on = "output"``), so it sits after the projection and before
whatever the block does next: in BERT/RoBERTa/DeBERTa-v2 (``SelfOutput``/``Output``)
dropout, the residual add and LayerNorm; in GPT-2 (``attn.c_proj``, ``mlp.c_proj``)
dropout and the residual add; in LLaMA-like blocks (``o_proj``, ``down_proj``) the
residual add. Initialisation: ``down`` from N(0, init_std²) truncated at two standard
deviations (Houlsby's), biases zero, and ``up`` zero (``init: zero_up``: the adapted model
starts exactly at the backbone) or drawn like ``down`` (``init: near_identity``, the
paper's). docs/methods.md states what follows the papers and the AdaLoRA reference
(``HAdapter``/``PAdapter``) and every deviation.

The placement is the method's, not the recipe's: the schema fixes the targets
(``"x-targets": ["Wa", "Wo"]`` / ``["Wo"]``; modeling checks the recipe's at the key) and
:meth:`InsertedModuleMethod.before_adapters` refuses any other module. No ``ΔW`` exists,
so ``mergeable = False``: ``lrr export --merge``/``--peft`` refuse (``"x-kind":
"inserted"``); the bundle (``--adapter``) and ``load_adapted`` serve it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_runner.methods.base import Adapter, AdapterMethod, LayerInfo, adapter_input

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}


def truncated_normal_(weight: torch.Tensor, std: float) -> None:
    """N(0, std²) truncated at ±2·std (Houlsby et al.'s near-identity draw); nothing is
    drawn on the meta device."""
    if weight.device.type != "meta":
        nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


def zeroed_(tensor: torch.Tensor) -> None:
    if tensor.device.type != "meta":
        nn.init.zeros_(tensor)


class BottleneckAdapter(Adapter):
    """``up(act(down(dropout(h))))``, added to the wrapped projection's output ``h``."""

    reads_w0 = False
    acts_on = "output"
    mergeable = False

    def __init__(self, layer: LayerInfo, bottleneck: int, activation: str, init: str, init_std: float,
                 dropout: float):
        super().__init__()
        d = layer.out_features
        self.adapter_down = nn.Linear(d, bottleneck, device=layer.device, dtype=torch.float32)
        self.adapter_up = nn.Linear(bottleneck, d, device=layer.device, dtype=torch.float32)
        self.activation = activation
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters(init, init_std)

    def reset_parameters(self, init: str, init_std: float) -> None:
        truncated_normal_(self.adapter_down.weight, init_std)
        if init == "near_identity":
            truncated_normal_(self.adapter_up.weight, init_std)
        else:
            zeroed_(self.adapter_up.weight)
        zeroed_(self.adapter_down.bias)
        zeroed_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor, w0: torch.Tensor | None = None) -> torch.Tensor:
        h = adapter_input(self.dropout(h), self.adapter_down.weight)
        return self.adapter_up(ACTIVATIONS[self.activation](self.adapter_down(h)))

    def delta_weight(self, w0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is inserted after its layer: it is no update ΔW of a weight")


class InsertedModuleMethod(AdapterMethod):
    """A method whose adapters are bottleneck modules inserted after fixed projections:
    :attr:`placement`, the target symbols its schema fixes (``x-targets``)."""

    @property
    def placement(self) -> tuple[str, ...]:
        from lowrank_runner.methods.registry import get_method_spec

        return tuple(get_method_spec(self.name).fixed_targets or ())

    def before_adapters(self, layers: list[LayerInfo]) -> None:
        wrong = [layer.path for layer in layers if not set(layer.symbols) <= set(self.placement)]
        if wrong:
            raise ValueError(f"{self.name} inserts its adapters after {', '.join(self.placement)} only, not after "
                             f"{', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}; set targets: "
                             f"[{', '.join(self.placement)}]")

    def create_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        p = self.params
        return BottleneckAdapter(layer, p["bottleneck"], p["activation"], p["init"], p["init_std"], p["dropout"])

    def create_fused_adapter(self, layer: LayerInfo, w0: torch.Tensor) -> Adapter:
        raise ValueError(f"{self.name} cannot go on the fused projection {layer.path} (q/k/v groups); set targets: "
                         f"[{', '.join(self.placement)}]")


class Houlsby(InsertedModuleMethod):
    name = "houlsby"


class Pfeiffer(InsertedModuleMethod):
    name = "pfeiffer"
