"""A run's plan, before anything is loaded: how many optimizer steps it takes and the
batch each process trains on (``schedule.py``), the checks of that plan and of the
method's step schedule (``checks.py``), and whether the learning rate integrates to what
the method needs at those steps (``plan/guidance.py``; ``recipe_warnings.py`` for
``lrr validate``). ``lrr inspect`` and the training loop call the same functions.
Torch-free.
"""
