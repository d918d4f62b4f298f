"""Concurrent annotators against the distributed stack (six service processes).

Starts the stack of ``tests/e2e/stack.py`` on this machine — librdkafka's mock Kafka
broker, moto S3, a fresh PostgreSQL database, a real Triton server (pytriton, CPU), and
``histoloop run <service>`` for each of the six services, with mutual TLS and bearer
tokens — creates a project, registers the Visium-like grid on the CMU slide, waits for the
cold-start query set, then runs ``--clients`` annotators (one token and one gRPC channel
each) submitting batches of ``--batch-size`` labels every ``--interval`` seconds for
``--duration`` seconds (open loop; latency from each call's scheduled time).

It reports SubmitLabels latency percentiles and labels/s, then checks: every acknowledged
label stored exactly once (PostgreSQL row counts), resubmitted batches come back
``duplicate``, one ``labels.committed`` per batch on the bus, retraining coalesced (models
vs batches, never two models for one label version), and the newest labels get their model
and query set (catch-up time). Exits 1 if a check fails.

    .venv/bin/python benchmarks/bench_load.py --clients 50 --duration 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.load import run_load  # noqa: E402
from tests.e2e.loop import ProjectLoop  # noqa: E402
from tests.e2e.stack import start_stack  # noqa: E402
from tests.tiling.visium_fake import make_visium  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument(
        "--interval", type=float, default=0.5, help="seconds between a client's batches"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--catch-up-timeout",
        type=float,
        default=600.0,
        help="seconds after the window for the newest labels to get their model",
    )
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument(
        "--keep", help="keep logs and state in this folder (default: a temporary one)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run that checks the script works (make bench; not a measurement)",
    )
    args = parser.parse_args()
    if args.quick:
        args.clients, args.duration, args.catch_up_timeout = 2, 3.0, 180.0

    shared = Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
    slide = shared / "wsi" / "CMU-1-Small-Region.svs"
    with tempfile.TemporaryDirectory(prefix="histoloop-bench-load-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        visium = make_visium(slide, root / "visium")
        started = time.monotonic()
        with start_stack(root / "stack") as stack:
            print(f"stack ready in {time.monotonic() - started:.1f}s", flush=True)
            loop = ProjectLoop(stack, visium, slide, project_id="bench-load")
            loop.start()
            try:
                result = run_load(
                    stack,
                    loop,
                    clients=args.clients,
                    duration=args.duration,
                    interval=args.interval,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    catch_up_timeout=args.catch_up_timeout,
                    progress=lambda line: print(line, flush=True),
                )
            finally:
                loop.close()
    summary = result.summary()
    summary["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    offered = args.clients * args.duration / args.interval
    checks = {
        "no errors": result.errors == 0,
        "batches as offered (≥ 90 %)": result.batches >= 0.9 * offered,
        "labels stored exactly once": result.stored_labels == result.labels
        and result.duplicate_rows == 0
        and result.stored_batches == result.batches,
        "resubmissions are duplicates": result.resubmitted_duplicate == result.resubmitted,
        "one labels.committed per batch": result.label_event_ids == result.batches,
        "retraining coalesced": result.model_versions_distinct and result.models < result.batches,
        "newest labels trained": result.final_model_label_version == result.final_label_version,
    }
    print(
        f"{args.clients} clients × {args.duration:.0f}s, a batch of {args.batch_size} every "
        f"{args.interval}s each ({offered:.0f} batches offered)"
    )
    print(
        f"batches {result.batches}, labels {result.labels} ({result.labels_per_s:.0f}/s), errors {result.errors}; "
        f"{result.pending_at_window_end} batches still in the outbox when the window closed"
    )
    print(
        "SubmitLabels latency ms: "
        + ", ".join(f"p{q} {result.latency(q):.1f}" for q in (50, 95, 99))
        + f", max {max(result.latencies_ms):.1f}"
    )
    print(
        f"stored labels {result.stored_labels}, batches {result.stored_batches}, duplicate rows "
        f"{result.duplicate_rows}; resubmitted {result.resubmitted} → {result.resubmitted_duplicate} duplicate"
    )
    print(
        f"labels.committed {result.label_events} records, {result.label_event_ids} event ids; models "
        f"{result.models} for {result.batches} batches (1 per {result.batches / max(result.models, 1):.1f}); "
        f"newest label version {result.final_label_version} → model of v{result.final_model_label_version}, "
        f"query round {result.final_query_round}, {result.catch_up_s:.1f}s after the window"
    )
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "checks": checks}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
