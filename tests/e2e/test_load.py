"""A bounded load run on the distributed stack: 10 annotators × 10 s (the full 50 × 60 s run is
``benchmarks/bench_load.py``; numbers in ``benchmarks/README.md``)."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.load import run_load
from tests.e2e.loop import ProjectLoop
from tests.e2e.stack import Stack

CLIENTS = 10
DURATION = 10.0
INTERVAL = 0.5


def test_concurrent_annotators(stack: Stack, visium: Path, slide: Path) -> None:
    loop = ProjectLoop(stack, visium, slide)
    loop.start()
    try:
        result = run_load(stack, loop, clients=CLIENTS, duration=DURATION, interval=INTERVAL)
    finally:
        loop.close()
    print(result.summary())
    expected_batches = CLIENTS * DURATION / INTERVAL
    assert result.errors == 0
    assert result.batches >= 0.9 * expected_batches, result.batches
    # every acknowledged label stored exactly once; every batch announced exactly once
    assert result.stored_batches == result.batches
    assert result.stored_labels == result.labels == 8 * result.batches
    assert result.duplicate_rows == 0
    assert result.resubmitted_duplicate == result.resubmitted > 0
    assert result.label_event_ids == result.batches
    # retraining coalesced: bursts of batches, one model each, never two for one label version
    assert result.model_versions_distinct
    assert result.models <= result.batches // 2, (result.models, result.batches)
    assert result.final_model_label_version == result.final_label_version
    assert result.latency(99) < 2000, f"p99 SubmitLabels {result.latency(99):.0f} ms"
