"""An example third-party method package: LoRA-FA (Zhang et al., 2023: LoRA with a frozen,
randomly initialised A; only B trains). It registers through the entry-point group
``lowrank_runner.methods`` (see the .dist-info beside it) with a torch-free schema, exactly
as a package on PyPI would, and is checked by the same conformance suite as the built-ins."""

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://example.org/lrr_example_plugin/lora_fa.schema.json",
    "title": "lora_fa",
    "description": "LoRA-FA: h = W0 x + (alpha/r) B A x with A frozen (random), B trained from zero.",
    "x-paper": "Zhang et al., LoRA-FA: Memory-efficient Low-rank Adaptation (2023)",
    "x-implementation": "lrr_example_plugin.method:LoRAFA",
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"const": "lora_fa"},
        "r": {"type": "integer", "minimum": 1, "default": 8, "description": "Rank."},
        "alpha": {"type": "number", "exclusiveMinimum": 0, "default": 16, "description": "Scaling numerator."},
        "dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0.0, "description": "Adapter dropout."},
    },
}
