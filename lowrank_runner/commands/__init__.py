"""The library behind the CLI's commands that are more than a call into one stage:
``lrr validate`` (:mod:`.validate`), ``lrr inspect`` (:mod:`.inspect`) and what they
print (:mod:`.render`). Only :mod:`lowrank_runner.cli` imports it."""
