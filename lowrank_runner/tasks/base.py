"""What a task implementation provides to the runner (data, head, metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lowrank_runner.tasks.registry import LOWER_IS_BETTER, TaskSpec

IGNORE = -100  # the label of a token no loss is computed on (transformers' and PyTorch's ignore_index)


class Task:
    """Base class: a task built from the resolved ``task`` section of a run."""

    spec: TaskSpec
    model_class_name = "AutoModelForSequenceClassification"
    train_head_default = True

    def __init__(self, config: dict, spec: TaskSpec):
        self.config = config
        self.spec = spec
        self.latest_outputs: dict[str, list[dict]] = {}  # per split, set by evaluate(); see outputs()

    # ---- data
    def load_splits(self):  # -> datasets.DatasetDict with "train" and "validation"
        raise NotImplementedError

    def count_train_examples(self) -> int:
        raise NotImplementedError

    def data_files(self) -> dict:
        """Split → the local file it is read from (empty for hub data): ``task.data``'s
        files by default. The report fingerprints exactly these."""
        from lowrank_runner.resources import resolve_local_path

        data = self.config.get("data")
        if not isinstance(data, dict):
            return {}
        return {role: resolve_local_path(v) for role, v in data.items()
                if role not in ("format", "delimiter") and isinstance(v, str)}

    def load_hub(self, path: str, name: str | None, what: str, offline_fix: str):
        """``datasets.load_dataset(path, name)``, failing in seconds with ``offline_fix``
        when the hub cannot be used (instead of minutes of retries), and with one line for
        any other failure (unknown id, a script-only dataset, ...). A copy in the datasets
        cache is used offline with ``HF_DATASETS_OFFLINE=1``."""
        import datasets

        from lowrank_runner.hub import hub_unreachable
        from lowrank_runner.errors import DataError

        offline = getattr(datasets.config, "HF_DATASETS_OFFLINE", False) or getattr(datasets.config, "HF_HUB_OFFLINE", False)
        local = Path(path).expanduser().exists()  # a dataset saved in a directory: no hub involved
        why = None if offline or local else hub_unreachable()  # offline mode: datasets reads its cache, or fails
        if why is not None:
            error = DataError(f"cannot load {what} from the hub '{path}' ({why}); {offline_fix} (or, with a copy in "
                              "the datasets cache, set HF_DATASETS_OFFLINE=1)")
            error.shared_by = "hub"  # every run reading the hub's data fails alike (train/invocation.py)
            raise error
        try:
            return datasets.load_dataset(path, name)
        except Exception as exc:  # offline without a cached copy, unknown id, script-only dataset, ...
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise DataError(f"cannot load {what} from '{path}' ({type(exc).__name__}: {first}); {offline_fix}") from None

    def limit_samples(self, splits, eval_splits=("validation",)):
        """Cut ``train`` to ``task.max_train_samples`` and each evaluation split to
        ``task.max_eval_samples`` (the first rows; unset or larger: unchanged)."""
        limits = {"train": self.config.get("max_train_samples")}
        limits.update({s: self.config.get("max_eval_samples") for s in eval_splits})
        for split, limit in limits.items():
            if limit and limit < len(splits[split]):
                splits[split] = splits[split].select(range(limit))
        return splits

    def tokenize(self, splits, tokenizer):  # -> DatasetDict of model inputs + "labels"
        raise NotImplementedError

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        """Batches tokenized examples (dynamic padding per batch)."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def eval_splits(self) -> dict[str, str]:
        """Evaluation splits and the suffix of their metric names ("validation" first,
        unsuffixed; MNLI adds its mismatched dev set as ``*_mm``)."""
        return {"validation": ""}

    def test_splits(self) -> dict[str, str]:
        """Test splits the task loaded itself (keys ``test__<name>`` in :meth:`load_splits`)
        and the suffix of their metric names: the run scores the selected checkpoint on them
        once, after training, as it does the test sets of ``task.holdout_fraction``
        (data-to-text: ``task.test_split`` / ``task.data.test``). Default: none."""
        return {}

    # ---- model head
    def model_config_kwargs(self) -> dict[str, Any]:
        return {}

    @property
    def model_class(self):
        import transformers

        return getattr(transformers, self.model_class_name)

    # ---- scoring
    @property
    def metric(self) -> str:
        return self.config.get("metric") or self.spec.primary_metric

    @property
    def greater_is_better(self) -> bool:
        """Whether the selection metric improves upwards (errors and losses select the lowest)."""
        return self.metric not in LOWER_IS_BETTER

    def model_inputs(self, batch) -> dict:
        """What a training step passes to the model: the whole batch (labels included, so
        the model computes its own loss) unless :meth:`loss` computes the loss itself."""
        return batch

    def loss_items(self, batch) -> int | None:
        """How many items the loss of ``batch`` averages over when it is token-level (its
        label tokens); None (the default) for a per-example mean loss. The loop adds these
        up over an optimizer step (all micro-batches, all processes) and passes the total
        to :meth:`loss` as ``num_items``, so any split of ``training.batch_size`` trains on
        the full batch's token mean (transformers' ``num_items_in_batch``)."""
        return None

    def loss(self, outputs, batch, num_items: int | None = None):
        """The training loss of one batch (default: the model's own, ``outputs.loss``);
        tasks that train with another loss (label smoothing) override it. With
        ``num_items`` (tasks whose :meth:`loss_items` counts tokens) it is the batch's
        summed token loss divided by ``num_items``: its share of the step's token mean."""
        return outputs.loss

    def evaluate(self, model, dataloader, accelerator, split: str) -> dict[str, float]:
        """Score ``model`` on one tokenized evaluation split (every process takes part;
        results are gathered). Default: logits → :meth:`predictions` →
        :meth:`compute_metrics`, plus the mean loss. Tasks whose scoring needs more than
        logits (span extraction, generation) override it."""
        from lowrank_runner.tasks.evaluation import evaluate_logits

        return evaluate_logits(self, model, dataloader, accelerator)

    def outputs(self) -> dict[str, list[dict]]:
        """Per evaluation split, rows from its latest evaluation that the run saves as
        ``outputs_<split>.jsonl`` (data-to-text: source, output, references per distinct
        source; squad_v2: id, prediction ("" for no answer), best_span and null_score_diff,
        the official script's na_prob input, per question). Tasks fill
        ``self.latest_outputs`` in :meth:`evaluate`."""
        return self.latest_outputs

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        raise NotImplementedError


