"""bench/gpu_check.sh without a GPU: ``--dry-run`` lists every part and checks that what
it would run resolves here (files, Python entry points and their flags, recipes, the
embedded Python), the time plan fits the 8 minutes, and bad arguments are refused."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"
TEXT = SCRIPT.read_text()
PARTS = re.search(r"^ALL_PARTS=(\S+)$", TEXT, re.M).group(1).split(",")
LIMITS = {name: int(limit) for name, limit in re.findall(r'^  part (\w+) (\d+) "', TEXT, re.M)}


def gpu_check(*args, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=600)


def test_the_parts_and_their_limits_fit_eight_minutes():
    assert PARTS == ["methods", "quickstart", "latency", "memory", "chat", "fsdp"]
    assert list(LIMITS) == PARTS  # run in this order, each with its limit
    setup = int(re.search(r"^SETUP_S=(\d+)", TEXT, re.M).group(1))
    assert re.search(r"^BUDGET=\$\{GPU_CHECK_BUDGET:-480\}$", TEXT, re.M)  # 8 minutes, set-up included
    assert sum(LIMITS.values()) + setup <= 480
    header = TEXT[: TEXT.index("set -uo pipefail")]
    for name, limit in LIMITS.items():  # the header gives each part's limit and its estimated time
        assert re.search(rf"^#   {name} +{limit} s, ~\d+ ", header, re.M), name
    assert "8 minutes" in header and "ESTIMATES" in header


@pytest.mark.slow
def test_the_dry_run_lists_and_checks_every_part_without_a_gpu(tmp_path):
    result = gpu_check("--dry-run", tmp_path=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    for i, name in enumerate(PARTS, 1):
        assert re.search(rf"^#### {i}\. ", out, re.M), name  # the part's title, in order
        assert f"dry run: part {name}: ok (limit {LIMITS[name]} s;" in out, name
    assert out.count("would run: ") == len(PARTS)
    for check in ("bash syntax: ok", "packages: ok", "backbone: ok"):
        assert f"dry run: {check}" in out
    assert f"dry run: {TEXT.count(chr(10) + 'PY' + chr(10))} embedded Python blocks compile: ok" in out  # all of them
    assert re.search(r"dry run: time plan: .* within the budget of 480 s: ok", out)
    assert "dry run: every part resolves." in out
    assert not (tmp_path / "out").exists()  # a dry run writes no results


def test_a_dry_run_fails_when_an_entry_point_does_not_resolve(tmp_path):
    result = gpu_check("--dry-run", tmp_path=tmp_path, PYTHON=str(tmp_path / "no-python"), GPU_CHECK_PARTS="latency")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "dry run: part latency: FAILED" in out and "dry run: did not resolve: common latency" in out
    assert "#### 1." not in out and "#### 3. Forward latency" in out  # only the selected part


def test_unknown_arguments_and_parts_are_refused(tmp_path):
    result = gpu_check("--dry-rnu", tmp_path=tmp_path)
    assert result.returncode == 2 and "unknown argument '--dry-rnu'" in result.stderr
    result = gpu_check("--dry-run", tmp_path=tmp_path, GPU_CHECK_PARTS="methods,fsdb")
    assert result.returncode == 2 and "unknown part 'fsdb'" in result.stderr
    result = gpu_check("--help", tmp_path=tmp_path)
    assert result.returncode == 0 and "--dry-run" in result.stdout and "set -uo" not in result.stdout
