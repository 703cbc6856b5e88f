"""Instruction tuning (task ``chat``) of a causal language model on conversations.

* Data: your files (``task.data``: JSON Lines, JSON or Parquet) or a hub dataset
  (``task.dataset``, splits ``task.train_split`` / ``task.eval_split``), in one of the
  shapes of :mod:`lowrank_runner.tasks.chat_data` (OpenAI ``messages``, ShareGPT
  ``conversations``, Alpaca ``instruction``/``input``/``output``), told apart by their
  columns or named by ``task.format``. Every row is checked; a bad one is named with its
  file and line (hub data: its split and row).
* Formatting: the tokenizer's chat template (``apply_chat_template``), or
  ``task.chat_template`` (a shipped template's name, or a Jinja file), which replaces it.
* Loss on the assistant turns only, every one of them: the conversation is rendered
  once, and each assistant turn's characters are the text between the conversation up
  to that turn rendered with ``add_generation_prompt`` and the conversation through
  that turn (``prefix-render``, which works for any template whose earlier turns render
  the same when later ones follow); the tokens that overlap them keep their ids as
  labels, all others get -100. A conversation whose template renders
  earlier turns differently once later ones follow (e.g. one that drops reasoning from
  past turns) becomes one sequence per assistant turn, with the loss on that turn.
  Sequences are cut at ``task.max_length`` (training sequences left with no assistant
  token are dropped).
* Packing (``task.packing``): training sequences are concatenated in order into blocks
  of at most ``task.max_length`` tokens, with ``position_ids`` restarting at 0 for each
  sequence and no attention mask, from which transformers builds a block-diagonal
  causal mask (``masking_utils.find_packed_sequence_indices``; ``use_cache=False``): no token attends to
  another sequence of its block, and the first token of each sequence is never a label.
* Evaluation: the loss and perplexity over the assistant tokens of the evaluation split
  (summed per sequence, gathered across processes), and ``task.samples`` generations
  (the first conversations of the split, prompted with everything before their last
  assistant turn; ``task.generation``'s decoding) written with the selected checkpoint
  as ``outputs_<split>.jsonl`` rows ``{prompt, reference, generation}``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from lowrank_runner.errors import DataError, warn
from lowrank_runner.tasks.base import IGNORE, Task, tokenizing_map
from lowrank_runner.tasks.chat_data import (PROBE, RowProblem, TemplateLimit, checked_output, detect_shape, render_limit,
                                            template_file, to_messages)
from lowrank_runner.tasks.data_check import Rows

HUB_ROWS = {("HuggingFaceH4/ultrachat_200k", "train_sft"): 207_865, ("yahma/alpaca-cleaned", "train"): 51_760}
CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]  # in datasets' fingerprint of the tokenising
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")  # generation also stops at these tokens


class _RowError(Exception):
    """A row that cannot be used (raised inside ``datasets.map``, named by the caller)."""

    def __init__(self, index: int, column: str, message: str):
        super().__init__(index, column, message)
        self.index, self.column, self.message = index, column, message


# ---- rendering and labels (module-level functions: datasets fingerprints them)

def render(tokenizer, messages: list[dict], template: str | None, generation_prompt: bool) -> str:
    """The conversation as the chat template writes it, bounded in time and length
    (:func:`~lowrank_runner.tasks.chat_data.render_limit`: :class:`TemplateLimit` beyond)."""
    with render_limit():
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    return checked_output(text)


def assistant_turn(tokenizer, messages: list[dict], i: int, template: str | None) -> tuple[str, int]:
    """The conversation through assistant turn ``i`` rendered, and where that turn's text
    starts in it (the end of the conversation before it, rendered with the generation prompt)."""
    before = render(tokenizer, messages[:i], template, True)
    through = render(tokenizer, messages[: i + 1], template, False)
    if not through.startswith(before) or len(through) == len(before):
        raise ValueError("the chat template does not render an assistant turn after the generation prompt "
                         "(add_generation_prompt) of the conversation before it; use a template that does "
                         "(task.chat_template)")
    return through, len(before)


def rendered_sequences(tokenizer, messages: list[dict], template: str | None) -> list[tuple[str, list[tuple]]]:
    """The texts to train on and, per text, the character spans of its assistant turns:
    the whole conversation with every assistant turn, or (a template that renders earlier
    turns differently once later ones follow) one text per assistant turn."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    parts = [assistant_turn(tokenizer, messages, i, template) for i in turns]
    whole = render(tokenizer, messages, template, False)
    if all(whole.startswith(text) for text, _ in parts):
        return [(whole, [(start, len(text)) for text, start in parts])]
    return [(text, [(start, len(text))]) for text, start in parts]


