"""``lrr report``: run directories read back and compared.

- ``compare.py``: the runs a path stands for (a run, a recipe's root, a search's final
  runs) and how they differ: recipe keys, inputs (backbone and data fingerprints),
  environment, metrics
- ``terminal.py``: a run's report and a comparison on the terminal (rich)

The files themselves, their formats and readers are :mod:`lowrank_runner.rundir`'s;
``--render`` redraws them with :mod:`lowrank_runner.rundir.write`. Torch-free.
"""
