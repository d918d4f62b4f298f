"""Failure isolation, measured: a healthy project's round latency beside a poisoned one.

The loop's five stage workers (real :class:`histoloop.worker.EventWorker` s on the loop's
real topics, embedded event log, local artifact store, handlers that only pass events on)
run ``--rounds`` rounds of project ``good`` — labels.committed → model.trained →
predictions.ready → queryset.ready — three times in one process:

* ``clean``: nothing else on the bus;
* ``poisoned``: project ``bad`` has a broken event in every stage, published first, whose
  handlers raise until the events are parked (the worker's defaults: 5 attempts, backoff
  from 0.5 s);
* ``no stage records``: clean, with the per-stage state records switched off, to price them.

It prints the median and 95th percentile of ``good``'s round latency per run and the
ratios poisoned/clean and clean/no-records.

Usage: ``.venv/bin/python benchmarks/bench_isolation.py --rounds 300`` (``--quick``: 10 rounds
per run, which checks that the script works; the poison is still being retried, so the
ratios are not a measurement)
"""

from __future__ import annotations

import argparse
import logging
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

from histoloop import events, stages, worker
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.embedded import EmbeddedBus
from histoloop.v1 import events_pb2
from histoloop.worker import EventWorker

ROUTES = {
    "training": (events.LABELS_COMMITTED, events_pb2.ModelTrained),
    "prediction": (events.MODEL_TRAINED, events_pb2.PredictionsReady),
    "acquisition": (events.PREDICTIONS_READY, events_pb2.QuerySetReady),
    "tiling": (events.DATASET_REGISTERED, events_pb2.TilesReady),
    "embedding": (events.TILES_READY, events_pb2.EmbeddingsReady),
}


def _handler(bus: EmbeddedBus, out: type):
    def handle(message, record) -> None:
        if message.meta.project == "bad":
            raise RuntimeError("broken input")
        events.publish(
            bus,
            out(
                meta=events.new_meta(
                    project=message.meta.project,
                    producer="bench",
                    event_id=events.derived_id(message.meta.event_id, "x"),
                )
            ),
        )

    return handle


def run(rounds: int, *, poison: bool) -> list[float]:
    """``good``'s round latencies (s) in a fresh log and store."""
    root = Path(tempfile.mkdtemp(prefix="bench-isolation-"))
    bus, store = EmbeddedBus(root / "events.sqlite"), LocalArtifactStore(root / "artifacts")
    arrivals: queue.Queue = queue.Queue()
    workers = [
        EventWorker(
            group=g, bus=bus, store=store, poll_timeout=0.05, handlers={topic: _handler(bus, out)}
        )
        for g, (topic, out) in ROUTES.items()
    ]
    workers.append(
        EventWorker(
            group="annotation_store",
            bus=bus,
            store=store,
            poll_timeout=0.05,
            handlers={events.QUERYSET_READY: lambda m, r: arrivals.put(time.perf_counter())},
        )
    )
    for w in workers:
        w.start()
    if poison:
        for cls in (
            events_pb2.LabelsCommitted,
            events_pb2.ModelTrained,
            events_pb2.PredictionsReady,
            events_pb2.DatasetRegistered,
            events_pb2.TilesReady,
        ):
            events.publish(bus, cls(meta=events.new_meta(project="bad", producer="bench")))
    latencies = []
    try:
        for version in range(1, rounds + 1):
            sent = time.perf_counter()
            events.publish(
                bus,
                events_pb2.LabelsCommitted(
                    meta=events.new_meta(project="good", producer="bench"), label_version=version
                ),
            )
            latencies.append(arrivals.get(timeout=60) - sent)
    finally:
        for w in workers:
            w.stop(5)
        bus.close()
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds",
        type=int,
        default=300,
        help="rounds per run (300 outlast the poison's 5 attempts, ~8 s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run that checks the script works (make bench; not a measurement)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 10
    logging.getLogger("histoloop").setLevel(logging.CRITICAL)  # the poison's retries log loudly
    results = {"clean": run(args.rounds, poison=False), "poisoned": run(args.rounds, poison=True)}
    real_write = stages.write_state
    worker.write_state = lambda store, record: None  # type: ignore[assignment]
    try:
        results["no stage records"] = run(args.rounds, poison=False)
    finally:
        worker.write_state = real_write  # type: ignore[assignment]
    print(f"{'run':<18} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
    summary = {}
    for name, values in results.items():
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        summary[name] = statistics.median(values)
        print(
            f"{name:<18} {1000 * summary[name]:>10.1f} {1000 * p95:>8.1f} {1000 * max(values):>8.1f}"
        )
    print(f"ratio poisoned/clean (median): {summary['poisoned'] / summary['clean']:.2f}")
    print(
        f"ratio clean/no stage records (median): {summary['clean'] / summary['no stage records']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
