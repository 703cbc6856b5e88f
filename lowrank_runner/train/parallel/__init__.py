"""Parallel runs of one recipe: ``lrr run RECIPE --parallel N``.

The driver (:mod:`.schedule`) computes the recipe's runs and their ``init_from``
dependencies, and trains each run in a child process (``lrr run RECIPE --only-run SLUG``)
through an executor: :class:`.local.LocalExecutor` (processes on this machine, devices
divided) or :class:`.ray_executor.RayExecutor` (a Ray cluster). The jobs and the executor
interface are in :mod:`.jobs`.
"""
