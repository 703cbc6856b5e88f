"""The run-directory format: what ``lrr run`` writes and everything else reads.

- ``layout.py``: the name of every file and folder of a run directory (and of a
  recipe's root), the checkpoint directories
- ``files.py``: JSON written atomically, ``recipe.yaml`` and its header, ``metrics.jsonl``
- ``adapter.py``: ``adapter/``: ``adapter_config.json`` (format, writer, checked reader),
  the safetensors files
- ``schema.py``: what is read of ``report.json``, ``metrics.json``, ``summary.json``
- ``reports.py``: a run's report and a recipe's summary, read back and checked
- ``status.py``: a run that failed or was interrupted, and why
- ``history.py``, ``plots.py``, ``markdown.py``, ``write.py``: ``report.md`` and its
  figures, written when a run ends and redrawn by ``lrr report --render``
- ``search.py``: a search's root (its studies, trials and final runs)

The lowest layer of the package (docs/architecture.md): it imports nothing of
lowrank-runner but :mod:`lowrank_runner.errors` and its version, and no torch.
"""
