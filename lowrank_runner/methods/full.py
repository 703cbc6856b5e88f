"""Full fine-tuning: every parameter of the backbone trains (with the task head), the
baseline row "Fine-Tune"/"Full Fine-tuning" of every seed paper's GLUE table.

No adapter is put anywhere (the schema says ``"x-targets": false``: the recipe's
``targets`` are not used); the method names the backbone's parameters instead
(:meth:`~lowrank_runner.methods.base.AdapterMethod.trainable_base_parameters`), which the
loop unfreezes, optimises (weight decay by role: none on biases and norms), checkpoints
and saves in ``adapter.safetensors``. The merged export is the backbone holding them.
Parameters: every backbone parameter, ``Σ numel`` over ``model.named_parameters()``
less the head; with the head that is the whole model (RoBERTa-base 124.6M ≈ "125M",
DeBERTaV3-base 184.4M ≈ "184M", the papers' "# Params").
"""

from __future__ import annotations

from lowrank_runner.methods.inject import head_parameter_names
from lowrank_runner.methods.base import AdapterMethod


class FullFineTuning(AdapterMethod):
    name = "full"

    def trainable_base_parameters(self, model) -> list[str]:
        head = set(head_parameter_names(model))
        return [name for name, _ in model.named_parameters() if name not in head]
