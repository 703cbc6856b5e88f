"""Backbones: where ``backbone.name`` points and how its files are read.

- ``resolve.py``: hub id, local directory or ``pkg:``; the hub reachable in seconds;
  ``config.json``/``tokenizer_config.json`` read here, custom code refused
- ``load.py``: config, tokenizer, weights and the meta-device skeleton through
  transformers, every failure named in one line
- ``quantization.py``: 4/8-bit bases (bitsandbytes), and back for a merge
- ``weights.py``: a local directory's weight files checked before loading
- ``head.py``: the parameters outside the pretrained body

Model files are untrusted input: nothing from a model directory runs unless the recipe
opts in with ``backbone.trust_remote_code: true``. The names below are the package's
API (``from lowrank_runner import backbones``).
"""

from lowrank_runner.backbones.head import outside_body_parameters
from lowrank_runner.backbones.load import build_empty, load_config, load_model, load_tokenizer, torch_dtype
from lowrank_runner.backbones.quantization import (QuantizationError, check_quantized_runs, dequantize_model,
                                                   is_quantized_layer, keep_standard_layout, quantization_settings,
                                                   restore_source_layers)
from lowrank_runner.backbones.resolve import BackboneRef, backbone_file, read_json, resolve
from lowrank_runner.backbones.weights import check_weight_files, shard_files

__all__ = ["BackboneRef", "QuantizationError", "backbone_file", "build_empty", "check_quantized_runs",
           "check_weight_files", "dequantize_model", "is_quantized_layer", "keep_standard_layout", "load_config",
           "load_model", "load_tokenizer", "outside_body_parameters", "quantization_settings", "read_json", "resolve",
           "restore_source_layers", "shard_files", "torch_dtype"]
