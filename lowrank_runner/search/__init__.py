"""Hyperparameter searches: a recipe's ``search:`` block, run with Optuna.

:mod:`~lowrank_runner.recipe.search` reads and checks the block (torch- and
Optuna-free, for ``lrr validate``); :mod:`~lowrank_runner.search.command` starts it (``lrr run``);
:mod:`~lowrank_runner.search.study` runs it (one Optuna study per task in
``RUN_DIR/search.db``, each trial a run directory, then the best point with the recipe's
seeds); :mod:`~lowrank_runner.search.parallel` trains the trials N at a time in child
processes (``--parallel N``, ``--executor ray``); :mod:`~lowrank_runner.search.record` writes
``search.json`` and ``search.md``; :mod:`~lowrank_runner.rundir.search` names the
files (and lets ``lrr report`` / ``lrr export`` read a search's final runs, ``best/``);
:mod:`~lowrank_runner.search.choices` builds the model at each choice for ``lrr inspect``.
"""
