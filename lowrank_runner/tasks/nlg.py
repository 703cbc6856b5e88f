"""Data-to-text generation (E2E, DART, WebNLG, your own files) on a causal language model.

The setting of LoRA's GPT-2 experiments (§5.5 and its examples/NLG code), which MTLoRA
(§4.3, Tables 5-6) reuses:

* Linearisation: an E2E meaning representation ``name[The Vaults], eatType[pub]`` becomes
  ``name : The Vaults | eatType : pub``; a set of triples becomes
  ``subject : predicate : object | subject : predicate : object`` (DART's predicates
  lower-cased, as LoRA's converter does). Text already linearised is kept as it is.
* One training sequence per (source, reference) pair:
  ``source <bos> ␣target <eos>`` (GPT-2's bos and eos are both ``<|endoftext|>``), with
  the loss on the target tokens and the final eos only (labels -100 on the source, the
  separator and the padding). ``task.label_smoothing`` smooths that loss.
* Evaluation: the loss and perplexity over every pair of the split, then one generation
  per distinct source (``transformers``' ``generate``: beam search, length penalty,
  no-repeat n-grams) scored against all of that source's references
  (:mod:`lowrank_runner.tasks.text_metrics`).

Data: the hub (``task.dataset``; defaults below) or your files (``task.data``: CSV, TSV,
JSON Lines or Parquet with a source and a target column; E2E's official CSVs with their
``mr,ref`` header work as they are). Rows whose target holds several texts (a list, DART's
``annotations``, WebNLG's ``lex``, of which only the lexicalisations marked ``good`` are
kept, as LoRA's converter does) become one pair per text. A test set (``task.test_split``,
or ``task.data.test`` with files) is loaded as ``test__test`` and scored once with the
selected checkpoint (:meth:`DataToText.test_splits`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from lowrank_runner.errors import DataError, warn
from lowrank_runner.tasks.base import IGNORE, Task, shifted_label_count, shifted_token_loss, tokenizing_map
from lowrank_runner.tasks.data_check import Rows
from lowrank_runner.tasks.holdout import TEST_PREFIX
from lowrank_runner.tasks.rules import NLG_HUB

SOURCE_COLUMNS = ("source", "meaning_representation", "mr", "tripleset", "modified_triple_sets", "input", "context")
TARGET_COLUMNS = ("target", "human_reference", "ref", "completion", "annotations", "lex", "text")
REFERENCES_COLUMN = "references"
_SLOT = r"[^\[\],]+\[[^\]]*\]"
_MR = re.compile(rf"\s*{_SLOT}(\s*,\s*{_SLOT})*\s*")
_SLOTS = re.compile(r"([^\[\],]+)\[([^\]]*)\]")


def linearise_mr(mr: str) -> str:
    """``name[The Vaults], eatType[pub]`` → ``name : The Vaults | eatType : pub``; text
    that is not an E2E meaning representation is returned stripped, otherwise unchanged."""
    if not _MR.fullmatch(mr):
        return mr.strip()
    return " | ".join(f"{key.strip()} : {value.strip()}" for key, value in _SLOTS.findall(mr))


def _triple(item, lower_predicate: bool) -> str:
    parts = [p.strip() for p in (item.split("|") if isinstance(item, str) else item)]
    if len(parts) != 3:
        raise ValueError(f"a triple needs subject, predicate and object, got {item!r}")
    subject, predicate, obj = parts
    return f"{subject} : {predicate.lower() if lower_predicate else predicate} : {obj}"


def linearise(value, lower_predicate: bool = False) -> str:
    """One structured input as text: an E2E meaning representation, a list of triples
    (``[s, p, o]`` lists or ``"s | p | o"`` strings), or WebNLG's ``{"mtriple_set": [[...]]}``."""
    if isinstance(value, str):
        return linearise_mr(value)
    if isinstance(value, dict):  # WebNLG 2017 on the hub: modified_triple_sets
        sets = value.get("mtriple_set") or value.get("triple_set")
        if not sets:
            raise ValueError(f"no triples in {value!r}")
        value = sets[0]
    if isinstance(value, (list, tuple)) and value:
        return " | ".join(_triple(t, lower_predicate) for t in value)
    if value is None:
        raise ValueError("null; every row needs its source (fill it in or remove the row)")
    raise ValueError(f"cannot linearise {value!r}")


