"""Does the MLP head train properly? Logistic regression vs the MLP's defaults vs the paper's.

Trains each head on random labelled subsets of the DLPFC 151510 training pool (30 PCs +
6-neighbour means, as the simulation prepares them) and scores macro-F1 on the held-out
test split, 3 draws per size (one at the whole pool)::

    nice .venv/bin/python benchmarks/bench_heads.py
    .venv/bin/python benchmarks/bench_heads.py --quick   # 30 labels, one draw: checks the script works

``mlp`` uses the head's defaults (Adam 1e-3, ≤ 200 epochs, patience 20, weight decay
3/max(n, 60)); ``mlp (activevisium preset)`` the paper's (Adam 1e-4, ≤ 50 epochs,
patience 10, no decay), as ``preset = activevisium`` sets them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from histoloop.presets import head_hyperparameters
from histoloop.simulation import SimulationConfig, prepare_data
from histoloop.training.evaluate import classification_metrics
from histoloop.training.pipeline import train_model
from histoloop.training.predict import predict

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
DATA = SHARED / "dlpfc" / "151510" / "dlpfc151510_500genes.h5ad"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="30,100,400,0", help="labelled-set sizes (0 = the whole pool)"
    )
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run that checks the script works (make bench; not a measurement)",
    )
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.draws = "30", 1
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_simulation import _machine

    print(f"machine: {_machine()}", flush=True)
    cfg = SimulationConfig(label_column="layer", pca=30, neighbours=6, heads=("mlp",), seeds=1)
    problem = prepare_data(DATA, cfg).problem
    pool, test = problem.splits[0]
    heads = {
        "logreg": ("logreg", {}),
        "mlp": ("mlp", {}),
        "mlp (activevisium preset)": ("mlp", head_hyperparameters("activevisium", "mlp")),
    }
    print("| labels | " + " | ".join(heads) + " |")
    print("|---:|" + "---:|" * len(heads))
    for size in (int(s) for s in args.sizes.split(",")):
        n = size or len(pool)
        scores: dict[str, list[float]] = {k: [] for k in heads}
        seconds: dict[str, float] = dict.fromkeys(heads, 0.0)
        for draw in range(args.draws if size else 1):
            rows = (
                np.sort(np.random.default_rng(draw).choice(pool, n, replace=False))
                if size
                else pool
            )
            names = np.asarray(problem.classes, dtype=object)[problem.y[rows]]
            for key, (head, hp) in heads.items():
                t0 = time.perf_counter()
                model = train_model(
                    problem.X[rows],
                    names,
                    head=head,
                    seed=1,
                    classes=problem.classes,
                    hyperparameters=hp,
                    validation_fraction=0.0 if head == "logreg" else 0.1,
                    scaling={"features": problem.scaling},
                )
                seconds[key] += time.perf_counter() - t0
                P = predict(model, problem.X[test]).probabilities
                scores[key].append(
                    classification_metrics(problem.y[test], P.argmax(1), classes=problem.classes)[
                        "macro_f1"
                    ]
                )
        print(
            f"| {n} | "
            + " | ".join(
                f"{np.mean(v):.3f} ± {np.std(v):.3f} ({seconds[k] / len(v):.1f} s)"
                for k, v in scores.items()
            )
            + " |",
            flush=True,
        )
    print(f"machine after: {_machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
