"""Keep third-party libraries' logging and progress bars out of lrr's own display."""

from __future__ import annotations

import os
import warnings


def quiet_bitsandbytes() -> None:
    """bitsandbytes' notes at import: its CPU backend says it could not fetch an optional
    kernel from the Hub (and falls back to its own) whenever anything imports it, which
    peft does and transformers' optimizers import peft: every run printed it, quantized
    or not; offline, the ``kernels`` package it asks notes that it skips a trust check.
    Their errors still show."""
    import logging

    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_libraries() -> None:
    quiet_bitsandbytes()
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    # the libraries' notes to each other (a deprecated transformers name peft still calls) are not the user's
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate|datasets)(\.|$)")