def target_texts(value) -> list[str]:
    """Every reference text a target cell holds (WebNLG's ``lex``: the ``good`` ones)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, dict):
        texts = value.get("text") or []
        comments = value.get("comment")
        if comments and len(comments) == len(texts):
            texts = [t for t, c in zip(texts, comments) if c == "good"]
        return [t.strip() for t in texts if t and t.strip()]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in target_texts(v)]
    return [str(value)]


def group_references(sources: list[str], targets: list[str], extra: list[list[str]] | None = None
                     ) -> tuple[list[str], list[list[str]]]:
    """Distinct sources in order of first appearance, each with all of its references."""
    refs: dict[str, list[str]] = {}
    for i, (source, target) in enumerate(zip(sources, targets)):
        bucket = refs.setdefault(source, [])
        for text in [target, *(extra[i] if extra else [])]:
            if text and text not in bucket:
                bucket.append(text)
    return list(refs), list(refs.values())


def encode_sources(tokenizer, sources: list[str], sep: int, keep: int) -> list[list[int]]:
    return [ids[:keep] + [sep] for ids in tokenizer(sources)["input_ids"]]


def encode_pairs(batch, tokenizer, sep: int, eos: int, max_length: int) -> dict:
    """``source <sep> ␣target <eos>`` with labels -100 on ``source <sep>`` (a module-level
    function, so that ``datasets`` fingerprints it and caches the tokenised splits)."""
    prompts = encode_sources(tokenizer, batch["source"], sep, max_length // 2 - 1)
    targets = tokenizer([" " + t for t in batch["target"]], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for prompt, target in zip(prompts, targets):
        target = (target + [eos])[: max_length - len(prompt)]
        ids.append(prompt + target)
        labels.append([IGNORE] * len(prompt) + target)
    return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels}


class _RowError(Exception):
    """A row that cannot be linearised (raised inside ``datasets.map``, named by the caller)."""

    def __init__(self, index: int, message: str):
        super().__init__(index, message)
        self.index, self.message = index, message


@dataclass
class EvalSet:
    """One evaluation split's distinct sources: text, token ids (``source <sep>``), references."""

    sources: list[str]
    prompts: list[list[int]]
    references: list[list[str]]


