"""bench/quality.py's own logic (not its numbers): seeds, and the paired comparison
against the baseline (the interval checked against scipy's paired t-test)."""

from __future__ import annotations

from argparse import Namespace

import pytest
from scipy import stats



def test_seeds(quality):
    assert quality.seeds_of(Namespace(seeds=None, seed=4)) == 4
    assert quality.seeds_of(Namespace(seeds="0-3,7", seed=0)) == [0, 1, 2, 3, 7]
    with pytest.raises(quality.BenchError, match="--seeds x: give seeds as 0-9 or 0,1,2"):
        quality.seeds_of(Namespace(seeds="x", seed=0))


def rows(method, values, task="sst2"):
    return [{"task": task, "method": method, "seed": s, "best": v, "point": {}} for s, v in enumerate(values)]


def test_paired_difference_interval_and_verdicts(quality):
    base = [0.83, 0.82, 0.835, 0.84, 0.825, 0.83, 0.828, 0.833, 0.821, 0.836]
    near = [b - 0.002 + (0.003 if i % 2 else -0.003) for i, b in enumerate(base)]  # about -0.2 points
    far = [b - 0.03 + (0.002 if i % 3 else -0.001) for i, b in enumerate(base)]  # about -3 points
    noisy = [b + (0.04 if i % 2 else -0.045) for i, b in enumerate(base)]  # mean -0.25, spread 4 points
    data = rows("peft-lora", base) + rows("near", near) + rows("far", far) + rows("noisy", noisy)
    data.append({"task": "sst2", "method": "near", "seed": 99, "best": 0.9, "point": {}})  # no baseline run: unpaired
    out = {c["method"]: c for c in quality.paired(data, "peft-lora", 1.0)}
    assert {m: c["verdict"] for m, c in out.items()} == {"near": "parity", "far": "below", "noisy": "undecided"}
    for name, values in (("near", near), ("far", far), ("noisy", noisy)):
        c = out[name]
        ours, theirs = [100 * v for v in values], [100 * v for v in base]
        test = stats.ttest_rel(ours, theirs)
        ci = test.confidence_interval(0.95)
        assert c["n"] == 10 and c["mean"] == pytest.approx(sum(ours) / 10 - sum(theirs) / 10)
        assert c["ci95"] == pytest.approx([ci.low, ci.high])
    single = quality.paired(rows("peft-lora", [0.8]) + rows("one", [0.79]), "peft-lora", 1.0)
    assert single[0]["n"] == 1 and single[0]["ci95"] == [None, None] and single[0]["verdict"] == "undecided"
