"""Extractive QA on long contexts: question + context windows (features) for the model,
and the model's start/end logits back to answer text.

Features: the question, then a window of the context; a context longer than the
sequence budget is split into several overlapping windows (``doc_stride`` tokens shared
by consecutive windows). A training feature's label is the answer's first and last
token when the whole answer lies inside its window, else the [CLS] position (no answer
in this window), as for an unanswerable question.

Post-processing, per question over all of its features: the ``n_best`` highest start and
end logits of each feature are paired into spans inside the context, start ≤ end, at most
``max_answer_length`` tokens; the best span (start + end logit) is mapped back to
context characters through the tokenizer's offsets. The no-answer score is the smallest
start[CLS] + end[CLS] over the question's features; the prediction is "" when it exceeds
the best span's score by more than the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_OFFSET = (-1, -1)  # a token outside the context (question, special tokens)


def context_offsets(offsets, sequence_ids, context_index: int = 1) -> list[tuple[int, int]]:
    """Character offsets of the context tokens; ``NO_OFFSET`` for every other token."""
    return [tuple(o) if s == context_index else NO_OFFSET for o, s in zip(offsets, sequence_ids)]


def answer_token_span(offsets: list[tuple[int, int]], start_char: int, end_char: int) -> tuple[int, int] | None:
    """First and last token of the answer ``[start_char, end_char)`` in a window whose
    context tokens have ``offsets`` (others ``NO_OFFSET``); None when the answer is not
    wholly inside the window."""
    inside = [i for i, o in enumerate(offsets) if o != NO_OFFSET]
    if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
        return None
    first = max(i for i in inside if offsets[i][0] <= start_char)
    last = min(i for i in inside if offsets[i][1] >= end_char)
    return (first, last) if first <= last else None


@dataclass
class SpanChoice:
    text: str  # best non-null answer ("" when no valid span exists)
    score: float  # its start + end logit (-inf when none)
    null_score: float  # min over features of start[CLS] + end[CLS]

    @property
    def no_answer_margin(self) -> float:
        """How much the no-answer score beats the best span (the threshold applies to it)."""
        return self.null_score - self.score


def best_span(context: str, features: list[dict], n_best: int, max_answer_length: int) -> SpanChoice:
    """The best answer span of one question over its features; each feature is a dict
    with ``start_logits``, ``end_logits`` (1-D arrays, at least as long as the feature),
    ``offsets`` (per token, ``NO_OFFSET`` outside the context) and ``cls_index``."""
    best_text, best_score, null_score = "", -np.inf, np.inf
    for feature in features:
        start, end, offsets = feature["start_logits"], feature["end_logits"], feature["offsets"]
        n = len(offsets)
        start, end = np.asarray(start[:n], dtype=np.float64), np.asarray(end[:n], dtype=np.float64)
        cls = feature["cls_index"]
        null_score = min(null_score, float(start[cls] + end[cls]))
        starts = np.argsort(start)[::-1][:n_best]
        ends = np.argsort(end)[::-1][:n_best]
        for s in starts:
            if offsets[s] == NO_OFFSET:
                continue
            for e in ends:
                if e < s or e - s + 1 > max_answer_length or offsets[e] == NO_OFFSET:
                    continue
                score = float(start[s] + end[e])
                if score > best_score:
                    best_score, best_text = score, context[offsets[s][0]:offsets[e][1]]
    return SpanChoice(best_text, best_score, null_score)


def predict(choice: SpanChoice, threshold: float) -> str:
    """The answer: "" when no-answer wins by more than ``threshold``."""
    return "" if choice.no_answer_margin > threshold else choice.text