class DataToText(Task):
    model_class_name = "AutoModelForCausalLM"

    def __init__(self, config, spec):
        super().__init__(config, spec)  # resolved: decoding and scoring defaults filled by the recipe loader
        self.tokenizer = None
        self.eval_sets: dict[str, EvalSet] = {}

    # ---- data
    @cached_property
    def raw(self):
        import datasets

        c = self.config
        if c.get("data"):
            from lowrank_runner.tasks.local_files import load_files

            names = ("train", "validation", "test") if "test" in c["data"] else ("train", "validation")
            wanted = {c[k]: f"task.{k}" for k in ("source_column", "target_column") if c.get(k)}
            splits, where = load_files(c["data"], names, wanted, strings=None)
        else:
            default_id, default_config = NLG_HUB.get(self.spec.name, (None, None))
            dataset = c.get("dataset") or default_id
            if dataset is None:
                raise DataError(f"task '{self.spec.name}' reads your files: set task.data.train and task.data.validation")
            config = c.get("dataset_config") or (default_config if dataset == default_id else None)
            hub = self.load_hub(dataset, config, f"the data of task '{self.spec.name}'{f' ({config})' if config else ''}",
                                "without the hub, point task.data.train and task.data.validation "
                                "at files with a source and a target column")
            default_eval = next((s for s in ("validation", "dev") if s in hub), "validation")
            names = {"train": "train", "validation": c.get("eval_split") or default_eval}
            if c.get("test_split"):
                names["test"] = c["test_split"]
            missing = [s for s in names.values() if s not in hub]
            if missing:
                raise DataError(f"'{dataset}' has no {' or '.join(missing)} split (splits: {', '.join(hub)}); "
                                f"set task.{'test_split' if missing == [c.get('test_split')] else 'eval_split'} "
                                "to one of them")
            splits = datasets.DatasetDict({ours: hub[theirs] for ours, theirs in names.items()})
            where = {ours: f"{dataset} [{theirs}]" for ours, theirs in names.items()}
        out = {}
        for split, ds in splits.items():  # the test split as test__test (Task.test_splits)
            out[TEST_PREFIX + split if split == "test" else split] = self._pairs(ds, where[split])
        return self.limit_samples(datasets.DatasetDict(out), ("validation", *self.test_splits()))

    def _column(self, ds, key: str, candidates: tuple[str, ...], where: str) -> str:
        declared = self.config.get(key)
        if declared:
            if declared not in ds.column_names:
                raise DataError(f"{where}: no column '{declared}' (columns: {', '.join(ds.column_names)}); set task.{key}")
            return declared
        found = next((c for c in candidates if c in ds.column_names), None)
        if found is None:
            raise DataError(f"{where}: none of the columns {', '.join(candidates)} (columns: {', '.join(ds.column_names)}); "
                            f"set task.{key}")
        return found

    def _pairs(self, ds, where: str | Rows):
        """Columns ``source`` (linearised) and ``target``: one row per reference text;
        ``references`` keeps the dataset's own multi-reference column where it has one.
        ``where``: the hub split's name, or the checked rows of a file (errors name lines)."""
        shown = where.shown if isinstance(where, Rows) else where
        source = self._column(ds, "source_column", SOURCE_COLUMNS, shown)
        target = self._column(ds, "target_column", TARGET_COLUMNS, shown)
        extra = REFERENCES_COLUMN if REFERENCES_COLUMN in ds.column_names and REFERENCES_COLUMN != target else None
        lower = self.spec.name == "dart"

        def explode(batch, indices):
            out = {"source": [], "target": [], "references": []}
            for n, i in enumerate(indices):
                try:
                    src = linearise(batch[source][n], lower)
                except ValueError as exc:
                    raise _RowError(i, str(exc)) from None
                refs = target_texts(batch[extra][n]) if extra else []
                for text in target_texts(batch[target][n]):
                    out["source"].append(src)
                    out["target"].append(text)
                    out["references"].append(refs)
            return out

        def at(i: int, column: str) -> str:
            return where.where(i, column) if isinstance(where, Rows) else f"{where}: row {i + 1}, column '{column}'"

        import datasets

        features = datasets.Features({"source": datasets.Value("string"), "target": datasets.Value("string"),
                                      "references": datasets.Sequence(datasets.Value("string"))})
        try:
            pairs = ds.map(explode, batched=True, with_indices=True, remove_columns=ds.column_names,
                           features=features, desc="linearising")
        except _RowError as exc:
            raise DataError(f"{at(exc.index, source)}: {exc.message}") from None
        if len(pairs) == 0:
            raise DataError(f"{shown}: no (source, target) pairs in column '{source}' / '{target}'")
        if isinstance(where, Rows):  # your files: say which rows have no reference text
            empty = [i for i, v in enumerate(ds[target]) if not target_texts(v)]
            if empty:
                warn(f"{at(empty[0], target)}: no reference text ({len(empty)} row{'s' if len(empty) > 1 else ''} "
                     f"of {len(ds)}); these rows give no pairs")
        return pairs

    def load_splits(self):
        return self.raw

    def test_splits(self) -> dict[str, str]:
        """``task.test_split`` (hub) or ``task.data.test`` (files): scored once, after
        training, with the selected checkpoint; its metrics unsuffixed (metrics.json "test")."""
        c = self.config
        wanted = ("test" in c["data"]) if c.get("data") else bool(c.get("test_split"))
        return {TEST_PREFIX + "test": ""} if wanted else {}

    def count_train_examples(self) -> int:
        """Training pairs: from the default hub data, LoRA's count (no download)."""
        known = self.spec.rules.hub_train_size(self.spec.name, self.config)
        return len(self.raw["train"]) if known is None else known

    # ---- tokens
    def _ids(self, tokenizer):
        sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if sep is None or tokenizer.eos_token_id is None:
            raise DataError("data-to-text needs a tokenizer with an eos token (and a bos token or the eos as separator)")
        return sep, tokenizer.eos_token_id

    def tokenize(self, splits, tokenizer):
        import datasets

        self.tokenizer = tokenizer
        sep, eos = self._ids(tokenizer)
        args = {"tokenizer": tokenizer, "sep": sep, "eos": eos, "max_length": self.config["max_length"]}
        out = {}
        for split, ds in splits.items():
            out[split] = tokenizing_map(ds, encode_pairs, tokenizer, self.config, batched=True,
                                        remove_columns=ds.column_names, fn_kwargs=args, desc=f"tokenising {split}")
            if split != "train":
                sources, refs = group_references(ds["source"], ds["target"], ds["references"])
                prompts = encode_sources(tokenizer, sources, sep, self.config["max_length"] // 2 - 1)
                self.eval_sets[split] = EvalSet(sources, prompts, refs)
        return datasets.DatasetDict(out)

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        """Pads each batch to its longest sequence: input ids with the pad token, labels with -100."""
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, pad_to_multiple_of=pad_to_multiple_of)

    # ---- training and scoring
    def model_inputs(self, batch) -> dict:
        """Without labels: :meth:`loss` computes the only loss of the step (the model's own
        would be a second full-vocabulary cross-entropy)."""
        return {k: v for k, v in batch.items() if k != "labels"}

    def loss_items(self, batch) -> int:
        """The target tokens of ``batch``: the loss is a token mean over the optimizer step."""
        return shifted_label_count(batch["labels"], IGNORE)

    def loss(self, outputs, batch, num_items: int | None = None):
        """Cross-entropy on the target tokens, label-smoothed by ``task.label_smoothing``
        over the vocabulary ((1-ε)·NLL + ε·mean over the vocabulary of −log p, LoRA's
        definition and PyTorch's); with ``num_items`` summed and divided by it (the
        step's target tokens: :meth:`Task.loss`); without smoothing, the value the model's
        own loss has."""
        smoothing = self.config.get("label_smoothing") or 0.0
        return shifted_token_loss(outputs.logits, batch["labels"], num_items, IGNORE, smoothing)

    def evaluate(self, model, dataloader, accelerator, split: str) -> dict[str, float]:
        from lowrank_runner.tasks.generation import evaluate_generation

        return evaluate_generation(self, model, dataloader, accelerator, split)
