"""Scores of generated text against several references per source, from maintained
packages that work offline: BLEU, chrF and TER from sacrebleu; NIST from nltk; ROUGE-L
from rouge-score. BLEU, chrF, TER and ROUGE-L are fractions (0-1), as the E2E challenge's
script prints them and as every other metric of lowrank-runner is (results tables show
them ×100, the papers' scale); NIST is unbounded.

METEOR and CIDEr, the rest of the E2E challenge's set, are not computed: nltk's METEOR
needs WordNet data downloaded at run time and CIDEr has no maintained offline package.
"""

from __future__ import annotations

from typing import Sequence


PERCENT = ("bleu", "chrf", "ter")  # sacrebleu's scores are percentages


def reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: stream ``i`` holds every source's ``i``-th reference, ``None``
    where a source has fewer (sacrebleu ignores those)."""
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every source needs at least one reference")
    width = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def generation_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]], tokenize: str = "13a",
                      lowercase: bool = False) -> dict[str, float]:
    """Corpus-level scores of one output per source against all of that source's references."""
    from nltk.translate.nist_score import corpus_nist
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import BLEU, CHRF, TER

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} outputs for {len(references)} sources")
    if not hypotheses:
        raise ValueError("nothing to score: no sources")
    hypotheses = list(hypotheses)
    streams = reference_streams(references)
    bleu = BLEU(tokenize=tokenize, lowercase=lowercase)
    out = {
        "bleu": bleu.corpus_score(hypotheses, streams).score,
        "chrf": CHRF(lowercase=lowercase).corpus_score(hypotheses, streams).score,
        "ter": TER(case_sensitive=not lowercase).corpus_score(hypotheses, streams).score,
    }

    def tokens(text: str) -> list[str]:
        return bleu.tokenizer(text.lower() if lowercase else text).split()

    hyp_tokens = [tokens(h) for h in hypotheses]
    # NIST (n = 5) sums information-weighted precisions over n-gram orders; an order no
    # output reaches adds 0, and nltk would divide by its zero count: leave it out.
    longest = max(len(h) for h in hyp_tokens)
    out["nist"] = (float(corpus_nist([[tokens(r) for r in refs] for refs in references], hyp_tokens, n=min(5, longest)))
                   if longest else 0.0)
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references)]
    out["rougeL"] = sum(rouge) / len(rouge)
    return {k: float(v) / (100.0 if k in PERCENT else 1.0) for k, v in out.items()}
