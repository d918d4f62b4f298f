"""Consensus at workspace scale: the three rules over synthetic votes, timed side by side.

``GetStatus``, ``GetAgreement``, the overlay layer and every label snapshot compute a
consensus over all of a project's votes. The browser-workspace benchmark's project has
100,050 units labelled by one annotator; a multi-rater project has fewer units and several
opinions each. Both shapes are built here from a fixed seed (7 classes, each annotator
right 80 % of the time, else a random class) and each rule is timed on the same votes:
``majority`` and ``latest_expert`` (one pass over the votes) against ``dawid_skene`` (EM),
whose ratio to majority is the figure to read::

    nice .venv/bin/python benchmarks/bench_consensus.py
    .venv/bin/python benchmarks/bench_consensus.py --quick   # 10,000 units, one repeat
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from histoloop.annotation_store.consensus import Vote, compute_consensus, latest_votes

RULES = ("majority", "latest_expert", "dawid_skene")
CLASSES = 7


def _votes(n_units: int, n_raters: int, seed: int = 0) -> list[Vote]:
    rng = np.random.default_rng(seed)
    truth = rng.integers(CLASSES, size=n_units)
    right = rng.random((n_units, n_raters)) < 0.8
    noise = rng.integers(CLASSES, size=(n_units, n_raters))
    given = np.where(right, truth[:, None], noise)
    return [
        Vote(
            item=("ds", f"u{i}"),
            annotator=f"a{a}",
            label=f"c{given[i, a]}",
            seq=i * n_raters + a,
            expert=a == 0,
        )
        for i in range(n_units)
        for a in range(n_raters)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 units, one repeat")
    parser.add_argument(
        "--repeat", type=int, default=3, help="timings per rule (the median is reported)"
    )
    args = parser.parse_args(argv)
    shapes = ((10_000, 1),) if args.quick else ((100_050, 1), (5_000, 3), (20_000, 3))
    repeat = 1 if args.quick else args.repeat
    print(
        f"machine: {platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}"
    )
    print("| units × raters | " + " | ".join(RULES) + " | dawid_skene ÷ majority |")
    print("|---|" + "---:|" * (len(RULES) + 1))
    for n_units, n_raters in shapes:
        votes = _votes(n_units, n_raters)
        latest_votes(votes)  # warm
        seconds = {}
        for rule in RULES:
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                result = compute_consensus(votes, rule)
                times.append(time.perf_counter() - t0)
            assert len(result.labels) == n_units
            seconds[rule] = float(np.median(times))
        ratio = seconds["dawid_skene"] / seconds["majority"]
        print(
            f"| {n_units:,} × {n_raters} | "
            + " | ".join(f"{seconds[r]:.2f} s" for r in RULES)
            + f" | {ratio:.1f}× |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
