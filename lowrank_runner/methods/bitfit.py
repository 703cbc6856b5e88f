"""BitFit (Ben Zaken et al., 2022): only the backbone's bias terms train (with the task
head), the "BitFit" baseline row of the seed papers' GLUE tables.

"All bias terms", as the paper: every parameter named ``bias`` in the backbone body
(attention query/key/value/output, MLP, LayerNorm biases, the embeddings' LayerNorm),
nothing else. Like full fine-tuning it puts no adapter on the recipe's ``targets``
(``"x-targets": false``); the biases are saved in ``adapter.safetensors`` and the merged
export is the backbone holding them. Parameters: ``Σ numel`` of those biases, e.g. BERT-
/RoBERTa-/DeBERTaV3-base ``12 · (4·768 + 3072 + 768 + 2·768) + 768 = 102,144`` ≈ "0.1M"
(the papers' "# Params"; the head is not counted there). A backbone without biases
(LLaMA) is refused: BitFit would train nothing of it.
"""

from __future__ import annotations

from lowrank_runner.methods.inject import head_parameter_names
from lowrank_runner.methods.base import AdapterMethod


class BitFit(AdapterMethod):
    name = "bitfit"

    def trainable_base_parameters(self, model) -> list[str]:
        head = set(head_parameter_names(model))
        names = [n for n, _ in model.named_parameters() if n.rpartition(".")[2] == "bias" and n not in head]
        if not names:
            raise ValueError(f"bitfit: the backbone ({type(model).__name__}) has no bias terms to train; "
                             "use another method (e.g. lora or full)")
        return names
