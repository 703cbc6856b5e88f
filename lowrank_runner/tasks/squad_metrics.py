"""SQuAD 2.0 exact match and F1, as the official evaluation script (v2.0) defines them.

- Answers are compared after normalisation: lower case, punctuation removed, the articles
  "a", "an", "the" removed (as whole words), whitespace collapsed.
- Exact match: the normalised strings are equal. F1: over the normalised whitespace
  tokens (bag of tokens, counted with multiplicity).
- An unanswerable question has the single gold answer "" (gold answers that normalise to
  "" are dropped, and a question left with none is unanswerable): the empty prediction
  scores 1 on both metrics, anything else 0. An empty prediction on an answerable
  question scores 0.
- A question's score is the maximum over its gold answers; the totals are means over
  questions, with ``HasAns_*`` over answerable and ``NoAns_*`` over unanswerable ones
  (answerable: the question lists at least one gold answer, as the official script
  counts them, even one that normalises to "").
- ``best_exact`` / ``best_f1``: the no-answer threshold sweep. Each question has a
  non-null candidate answer and a no-answer score (higher: more likely unanswerable);
  predicting "" for every question whose score exceeds a threshold, the best threshold
  and the score it reaches.

Scores are fractions in [0, 1] (the official script prints them ×100).
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match(gold: str, prediction: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(prediction))


def token_f1(gold: str, prediction: str) -> float:
    gold_tokens, pred_tokens = answer_tokens(gold), answer_tokens(prediction)
    if not gold_tokens or not pred_tokens:  # no answer on either side: right only if both are empty
        return float(gold_tokens == pred_tokens)
    common = sum((Counter(gold_tokens) & Counter(pred_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_answers(texts: list[str]) -> list[str]:
    """The gold answers a question is scored against: [""] when it has none."""
    kept = [t for t in texts if normalize_answer(t)]
    return kept or [""]


def question_scores(gold_texts: list[str], prediction: str) -> tuple[float, float]:
    """(exact, f1) of one prediction: the maximum over the gold answers."""
    golds = gold_answers(gold_texts)
    return max(exact_match(g, prediction) for g in golds), max(token_f1(g, prediction) for g in golds)


def squad_v2_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """``predictions``: question id → answer text ("" for no answer); ``references``:
    question id → gold answer texts ([] for an unanswerable question). Every reference
    must have a prediction."""
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} question(s), e.g. {missing[0]!r}")
    exact, f1, has_answer = {}, {}, {}
    for qid, texts in references.items():
        exact[qid], f1[qid] = question_scores(texts, predictions[qid])
        has_answer[qid] = bool(texts)
    out = {"exact": _mean(exact.values()), "f1": _mean(f1.values())}
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        ids = [qid for qid in references if has_answer[qid] is wanted]
        if ids:
            out[f"{prefix}_exact"] = _mean(exact[q] for q in ids)
            out[f"{prefix}_f1"] = _mean(f1[q] for q in ids)
    return out


def best_threshold_scores(candidates: dict[str, str], no_answer_scores: dict[str, float],
                          references: dict[str, list[str]]) -> dict[str, float]:
    """The no-answer threshold sweep. ``candidates``: question id → the best non-null
    answer; ``no_answer_scores``: question id → how much more likely "no answer" is (the
    prediction is "" when this exceeds the threshold). Returns ``best_exact``,
    ``best_exact_thresh``, ``best_f1``, ``best_f1_thresh``: the thresholds are the
    no-answer scores at which the sweep peaks (a threshold below every score predicts ""
    everywhere)."""
    out = {}
    ordered = sorted(references, key=lambda q: no_answer_scores[q])
    has_answer = {q: bool(references[q]) for q in references}
    answered = {q: question_scores(references[q], candidates[q]) for q in references if has_answer[q]}  # (exact, f1)
    for index, name in ((0, "exact"), (1, "f1")):
        # Threshold below every score: "" everywhere, right exactly on the unanswerable ones.
        score = best = float(sum(not has_answer[q] for q in references))
        threshold = min(no_answer_scores.values(), default=0.0) - 1.0 if references else 0.0
        for qid in ordered:  # answer this question too (raise the threshold to its score)
            if has_answer[qid]:
                score += answered[qid][index]
            elif candidates[qid]:
                score -= 1.0  # a non-empty answer to an unanswerable question
            if score > best:
                best, threshold = score, no_answer_scores[qid]
        out[f"best_{name}"] = best / max(len(references), 1)
        out[f"best_{name}_thresh"] = float(threshold)
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
