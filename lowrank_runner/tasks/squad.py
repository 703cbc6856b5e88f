"""SQuAD 2.0: extractive question answering with unanswerable questions.

Data comes from ``datasets.load_dataset(task.dataset)`` (default ``rajpurkar/squad_v2``)
or, with ``task.data_dir``, from the official JSON files ``train-v2.0.json`` and
``dev-v2.0.json`` (``data`` → ``paragraphs`` → ``qas``, with ``is_impossible``), mapped to
the hub's features (``id``, ``title``, ``context``, ``question``, ``answers`` with ``text``
and ``answer_start``; an unanswerable question has no answers), so one task definition
serves both.

Long contexts are split into overlapping windows (``task.doc_stride``); training and
evaluation run on these features, so a run plans its steps on the number of features.
Evaluation maps the start/end logits back to answer text (``squad_spans``) and scores it
with the official SQuAD 2.0 exact match and F1 (``squad_metrics``).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from lowrank_runner.errors import BackboneError, DataError
from lowrank_runner.tasks.base import Task, tokenizing_map
from lowrank_runner.tasks.data_check import decode_text, readable_file
from lowrank_runner.tasks.rules import SQUAD_DATASET
from lowrank_runner.tasks.squad_metrics import best_threshold_scores, squad_v2_scores
from lowrank_runner.tasks.squad_spans import answer_token_span, best_span, context_offsets, predict

FILES = {"train": "train-v2.0.json", "validation": "dev-v2.0.json"}  # the official file names
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions")


def hub_features():
    import datasets

    text = datasets.Value("string")
    return datasets.Features({
        "id": text, "title": text, "context": text, "question": text,
        "answers": {"text": datasets.List(text), "answer_start": datasets.List(datasets.Value("int32"))},
    })


def read_squad_json(path: Path) -> dict[str, list]:
    """One official SQuAD 2.0 JSON file as columns named like the hub's features."""
    if not path.exists():
        raise DataError(f"{path}: SQuAD file not found (task.data_dir should hold {', '.join(FILES.values())})")
    readable_file(path, str(path), f"task.data_dir ({path.name})")
    try:
        text = decode_text(path.read_bytes(), str(path))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    out: dict[str, list] = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: expected the SQuAD 2.0 layout {{\"version\": ..., \"data\": [articles]}}")
    seen: dict[str, str] = {}
    for a, article in enumerate(doc["data"]):
        where = f"{path}: data[{a}]"
        paragraphs = _field(article, "paragraphs", list, where)
        title = _field(article, "title", str, where) if "title" in article else ""
        for p, paragraph in enumerate(paragraphs):
            at = f"{where}.paragraphs[{p}]"
            context = _field(paragraph, "context", str, at)
            for q, qa in enumerate(_field(paragraph, "qas", list, at)):
                at_q = f"{at}.qas[{q}]"
                qid = _field(qa, "id", str, at_q)
                if qid in seen:
                    raise DataError(f"{at_q}: question id {qid!r} again (first at {seen[qid]}); every question needs "
                                    "its own id (answers are scored by id)")
                seen[qid] = at_q
                at_q += f" (id {qid})"
                question = _field(qa, "question", str, at_q)
                impossible = _field(qa, "is_impossible", bool, at_q) if "is_impossible" in qa else False
                answers = [] if impossible else _field(qa, "answers", list, at_q)
                if not impossible and not answers:
                    raise DataError(f"{at_q}: an answerable question (is_impossible false) has no answers")
                texts, starts = [], []
                for n, answer in enumerate(answers):
                    text = _field(answer, "text", str, f"{at_q}.answers[{n}]")
                    start = _field(answer, "answer_start", int, f"{at_q}.answers[{n}]")
                    if not 0 <= start <= len(context) - len(text):
                        raise DataError(f"{at_q}.answers[{n}]: answer_start {start} is outside the context "
                                        f"({len(context)} characters)")
                    texts.append(text)
                    starts.append(start)
                out["id"].append(qid)
                out["title"].append(title)
                out["context"].append(context)
                out["question"].append(question)
                out["answers"].append({"text": texts, "answer_start": starts})
    if not out["id"]:
        raise DataError(f"{path}: no questions")
    return out


def _field(node, key: str, kind: type, where: str):
    if not isinstance(node, dict) or key not in node:
        raise DataError(f"{where}: missing '{key}' (not the SQuAD 2.0 layout)")
    value = node[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise DataError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


class QACollator:
    """Pads the model inputs of a batch on the right (span labels are token positions,
    so padding must not shift tokens) and leaves the evaluation bookkeeping out."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        self.tokenizer, self.pad_to_multiple_of = tokenizer, pad_to_multiple_of

    def __call__(self, features: list[dict]):
        inputs = [{k: f[k] for k in MODEL_INPUTS if k in f} for f in features]
        return self.tokenizer.pad(inputs, padding=True, pad_to_multiple_of=self.pad_to_multiple_of,
                                  return_tensors="pt", padding_side="right")


class SquadV2(Task):
    model_class_name = "AutoModelForQuestionAnswering"

    def __init__(self, config: dict, spec):
        super().__init__(config, spec)
        self._eval_data: dict[str, tuple] = {}  # split -> (examples, features), set by tokenize
        self._layouts: dict[str, tuple] = {}  # split -> feature_layout(), computed at the first evaluation

    @property
    def dataset(self) -> str:
        return self.config.get("dataset") or SQUAD_DATASET

    def data_files(self) -> dict:
        """With ``task.data_dir``: the official JSON files in it."""
        if not self.config.get("data_dir"):
            return {}
        return {split: Path(self.config["data_dir"]) / name for split, name in FILES.items()}

    @cached_property
    def raw(self):
        import datasets

        c = self.config
        if c.get("data_dir"):
            root = Path(c["data_dir"])
            if not root.is_dir():
                raise DataError(f"task.data_dir: {root} does not exist (expected a directory holding "
                                f"{' and '.join(FILES.values())})")
            splits = datasets.DatasetDict({split: datasets.Dataset.from_dict(read_squad_json(path), features=hub_features())
                                           for split, path in self.data_files().items()})
        else:
            hub = self.load_hub(self.dataset, None, "SQuAD 2.0", "without the hub, point task.data_dir at a "
                                f"directory holding the official {' and '.join(FILES.values())}")
            splits = datasets.DatasetDict({s: hub[s] for s in ("train", "validation")})
            splits = splits.select_columns(list(hub_features()))
        return self.limit_samples(splits)

    def load_splits(self):
        return self.raw

    def count_train_examples(self) -> int:
        """Training questions: from local files, or the official count for the default hub
        dataset (no download). Training runs on features, one or more per question (a
        long context gives several windows), so `lrr run` plans slightly more steps."""
        known = self.spec.rules.hub_train_size(self.spec.name, self.config)
        return len(self.raw["train"]) if known is None else known

    # ---- features
    def tokenize(self, splits, tokenizer):
        import datasets

        if not getattr(tokenizer, "is_fast", False):
            raise BackboneError(f"the tokenizer {type(tokenizer).__name__} gives no character offsets (not a fast "
                                "tokenizer); SQuAD needs them to map answers to tokens: use a backbone with a "
                                "tokenizer.json or set backbone.tokenizer")
        c = self.config
        max_length, stride = c["max_length"], c["doc_stride"]
        cls_id = tokenizer.cls_token_id

        specials = tokenizer.num_special_tokens_to_add(pair=True)

        def encode(batch, indices, training: bool, split: str):
            questions = [q.lstrip() for q in batch["question"]]
            for qid, ids in zip(batch["id"], tokenizer(questions, add_special_tokens=False)["input_ids"]):
                room = max_length - specials - len(ids)  # context tokens per window
                if room <= stride:  # the tokenizer would abort: windows could not move on
                    raise DataError(
                        f"{split} question {qid}: {len(ids)} tokens leave {room} context tokens per window "
                        f"(task.max_length {max_length}), not more than task.doc_stride {stride}; raise max_length "
                        "or lower doc_stride")
            enc = tokenizer(questions, batch["context"], truncation="only_second", max_length=max_length,
                            stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
            out = {k: enc[k] for k in enc.keys() if k in MODEL_INPUTS}
            out["start_positions"], out["end_positions"] = [], []
            if not training:
                out["example_index"], out["offset_start"], out["offset_end"], out["cls_index"] = [], [], [], []
            for i, row in enumerate(enc["overflow_to_sample_mapping"]):
                ids = enc["input_ids"][i]
                cls = ids.index(cls_id) if cls_id in ids else 0
                offsets = context_offsets(enc["offset_mapping"][i], enc.sequence_ids(i))
                answers = batch["answers"][row]
                span = None
                if answers["text"]:
                    start_char = answers["answer_start"][0]
                    span = answer_token_span(offsets, start_char, start_char + len(answers["text"][0]))
                out["start_positions"].append(span[0] if span else cls)
                out["end_positions"].append(span[1] if span else cls)
                if not training:
                    out["example_index"].append(indices[row])
                    out["offset_start"].append([o[0] for o in offsets])  # -1: not a context token
                    out["offset_end"].append([o[1] for o in offsets])
                    out["cls_index"].append(cls)
            return out

        features = {}
        for split, ds in splits.items():
            training = split == "train"
            features[split] = tokenizing_map(ds, encode, tokenizer, self.config, batched=True, with_indices=True,
                                             remove_columns=ds.column_names, fn_kwargs={"training": training, "split": split},
                                             desc=f"splitting {split} into features")
            if not training:
                self._eval_data[split] = (ds, features[split])
                self._layouts.pop(split, None)
        return datasets.DatasetDict(features)

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        return QACollator(tokenizer, pad_to_multiple_of)

    def model_config_kwargs(self):
        return {"num_labels": 2}  # the span head: a start and an end logit per token

    # ---- scoring
    def evaluate(self, model, dataloader, accelerator, split: str) -> dict[str, float]:
        """Official SQuAD 2.0 scores of the split's questions (their features' logits are
        gathered from every process and put back in the order of the features: the batches
        run longest first), and the mean span loss of the features, each over its own
        tokens (:func:`feature_span_losses`: the padding of its batch left out)."""
        import math

        import torch

        from lowrank_runner.tasks.evaluation import in_dataset_order

        examples, features = self._eval_data[split]
        model.eval()
        starts, ends, losses = [], [], []
        with torch.no_grad():
            for batch in dataloader:
                out = model(**batch)
                feature_losses = feature_span_losses(out.start_logits, out.end_logits, batch)
                # Batches on different processes can be padded to different lengths.
                s = accelerator.pad_across_processes(out.start_logits.float(), dim=1, pad_index=-1e4)
                e = accelerator.pad_across_processes(out.end_logits.float(), dim=1, pad_index=-1e4)
                s, e, feature_losses = accelerator.gather_for_metrics((s, e, feature_losses))
                starts.extend(s.cpu().numpy())
                ends.extend(e.cpu().numpy())
                losses += feature_losses.tolist()
        model.train()
        if len(starts) != len(features):
            raise RuntimeError(f"evaluation of {split} gathered {len(starts)} features, expected {len(features)}")
        starts, ends = in_dataset_order(starts, dataloader), in_dataset_order(ends, dataloader)
        metrics = self.score(examples, features, starts, ends, split)
        metrics["loss"] = math.fsum(losses) / max(len(losses), 1)  # every feature once, in any order
        return metrics

    def score(self, examples, features, start_logits, end_logits, split: str | None = None) -> dict[str, float]:
        """Official SQuAD 2.0 scores of per-feature logits (in the order of ``features``)."""
        c = self.config
        layout = self._layouts.get(split) if split else None
        if layout is None:
            layout = feature_layout(len(examples), features)
            if split:
                self._layouts[split] = layout
        grouped, offsets, cls_index = layout
        contexts, ids, answers = examples["context"], examples["id"], examples["answers"]
        predictions, candidates, margins, references, rows = {}, {}, {}, {}, []
        for e, feature_ids in enumerate(grouped):
            choice = best_span(contexts[e], [
                {"start_logits": start_logits[f], "end_logits": end_logits[f], "offsets": offsets[f],
                 "cls_index": cls_index[f]} for f in feature_ids
            ], c["n_best"], c["max_answer_length"])
            qid = ids[e]
            predictions[qid] = predict(choice, c["null_score_threshold"])
            candidates[qid], margins[qid] = choice.text, choice.no_answer_margin
            references[qid] = answers[e]["text"]
            rows.append({"id": qid, "prediction": predictions[qid], "best_span": choice.text,
                         "null_score_diff": choice.no_answer_margin})
        if split:
            self.latest_outputs[split] = rows
        return {**squad_v2_scores(predictions, references), **best_threshold_scores(candidates, margins, references)}


def feature_span_losses(start_logits, end_logits, batch):
    """Per feature: the span loss of a question-answering model, the mean of the start
    and end positions' cross-entropies (transformers' definition), over the feature's own
    tokens. The model's own loss also spreads probability over its batch's padding (the
    span head scores every position), so it would depend on which features share a batch."""
    import torch

    mask = batch.get("attention_mask")
    start_logits, end_logits = start_logits.float(), end_logits.float()
    if mask is not None:
        start_logits = start_logits.masked_fill(mask == 0, float("-inf"))
        end_logits = end_logits.masked_fill(mask == 0, float("-inf"))
    cross_entropy = torch.nn.functional.cross_entropy
    return (cross_entropy(start_logits, batch["start_positions"], reduction="none")
            + cross_entropy(end_logits, batch["end_positions"], reduction="none")) / 2


def feature_layout(n_examples: int, features) -> tuple[list[list[int]], list, list[int]]:
    """(features of each example, per-feature context offsets as tuples, [CLS] positions)."""
    grouped = [[] for _ in range(n_examples)]
    for f, example in enumerate(features["example_index"]):
        grouped[example].append(f)
    offsets = [list(zip(s, e)) for s, e in zip(features["offset_start"], features["offset_end"])]
    return grouped, offsets, list(features["cls_index"])
