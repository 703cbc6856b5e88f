"""Which parameters of a transformers model are not its pretrained body."""

from __future__ import annotations


def outside_body_parameters(model) -> list[str]:
    """Parameters outside the backbone body (``base_model_prefix``) that are not the
    output embeddings: a task model's head (``classifier``/``score``, DeBERTa's pooler,
    ``qa_outputs``), the modules PEFT keeps trainable with ``modules_to_save``. A language
    model's output projection (``lm_head``, often tied to the input embeddings) is
    pretrained, not new: it is never in the list."""
    prefix = model.base_model_prefix + "."
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = {id(p) for p in output.parameters()} if output is not None else set()
    return [n for n, p in model.named_parameters() if not n.startswith(prefix) and id(p) not in lm_head]
