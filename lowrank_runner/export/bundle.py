"""Adapter bundles: ``lrr export RUN_DIR --adapter --out DIR`` and
:func:`load_adapted`, which puts a bundle (or a run directory) back onto its backbone.

A bundle is everything needed to rebuild the adapted model except the backbone::

    DIR/
      adapter_config.json    method and its resolved parameters, target module paths (with
                             fused q/k/v groups), backbone (recipe entry + resolved location),
                             task head config (model class, labels)
      adapter.safetensors    adapter weights (dynamic-rank methods at their final ranks)
      head.safetensors       trained task head, when the run trained one
      recipe.yaml            the run's resolved config (how the model is rebuilt)
      tokenizer files        the tokenizer the run used
      lrr_export.json        provenance: source run (its name), hashes, the round-trip check

It is written in a temporary sibling directory, loaded back with :func:`load_adapted` and
compared with the run's model on the probe batch; only an identical round trip is renamed
into place. ``lrr export DIR --merge`` accepts a bundle like a run directory.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from lowrank_runner.errors import ExportError, UsageError
from lowrank_runner.export.common import (BUNDLE_FORMAT, DTYPES, backbone_checked, check_tolerance, collect_if_alive,
                                          provenance, staged_output, write_export_files)
from lowrank_runner.export.probe import compare_outputs, model_outputs, probe_batch, reference_outputs
from lowrank_runner.export.source import load_trained_model, loaded_backbone, preflight, read_run, source_tokenizer
from lowrank_runner.quiet import quiet_libraries
from lowrank_runner.resources import is_pkg_path
from lowrank_runner.rundir.adapter import save_adapter
from lowrank_runner.rundir.files import write_recipe
from lowrank_runner.rundir.layout import RECIPE_FILE



def load_adapted(bundle_dir, backbone: str | None = None, dtype: str | None = None):
    """The backbone with the bundle's adapter and task head attached (``lrr``'s own
    adapter layers), in eval mode. ``bundle_dir``: a bundle written by
    ``lrr export --adapter`` or a run directory. ``backbone``: where the backbone is now
    (a local directory or hub id), if not where the run found it. ``dtype``: the
    backbone's dtype (default: the recipe's ``backbone.dtype``); adapters stay float32.
    The tokenizer: ``transformers.AutoTokenizer.from_pretrained(bundle_dir)``.

    A bundle that is missing, damaged or does not fit its backbone raises an
    :class:`~lowrank_runner.errors.LrrError` (``ExportError``, ``BackboneError``,
    ``UsageError``) whose message names the file and the fix."""
    quiet_libraries()
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"load_adapted(dtype={dtype!r}): choose one of {', '.join(DTYPES)} (or None: the recipe's)")
    model, *_ = load_trained_model(Path(bundle_dir), dtype=dtype, backbone=backbone)
    return model


def _portable_location(config: dict, ref) -> str:
    """The backbone as the bundle should name it: an absolute path for a local directory
    (a relative one would break when the bundle is used from elsewhere)."""
    name = config["backbone"]["name"]
    if ref.local and not is_pkg_path(name):
        return str(Path(ref.location).resolve())
    return name


def export_bundle(source: Path, out: Path, tolerance: float = 0.0, backbone: str | None = None,
                  base_model: str | None = None) -> dict:
    quiet_libraries()
    source, out = Path(source), Path(out)
    tolerance = check_tolerance(tolerance)
    preflight(source, out)
    config, adapter_cfg, adapter, head = read_run(source, backbone)
    model, adapted, _, _ = load_trained_model(source, backbone=backbone)
    ref = adapted.backbone
    used = backbone_checked(loaded_backbone(source, adapter_cfg, ref, backbone))
    updates = adapted.base_updates
    del adapted
    tokenizer = source_tokenizer(source, ref, config)
    batch = probe_batch(tokenizer, config["task"]["max_length"])
    expected = reference_outputs(model, batch, source, updates)
    alive = weakref.ref(model)
    del model
    collect_if_alive(alive)

    location = _portable_location(config, ref)
    config = {**config, "backbone": {**config["backbone"], "name": location}}
    # The bundle names the backbone it was checked on, with its fingerprint (a later export compares against it).
    adapter_cfg = {**adapter_cfg, "backbone": {**adapter_cfg["backbone"], "name": location, "resolved": used["resolved"],
                                               "source": used["source"], "fingerprint": used["fingerprint"]}}
    with staged_output(out) as tmp:
        save_adapter(tmp, adapter, head, adapter_cfg)
        # the header names the run (absolute: the model card finds its report by it); lrr_export.json only its name
        write_recipe(tmp / RECIPE_FILE, config, adapter_cfg.get("recipe_hash"), adapter_cfg.get("config_hash"),
                     str(source.resolve()))
        tokenizer.save_pretrained(tmp)
        reloaded = load_adapted(tmp)
        max_diff, mean_diff = compare_outputs(expected, model_outputs(reloaded, batch))
        del reloaded
        if not max_diff <= tolerance:
            raise ExportError(f"the bundle, loaded back, differs from the run's model by {max_diff:.3g} (tolerance {tolerance:g}); nothing written")
        info = {
            **provenance(source, adapter_cfg, BUNDLE_FORMAT, used, base_model),
            "modules": [m["path"] for m in adapter_cfg["modules"]],
            "adapter_tensors": len(adapter),
            "head_tensors": len(head),
            "probe_examples": len(batch["input_ids"]),
            "outputs_compared": sorted(expected),
            "max_abs_logit_diff": max_diff,
            "mean_abs_logit_diff": mean_diff,
            "tolerance": tolerance,
        }
        write_export_files(tmp, info)
    return info
