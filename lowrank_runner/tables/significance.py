"""Is a difference to the baseline row real? Per column and seed set, the difference of
the means with a 95% confidence interval and a two-sided t-test: paired (by seed) when
both rows have the same seeds (lrr's seed fixes the data order and the head's init, so
two runs with one seed share those draws), else Welch's (unequal variances,
Welch–Satterthwaite df). One seed on either side: the difference, no interval. scipy
gives the t distribution and the tests. Torch-free."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from lowrank_runner.errors import UsageError

CI_LEVEL = 0.95
ALPHA = 1 - CI_LEVEL  # two-sided: significant where the interval leaves out 0
MARK = "†"
PAIRED, WELCH = "paired", "welch"


@dataclass(frozen=True)
class Difference:
    """A row's difference to the baseline (row − baseline, the table's units) over seeds.
    ``test``: "paired", "welch", or "" where there is no interval (one seed on a side,
    or no spread at all); ``n``/``n_baseline``: the seeds of each side."""

    diff: float
    low: float | None
    high: float | None
    p_value: float | None
    test: str
    n: int
    n_baseline: int

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < ALPHA

    @property
    def described(self) -> str:
        """The footnote's words: "paired t, n=3", "Welch t, n=3 vs 2", "n=1: no interval"."""
        if self.test == PAIRED:
            return f"paired t, n={self.n}"
        if self.test == WELCH:
            return f"Welch t, n={self.n} vs {self.n_baseline}"
        if min(self.n, self.n_baseline) < 2:
            return "n=1: no interval"
        return f"no spread over n={self.n} vs {self.n_baseline}: no interval"

    def as_dict(self) -> dict:
        return {"diff": self.diff, "low": self.low, "high": self.high, "p_value": self.p_value, "test": self.test,
                "n": self.n, "n_baseline": self.n_baseline, "significant": self.significant}


def difference(row: dict, baseline: dict) -> Difference | None:
    """``row`` and ``baseline``: seed -> value. None where a side has no value."""
    if not row or not baseline:
        return None
    diff = statistics.fmean(row.values()) - statistics.fmean(baseline.values())
    if min(len(row), len(baseline)) < 2:
        return Difference(diff, None, None, None, "", len(row), len(baseline))
    if set(row) == set(baseline):
        return paired(row, baseline)
    return welch(list(row.values()), list(baseline.values()))


def _no_spread(diff: float, n: int, n_baseline: int) -> Difference:
    return Difference(diff, None, None, None, "", n, n_baseline)


def paired(row: dict, baseline: dict) -> Difference:
    """The paired t-test over the seeds both rows have; the interval from the differences."""
    from scipy import stats

    seeds = sorted(row)
    a, b = [row[s] for s in seeds], [baseline[s] for s in seeds]
    diffs = [x - y for x, y in zip(a, b)]
    n, mean = len(diffs), statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n)
    if se == 0:
        return _no_spread(mean, n, n)
    half = stats.t.ppf(1 - ALPHA / 2, n - 1) * se
    return Difference(mean, mean - half, mean + half, float(stats.ttest_rel(a, b).pvalue), PAIRED, n, n)


def welch(a: list[float], b: list[float]) -> Difference:
    """Welch's t-test; the interval with the Welch–Satterthwaite degrees of freedom."""
    from scipy import stats

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    mean = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:
        return _no_spread(mean, len(a), len(b))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(1 - ALPHA / 2, df) * math.sqrt(va + vb)
    p_value = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return Difference(mean, mean - half, mean + half, p_value, WELCH, len(a), len(b))


class BaselineError(UsageError):
    """The baseline names no row of the table, or several."""


def baseline_index(rows: list[tuple[str, ...]], name: str) -> int:
    """The row ``name`` names, from each row's names in order of precedence (title,
    method, label, recipe): its title as the table prints it ("lora", "lora (r=2)"),
    else the one row with that method, sweep label or recipe name."""
    titles = [row[0] for row in rows]
    for key in range(len(rows[0]) if rows else 0):
        hits = [i for i, row in enumerate(rows) if row[key] and row[key] == name]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise BaselineError(f"baseline {name!r} names {len(hits)} rows ({', '.join(titles[i] for i in hits)}); "
                                "give one of them as the table prints it")
    raise BaselineError(f"baseline {name!r} names no row of the table; its rows: {', '.join(titles)} (give a row as "
                        "the table prints it, or a sweep point's label)")
