"""Labels-committed → next-query-set latency and accuracy of the live loop on DLPFC 151510.

Runs the whole embedded loop (``histoloop demo``'s code path: six services in one
process, a simulated pathologist over gRPC) for several configurations side by side in one
run, and reports per configuration the median and p90 time from SubmitLabels to the next
query set (retraining + prediction of all 4,634 spots + query) and macro-F1 / balanced
accuracy on all spots after the last round.

Usage: ``.venv/bin/python benchmarks/bench_loop.py [--rounds 10] [--out /tmp/bench-loop]``
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
from pathlib import Path

from histoloop.demo import run_demo

CONFIGS = [
    ("activevisium", "mlp", 6),
    ("activevisium", "mlp", 0),
    ("activevisium", "logreg", 6),
    ("random", "mlp", 6),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--query-size", type=int, default=20)
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="bench-loop-"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run that checks the script works (make bench; not a measurement)",
    )
    args = parser.parse_args()
    configs = CONFIGS[:1] if args.quick else CONFIGS
    if args.quick:
        args.rounds, args.query_size = 2, 10
    logging.basicConfig(level=logging.WARNING)
    data = Path(os.environ.get("HISTOLOOP_SHARED_DATA", "../shared/data")) / "dlpfc" / "151510"
    print(
        f"{'strategy':<13} {'head':<7} {'nbrs':>4} {'labels':>6} {'median s':>8} {'p90 s':>6} "
        f"{'macro-F1':>8} {'bal.acc':>7}"
    )
    for strategy, head, neighbours in configs:
        rows = run_demo(
            data,
            Path(args.out) / f"{strategy}-{head}-{neighbours}",
            rounds=args.rounds,
            query_size=args.query_size,
            strategy=strategy,
            head=head,
            spatial_neighbours=neighbours,
        )
        latency = sorted(r.seconds_to_next_query for r in rows)
        p90 = latency[min(len(latency) - 1, int(0.9 * len(latency)))]
        last = rows[-1]
        print(
            f"{strategy:<13} {head:<7} {neighbours:>4} {last.labels:>6} {statistics.median(latency):>8.2f} "
            f"{p90:>6.2f} {last.macro_f1:>8.3f} {last.balanced_accuracy:>7.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