def build_task(config: dict) -> Task:
    from lowrank_runner.tasks.registry import get_task_spec

    spec = get_task_spec(config["name"])
    return spec.load()(config, spec)


def shifted_token_loss(logits, labels, num_items: int | None, ignore: int = IGNORE, smoothing: float = 0.0):
    """Next-token cross-entropy of a causal LM (label-smoothed by ``smoothing``: PyTorch's
    definition) over the tokens whose label is not ``ignore``: their mean, or with
    ``num_items`` their sum divided by ``num_items``. Only the labelled positions' logits
    are taken to float32 (vocabularies are large)."""
    import torch.nn.functional as F

    labels = labels[:, 1:]
    mask = labels != ignore
    picked = logits[:, :-1][mask].float()
    if num_items is None:
        return F.cross_entropy(picked, labels[mask], label_smoothing=smoothing)
    return F.cross_entropy(picked, labels[mask], reduction="sum", label_smoothing=smoothing) / max(num_items, 1)


def shifted_label_count(labels, ignore: int = IGNORE) -> int:
    """The tokens :func:`shifted_token_loss` scores in ``labels`` (all but the first
    position's, where the label is not ``ignore``)."""
    return int((labels[:, 1:] != ignore).sum())


def tokenizing_map(ds, function, tokenizer, settings, **kwargs):
    """``ds.map(function, **kwargs)`` for a map that tokenises, under a fingerprint of what
    its output depends on: the split's own fingerprint, the tokenizer as loaded, the task's
    settings, ``function``'s code and its ``fn_kwargs`` (tokenizers left out). datasets
    would hash the tokenizer in ``function``'s closure as it is *now*, and a fast
    tokenizer's truncation state changes with use: a process that read the first split
    from the cache (not tokenising) then hashed the next split differently from the one
    that wrote it and tokenised it again. With this one, every process finds every split
    another wrote (train/data.py ``tokenized_reuse`` says so)."""
    from datasets.fingerprint import Hasher

    code = function.__code__
    extra = {k: v for k, v in (kwargs.get("fn_kwargs") or {}).items() if v is not tokenizer}
    fingerprint = Hasher.hash([ds._fingerprint, tokenizer_fingerprint(tokenizer), settings, code.co_code,
                               code.co_consts, extra, {k: v for k, v in kwargs.items() if k not in ("desc", "fn_kwargs")}])
    return ds.map(function, new_fingerprint=fingerprint, **kwargs)


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's hash as loaded, taken at its first tokenising map (before any use
    changes its state) and kept on it."""
    from datasets.fingerprint import Hasher

    found = getattr(tokenizer, "lrr_fingerprint", None)
    if found is None:
        found = Hasher.hash(tokenizer)
        tokenizer.lrr_fingerprint = found
    return found
