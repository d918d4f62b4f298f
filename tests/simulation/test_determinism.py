"""A run's numbers do not depend on thread counts, on run order, or on other threads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from histoloop.simulation import SimulationConfig, prepare_data
from histoloop.simulation import _engine as engine
from histoloop.simulation.campaign import _specs


def _blas_threads() -> set[int]:
    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_single_threaded_holds_while_another_thread_leaves() -> None:
    """Two campaigns in one process: one leaving its block must not lift the other's limit."""
    a_in, b_starting, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, set[int]] = {}

    def first() -> None:
        with engine.single_threaded():
            a_in.set()
            b_starting.wait(10)
            time.sleep(0.3)  # the other thread is inside its block by now, unless it waits
        a_out.set()

    def second() -> None:
        a_in.wait(10)
        b_starting.set()
        with engine.single_threaded():
            a_out.wait(10)
            seen["blas"] = _blas_threads()

    # no limit held here: a thread holding one would own OpenBLAS's setting (threadpoolctl)
    outer = _blas_threads()
    if outer <= {1}:
        pytest.skip("BLAS runs one thread here already (one CPU or *_NUM_THREADS=1)")
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    after = _blas_threads()
    assert seen["blas"] == {1}, "the other thread's exit lifted the BLAS limit mid-block"
    assert after == outer, "the limits from before either block come back at the end"


def test_single_threaded_nests() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with engine.single_threaded():
            with engine.single_threaded():
                pass
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records]


@pytest.mark.slow
def test_runs_give_the_same_numbers_with_other_threads_and_order(
    small_adata, tmp_path: Path
) -> None:
    """What a worker process may see differently: BLAS/torch threads and the runs before."""
    config = SimulationConfig(
        label_column="layer",
        pca=10,
        neighbours=6,
        heads=("logreg", "mlp"),
        strategies=("entropy", "typiclust"),
        seeds=1,
        query_size=20,
        rounds=3,
        hyperparameters={"mlp": {"max_epochs": 15}},
    )
    prepared = prepare_data(small_adata, config)
    specs = [s for s in _specs(config, prepared) if s.strategy != engine.FULL]

    def numbers(folder: Path, order: list[engine.RunSpec]) -> dict[str, list[dict]]:
        for spec in order:
            engine.run(prepared.problem, spec, folder)
        return {s.name: _strip(engine.read_records(engine.run_path(folder, s))) for s in specs}

    with engine.single_threaded():
        one = numbers(tmp_path / "one", specs)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threadpool_limits(limits=2):
            two = numbers(tmp_path / "two", specs[::-1])
    finally:
        torch.set_num_threads(previous)
    assert two == one
