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


def test_every_benchmark_is_checked() -> None:
    assert "bench_query.py" in SCRIPTS and len(SCRIPTS) >= 7


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_runs(script: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (
        f"{script} --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert proc.stdout.strip(), f"{script} --quick printed nothing"