def tokens_with_labels(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (no special tokens added: the template writes them) and labels:
    the id where the token overlaps an assistant span (a byte-level BPE token may start
    with the generation prompt's last space, e.g. "Ġi"), else -100."""
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        inside = [any(end > s and start < e for s, e in spans) for start, end in enc["offset_mapping"]]
    else:  # no offsets: tokenise the pieces between span boundaries one by one
        cuts = sorted({0, len(text), *(b for span in spans for b in span)})
        ids, inside = [], []
        for a, b in zip(cuts, cuts[1:]):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            inside += [any(s <= a < e for s, e in spans)] * len(piece)
    labels = [t if keep else IGNORE for t, keep in zip(ids, inside)]
    if labels:
        labels[0] = IGNORE  # never predicted (and, packed, it would be predicted from another sequence)
    return ids, labels


def encode_conversations(batch, indices, tokenizer, template, max_length: int, code: str = "") -> dict:
    """Tokens and assistant-only labels of each conversation, cut at ``max_length``
    (``code``: this module's hash, so that datasets' cache of an older labelling is not reused)."""
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for messages, index in zip(batch["messages"], indices):
        try:
            sequences = rendered_sequences(tokenizer, messages, template)
        except TemplateLimit as exc:  # the template's loops, not the row: said at the template
            raise _TemplateBeyondLimits(index, str(exc)) from None
        except Exception as exc:  # the template refuses the conversation (raise_exception, a missing key, ...)
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise _RowError(index, "messages", f"the chat template cannot render it ({message})") from None
        for text, spans in sequences:
            ids, labels = tokens_with_labels(tokenizer, text, spans)
            out["input_ids"].append(ids[:max_length])
            out["attention_mask"].append([1] * len(ids[:max_length]))
            out["labels"].append(labels[:max_length])
    return out


def pack(input_ids: list[list[int]], labels: list[list[int]], max_length: int) -> dict:
    """Sequences concatenated in order into blocks of at most ``max_length`` tokens, with
    ``position_ids`` restarting at 0 per sequence (a sequence never straddles two blocks)."""
    blocks = {"input_ids": [], "labels": [], "position_ids": []}
    current = {k: [] for k in blocks}
    for ids, labs in zip(input_ids, labels):
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            for k in blocks:
                blocks[k].append(current[k])
            current = {k: [] for k in blocks}
        current["input_ids"] += ids
        current["labels"] += [IGNORE] + list(labs[1:])
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        for k in blocks:
            blocks[k].append(current[k])
    return blocks


def assistant_nll(logits, labels):
    """Per sequence: the summed negative log-likelihood of its assistant tokens and their
    count (the cross-entropy only where there are labels: vocabularies are large)."""
    import torch

    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    picked = torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask], reduction="none")
    nll = torch.zeros(labels.shape[0], device=logits.device).index_add_(0, mask.nonzero()[:, 0], picked)
    return nll, mask.sum(dim=1)


class _TemplateBeyondLimits(Exception):
    def __init__(self, index: int, message: str):
        super().__init__(index, message)
        self.index, self.message = index, message


class ChatCollator:
    """Right-pads a batch: input ids with the pad token, labels with -100, the attention
    mask and (packed blocks) the position ids with 0."""

    PAD = {"labels": IGNORE, "attention_mask": 0, "position_ids": 0}

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id, self.multiple = pad_token_id, pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        keys = [k for k in ("input_ids", "attention_mask", "labels", "position_ids") if k in features[0]]
        return {k: torch.tensor([list(f[k]) + [self.PAD.get(k, self.pad_token_id)] * (width - len(f[k]))
                                 for f in features], dtype=torch.long) for k in keys}


@dataclass
class Samples:
    """The conversations of an evaluation split that are continued at every evaluation."""

    prompts: list[str]  # rendered, ending with the generation prompt
    prompt_ids: list[list[int]]
    references: list[str]  # the last assistant turn


