"""The reproducibility report of a run and the comparison of runs.

- ``environment.py``: package versions, git state, Python, OS, CPU/GPU, CUDA, peak memory
- ``fingerprint.py``: backbone and data fingerprints (hub commits, file hashes)
- ``history.py``: ``metrics.jsonl`` → training/evaluation history, per-epoch rows
- ``build.py``: the content of ``report.json`` at the end of a run
- ``curves.py``: loss and metric plots (PNG)
- ``markdown.py``: ``report.md`` of a run and of a multi-run recipe
- ``write.py``: writes the report files of a run / recipe, re-renders them
- ``compare.py``: reads run directories, the differences between runs (``lrr report``)
- ``schema.py``: what ``lrr report`` reads of report.json, metrics.json, summary.json (JSON Schemas)
- ``terminal.py``: ``lrr report`` on the terminal (rich)

Only ``environment`` is re-exported here; the package imports no torch.
"""

from lowrank_runner.report.environment import environment, git_state, package_versions

__all__ = ["environment", "git_state", "package_versions"]
