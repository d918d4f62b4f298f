"""Every benchmark still runs: each script's ``--quick`` mode, as ``make bench`` runs it.

The figures in ``benchmarks/README.md`` come from the full runs; this only keeps the
scripts from rotting (an import that moved, a renamed argument).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("bench_*.py"))
HELPERS = {"her2st_a1.py": ("bench_simulation.py", "--sample", "her2st-a1")}
"""Benchmark modules that are not scripts → the ``--quick`` run that goes through them."""


def _quick(script: str, *args: str) -> str:
    """Run ``benchmarks/<script> --quick *args``; its stdout (it exited 0 and printed something)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (
        f"{script} --quick {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert proc.stdout.strip(), f"{script} --quick {' '.join(args)} printed nothing"
    return proc.stdout


def test_every_benchmark_is_checked() -> None:
    assert "bench_query.py" in SCRIPTS and len(SCRIPTS) >= 7
    helpers = {p.name for p in (REPO / "benchmarks").glob("*.py")} - set(SCRIPTS)
    assert helpers == set(HELPERS), "a benchmark helper module without a --quick run below"


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_runs(script: str) -> None:
    _quick(script)


def test_her2st_a1_quick_runs_every_step() -> None:
    """The A1 morphology run (``her2st_a1.py``): features, campaigns, views, curves."""
    out = _quick(*HELPERS["her2st_a1.py"])
    assert "her2st A1: 341 spots" in out
    for name in ("efficientnet", "multimodal"):
        assert f"\n| {name} | activevisium | " in out, f"no {name} row in the summary:\n{out}"
    assert "| 238 | 1 noise-free views + clean |" in out, out
    listed = next(line for line in out.splitlines() if line.startswith("learning curves: "))
    curves = [Path(p) for p in listed.removeprefix("learning curves: ").split(", ")]
    assert sorted(p.parent.name for p in curves) == ["efficientnet", "multimodal"], listed
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in curves), listed