class Chat(Task):
    model_class_name = "AutoModelForCausalLM"

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.tokenizer = None
        self.where: dict[str, Rows | str] = {}  # per split: its file's rows, or the hub split's name
        self.samples: dict[str, Samples] = {}

    # ---- data
    @cached_property
    def raw(self):
        """Every split as one ``messages`` column of checked ``[{role, content}]`` lists."""
        import datasets

        c = self.config
        if c.get("data"):  # your files, instead of task.dataset
            from lowrank_runner.tasks.local_files import load_files

            splits, self.where = load_files(c["data"], ("train", "validation"), {}, strings=None)
        elif c.get("dataset"):  # cut before reading: hub datasets are large (your files are checked whole)
            splits = self.limit_samples(datasets.DatasetDict(self._hub_splits(c["dataset"])))
        else:
            raise DataError("task 'chat' needs data: set task.data.train and task.data.validation (JSON Lines, JSON "
                            "or Parquet files) or task.dataset (a hub dataset id)")
        out = {split: self._messages(ds, split) for split, ds in splits.items()}
        return self.limit_samples(datasets.DatasetDict(out))

    def _hub_splits(self, dataset: str) -> dict:
        c = self.config
        hub = self.load_hub(dataset, c.get("dataset_config"), "the data of task 'chat'",
                            "without the hub, point task.data.train and task.data.validation at JSON Lines or "
                            "Parquet files of conversations")
        default_eval = next((s for s in ("validation", "test") if s in hub), "validation")
        names = {"train": c.get("train_split") or "train", "validation": c.get("eval_split") or default_eval}
        for ours, theirs in names.items():
            if theirs not in hub:
                key = "train_split" if ours == "train" else "eval_split"
                raise DataError(f"'{dataset}' has no {theirs} split (splits: {', '.join(hub)}); set task.{key} "
                                "to one of them")
        self.where = {ours: f"{dataset} [{theirs}]" for ours, theirs in names.items()}
        return {ours: hub[theirs] for ours, theirs in names.items()}

    def _at(self, split: str, index: int, column: str) -> str:
        where = self.where.get(split)
        if isinstance(where, Rows):
            return where.where(index, column)
        return f"{where or split}: row {index + 1}, column '{column}'"

    def _messages(self, ds, split: str):
        """The split as checked ``messages``. A bad row of your files stops the run at its
        line; one of a hub dataset (which you cannot edit) is left out with a warning."""
        import datasets

        where = self.where[split]
        shown = where.shown if isinstance(where, Rows) else where
        try:
            shape = detect_shape(ds.column_names, self.config["format"], shown)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        skip = not isinstance(where, Rows)

        def convert(row, index):
            try:
                return {"messages": to_messages(row, shape)}
            except RowProblem as exc:
                if skip:
                    return {"messages": []}
                raise _RowError(index, exc.column, exc.message) from None

        turn = {"role": datasets.Value("string"), "content": datasets.Value("string")}
        features = datasets.Features({"messages": [turn]})
        try:
            out = ds.map(convert, with_indices=True, remove_columns=ds.column_names, features=features,
                         desc=f"reading {split} conversations")
        except _RowError as exc:
            raise DataError(f"{self._at(split, exc.index, exc.column)}: {exc.message}") from None
        kept = out.filter(len, input_columns="messages") if skip else out
        if len(kept) < len(out):
            first = next(i for i, m in enumerate(out["messages"]) if not m)
            try:
                to_messages(ds[first], shape)
            except RowProblem as exc:
                warn(f"{self._at(split, first, exc.column)}: {exc.message}; {len(out) - len(kept)} such row(s) of "
                     f"{len(out)} are left out")
        if not len(kept):
            raise DataError(f"{shown}: no usable conversation")
        return kept

    def load_splits(self):
        return self.raw

    def count_train_examples(self) -> int:
        """Training conversations (``lrr inspect``: a known hub split's size, no download;
        with ``task.packing`` the run plans on the packed blocks, fewer)."""
        c = self.config
        known = None if c.get("data") else HUB_ROWS.get((c.get("dataset"), c.get("train_split") or "train"))
        if known is not None:
            return min(known, c.get("max_train_samples") or known)
        return len(self.raw["train"])

    # ---- tokens
    @cached_property
    def template(self) -> str | None:
        """``task.chat_template``'s Jinja text; None: the tokenizer's own."""
        value = self.config.get("chat_template")
        if value is None:
            return None
        path = template_file(value)
        if path is None:
            from lowrank_runner.tasks.chat_data import template_problem

            raise DataError(f"task.chat_template: {template_problem(value)}")
        return path.read_text(encoding="utf-8")

    def _check_template(self, tokenizer) -> None:
        if self.template is None and not getattr(tokenizer, "chat_template", None):
            from lowrank_runner.tasks.chat_data import named_templates

            raise DataError(f"the tokenizer of '{tokenizer.name_or_path}' has no chat template; set "
                            f"task.chat_template to a shipped one ({', '.join(named_templates())}) or to a Jinja "
                            "file")
        self._probe_template(tokenizer)

    def _template_name(self, tokenizer) -> str:
        value = self.config.get("chat_template")
        return (f"task.chat_template: the chat template '{value}'" if value is not None
                else f"the chat template of the tokenizer of '{tokenizer.name_or_path}'")

    def _probe_template(self, tokenizer) -> None:
        """Render a probe conversation once, so that a template that cannot render any
        (a Jinja error, a special token the tokenizer lacks, no assistant turn after the
        generation prompt, beyond the bounds) is named, not a data row."""
        value, name = self.config.get("chat_template"), self._template_name(tokenizer)
        try:
            render(tokenizer, PROBE, self.template, False)
            render(tokenizer, PROBE[:1], self.template, True)
        except TemplateLimit as exc:
            raise DataError(f"{name}: {exc}; fix the template or set task.chat_template to another one") from None
        except Exception as exc:  # jinja2's TemplateError, a TypeError from None + str, ...
            text = self.template if self.template is not None else str(tokenizer.chat_template)
            missing = [t for t in ("bos_token", "eos_token", "pad_token", "unk_token")
                       if t in text and getattr(tokenizer, t, None) is None]
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            cause = f"the tokenizer has no {missing[0]}" if missing else first
            line = getattr(exc, "lineno", None)
            where = f" (line {line})" if line and value is not None else ""
            fix = (f"give the tokenizer a {missing[0]} or use another template" if missing
                   else "fix the template or set task.chat_template to another one")
            raise DataError(f"{name} cannot render a conversation{where}: {cause}; {fix}") from None
        try:
            rendered_sequences(tokenizer, PROBE, self.template)
        except ValueError as exc:  # it writes no assistant turn where the generation prompt ends
            raise DataError(f"{name}: {exc}") from None

    def tokenize(self, splits, tokenizer):
        import datasets

        self._check_template(tokenizer)
        self.tokenizer = tokenizer
        c, out = self.config, {}
        args = {"tokenizer": tokenizer, "template": self.template, "max_length": c["max_length"], "code": CODE}
        for split, ds in splits.items():
            try:
                encoded = tokenizing_map(ds, encode_conversations, tokenizer, c, batched=True, with_indices=True,
                                         remove_columns=ds.column_names, fn_kwargs=args, desc=f"tokenising {split}")
            except _RowError as exc:
                at = self._at(split, exc.index, exc.column) if split in self.where and not c.get("holdout_fraction") \
                    else f"{split} conversation {exc.index + 1}"
                raise DataError(f"{at}: {exc.message}") from None
            except _TemplateBeyondLimits as exc:
                raise DataError(f"{self._template_name(tokenizer)}, at {split} conversation {exc.index + 1}: "
                                f"{exc.message}; fix the template") from None
            if len(encoded) > len(ds):
                warn(f"{split}: the chat template renders earlier turns differently once later turns follow; "
                     f"{len(encoded) - len(ds)} extra sequences: one per assistant turn of those conversations")
            out[split] = self._train_sequences(encoded) if split == "train" else self._eval_sequences(split, encoded)
            if split != "train":
                self.samples[split] = self._samples(ds)
        return datasets.DatasetDict(out)

    def _train_sequences(self, encoded):
        """Training sequences with an assistant token left after the cut, packed if asked."""
        import datasets

        kept = encoded.filter(lambda labels: any(t != IGNORE for t in labels[1:]), input_columns="labels")
        if len(kept) < len(encoded):
            dropped = len(encoded) - len(kept)
            warn(f"train: {dropped} sequence{'s' if dropped > 1 else ''} of {len(encoded)} keep no assistant token "
                 f"within task.max_length {self.config['max_length']} and are left out; raise task.max_length")
        if not len(kept):
            raise DataError(f"train: no sequence keeps an assistant token within task.max_length "
                            f"{self.config['max_length']}; raise task.max_length")
        if not self.config["packing"]:
            return kept
        return datasets.Dataset.from_dict(pack(kept["input_ids"], kept["labels"], self.config["max_length"]))

    def _eval_sequences(self, split: str, encoded):
        """An evaluation split, checked before training: it must keep an assistant token
        after the cut (else its loss would be 0 and its perplexity 1); the sequences
        that keep none are counted in a warning (they add nothing to the loss)."""
        empty = sum(not any(t != IGNORE for t in labels[1:]) for labels in encoded["labels"])
        cut = f"within task.max_length {self.config['max_length']}"
        if empty == len(encoded):
            raise DataError(f"{split}: no sequence keeps an assistant token {cut}, so there is no loss to evaluate; "
                            "raise task.max_length")
        if empty:
            warn(f"{split}: {empty} sequence{'s' if empty > 1 else ''} of {len(encoded)} keep no assistant token {cut} "
                 "and add nothing to its loss; raise task.max_length")
        return encoded

    def _samples(self, ds) -> Samples:
        """The first ``task.samples`` conversations, cut before their last assistant turn;
        a prompt keeps its last ``max_length // 2`` tokens (the generation fits the positions)."""
        rows = ds.select(range(min(self.config["samples"], len(ds))))["messages"]
        keep = self.config["max_length"] // 2
        prompts, ids, refs = [], [], []
        for messages in rows:
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompts.append(render(self.tokenizer, messages[:last], self.template, True))
            ids.append(self.tokenizer(prompts[-1], add_special_tokens=False)["input_ids"][-keep:])
            refs.append(messages[last]["content"])
        return Samples(prompts, ids, refs)

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        return ChatCollator(tokenizer.pad_token_id, pad_to_multiple_of)

    # ---- training and scoring
    def model_inputs(self, batch) -> dict:
        """Without labels (:meth:`loss` computes the only loss of the step; the model's own
        would be a second full-vocabulary cross-entropy). Packed blocks go without
        attention mask and without a key/value cache: transformers then masks each
        sequence of a block off from the others by its restarting ``position_ids`` (it
        reads them only when both are absent)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if "position_ids" in batch:
            return {**{k: v for k, v in inputs.items() if k != "attention_mask"}, "use_cache": False}
        return inputs

    def loss_items(self, batch) -> int:
        """The assistant tokens of ``batch``: the loss is a token mean over the optimizer step."""
        from lowrank_runner.tasks.base import shifted_label_count

        return shifted_label_count(batch["labels"], IGNORE)

    def loss(self, outputs, batch, num_items: int | None = None):
        """The cross-entropy on the assistant tokens: their mean, or with ``num_items`` (the
        step's assistant tokens, :meth:`Task.loss`) their sum divided by it."""
        from lowrank_runner.tasks.base import shifted_token_loss

        return shifted_token_loss(outputs.logits, batch["labels"], num_items, IGNORE)

    def stop_token_ids(self) -> list[int]:
        """The tokenizer's eos and the end-of-turn tokens of common templates it has."""
        tok = self.tokenizer
        ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        vocab = tok.get_vocab()
        ids += [vocab[t] for t in END_OF_TURN if t in vocab and vocab[t] not in ids]
        return ids

    def evaluate(self, model, dataloader, accelerator, split: str) -> dict[str, float]:
        """Loss and perplexity over the split's assistant tokens; the samples' generations
        (``self.latest_outputs``, saved with the selected checkpoint)."""
        import torch

        from lowrank_runner.tasks.generation import generate

        model.eval()
        sums, count = [], 0
        with torch.no_grad():
            for batch in dataloader:
                inputs = self.model_inputs(batch)
                nll, n = accelerator.gather_for_metrics(assistant_nll(model(**inputs).logits, batch["labels"]))
                sums += nll.tolist()  # added exactly below: the batches' order (longest first) does not matter
                count += int(n.sum())
        total = math.fsum(sums)
        chosen = self.samples.get(split)
        if chosen is not None and chosen.prompts:
            outputs = generate(model, chosen.prompt_ids, self.tokenizer, self.config["generation"], accelerator,
                               eos_token_id=self.stop_token_ids())
            self.latest_outputs[split] = [{"prompt": p, "reference": r, "generation": g}
                                          for p, r, g in zip(chosen.prompts, chosen.references, outputs)]
        model.train()
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
