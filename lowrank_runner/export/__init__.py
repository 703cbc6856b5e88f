"""The export stage: a trained run (or an adapter bundle) as something to deploy or share.

- :mod:`~lowrank_runner.export.source`: the source (a run directory or a bundle), every
  file found and checked before anything is loaded, read, and rebuilt into the trained
  model (:func:`load_trained_model`);
- :mod:`~lowrank_runner.export.merge`: ``lrr export --merge``, a merged Hugging Face
  checkpoint;
- :mod:`~lowrank_runner.export.bundle`: ``lrr export --adapter``, an adapter bundle, and
  :func:`load_adapted`, which puts one back onto its backbone;
- :mod:`~lowrank_runner.export.peft`: ``lrr export --peft``, a PEFT LoRA adapter;
- :mod:`~lowrank_runner.export.probe`: the probe batch every export is checked on, and
  the comparison of two models' outputs;
- :mod:`~lowrank_runner.export.common`: what the exports share (option and ``--out``
  checks, the staged output directory, provenance).

Importing any of them imports no torch (``lrr validate`` stays light); the exports
import it when they run.
"""

from lowrank_runner.export.bundle import export_bundle, load_adapted
from lowrank_runner.export.merge import export_merged
from lowrank_runner.export.peft import export_peft
from lowrank_runner.export.probe import PROBE_TEXTS, probe_batch
from lowrank_runner.export.source import load_trained_model, read_run

__all__ = ["export_merged", "export_bundle", "export_peft", "load_adapted", "load_trained_model", "read_run",
           "probe_batch", "PROBE_TEXTS"]
