"""Per-annotator models in simulation: does the rater-conditioned head predict each rater better?

Three simulated pathologists, built from DLPFC 151510's real layer labels:

* ``exact`` gives the manual annotation;
* ``merger`` folds Layer6 into Layer5 (one thick deep layer);
* ``border`` hesitates at borders: where one of a spot's 6 nearest spots has another
  layer, it gives that neighbour's layer half of the time.

Each seed labels 600 random pool spots by all three raters (1,800 labels), with the
features of the simulation benchmark (30 PCs of log1p counts + 6-neighbour means) and the
same 70/30 pool/test split. Compared, against each rater's labels on the test split:
the rater-conditioned head (one model, rater embedding joined to the features), the
consensus model (the ActiveVisium MLP on the majority label), one MLP per rater trained
on that rater's 600 labels only, and — to separate the benefit of sharing labels across
raters from the difference in fitting (the rater head trains 60 epochs at lr 1e-3 without
early stopping; the pipeline's MLP at lr 1e-4 with early stopping) — the rater head's own
fit on one rater's labels only::

    nice .venv/bin/python benchmarks/bench_raters.py
    .venv/bin/python benchmarks/bench_raters.py --quick   # 2 seeds of 100 spots; a temporary folder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from histoloop.simulation import SimulationConfig, prepare_data
from histoloop.spatial import neighbour_indices, visium_array_positions
from histoloop.training.evaluate import classification_metrics
from histoloop.training.pipeline import train_model
from histoloop.training.predict import predict
from histoloop.training.raters import MAX_STEPS, fit_rater_model

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results" / "seeds"
SEEDS = 3
N_LABELLED = 600
RATERS = ("exact", "merger", "border")
SWEEP_SPOTS = (600, 1000, 3000)
"""Spots labelled by all three raters in the step-cap sweep (3,000 is nearly the whole pool)."""


def simulated_raters(
    y: np.ndarray, classes: tuple[str, ...], neighbours: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Each rater's label for every spot (class indices)."""
    merger = y.copy()
    merger[y == classes.index("Layer6")] = classes.index("Layer5")
    border = y.copy()
    for i in range(len(y)):
        other = [j for j in neighbours[i] if y[j] != y[i]]
        if other and rng.random() < 0.5:
            border[i] = y[rng.choice(other)]
    return {"exact": y.copy(), "merger": merger, "border": border}


def _score(
    truth: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]
) -> tuple[float, float]:
    m = classification_metrics(truth, predicted, classes=classes)
    return float(m["accuracy"]), float(m["macro_f1"])


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write ``benchmarks/results/seeds/raters.md``."""
    import anndata as ad

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run that checks the script works (make bench; "
        "not a measurement): 2 seeds of 100 spots, written to a temporary folder",
    )
    args = parser.parse_args(argv)
    seeds, n_labelled, results = SEEDS, N_LABELLED, RESULTS
    if args.quick:
        seeds, n_labelled, results = 2, 100, Path(tempfile.mkdtemp(prefix="bench-raters-quick-"))
    t0 = time.perf_counter()
    adata = ad.read_h5ad(SHARED / "dlpfc" / "151510" / "dlpfc151510_500genes.h5ad")
    prep = prepare_data(
        adata, SimulationConfig(label_column="layer", pca=30, neighbours=6, seeds=seeds)
    )
    P = prep.problem
    obs = adata.obs.loc[prep.barcodes]
    positions = visium_array_positions(obs["array_row"].to_numpy(), obs["array_col"].to_numpy())
    neighbours = neighbour_indices(positions, 6)
    scores: dict[str, dict[str, list[tuple[float, float]]]] = {
        m: {r: [] for r in RATERS}
        for m in (
            "rater head",
            "consensus MLP",
            "one MLP per rater",
            "same fit, one rater's labels only",
        )
    }
    for seed in range(seeds):
        rng = np.random.default_rng([seed, 17])
        labels = simulated_raters(P.y, P.classes, neighbours, rng)
        pool, test = P.splits[seed]
        chosen = rng.choice(pool, size=n_labelled, replace=False)
        X = P.scaling.transform(P.X)
        stacked = np.stack([labels[r][chosen] for r in RATERS])
        majority = np.array(
            [np.bincount(col, minlength=len(P.classes)).argmax() for col in stacked.T]
        )
        head = fit_rater_model(
            np.concatenate([X[chosen]] * len(RATERS)),
            [r for r in RATERS for _ in chosen],
            stacked.ravel(),
            n_classes=len(P.classes),
            seed=seed,
        )
        names = np.asarray(P.classes, dtype=object)
        consensus = train_model(
            X[chosen], names[majority], head="mlp", seed=seed, classes=P.classes
        )
        consensus_pred = predict(consensus, X[test]).predicted
        for r in RATERS:
            truth = labels[r][test]
            scores["rater head"][r].append(
                _score(truth, head.predict_proba(X[test], r).argmax(axis=1), P.classes)
            )
            scores["consensus MLP"][r].append(_score(truth, consensus_pred, P.classes))
            own = train_model(
                X[chosen], names[labels[r][chosen]], head="mlp", seed=seed, classes=P.classes
            )
            scores["one MLP per rater"][r].append(
                _score(truth, predict(own, X[test]).predicted, P.classes)
            )
            alone = fit_rater_model(
                X[chosen], [r] * len(chosen), labels[r][chosen], n_classes=len(P.classes), seed=seed
            )
            scores["same fit, one rater's labels only"][r].append(
                _score(truth, alone.predict_proba(X[test], r).argmax(axis=1), P.classes)
            )
        print(f"seed {seed} done", flush=True)
    wall = time.perf_counter() - t0
    lines = [
        "| model | " + " | ".join(f"{r}: accuracy / macro-F1" for r in RATERS) + " |",
        "|---|" + "---:|" * len(RATERS),
    ]
    for model, per in scores.items():
        cells = []
        for r in RATERS:
            acc = np.array([s[0] for s in per[r]])
            f1 = np.array([s[1] for s in per[r]])
            cells.append(
                f"{acc.mean():.3f} ± {acc.std(ddof=1):.3f} / {f1.mean():.3f} ± {f1.std(ddof=1):.3f}"
            )
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = (
        "### Per-annotator models, DLPFC 151510 (simulated raters)\n\n"
        + "\n".join(lines)
        + f"\n\n{seeds} seeds, {n_labelled} spots × 3 raters each; each rater's own test labels "
        f"({len(P.splits[0][1])} spots). {wall:.0f} s wall on {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, load average {load}.\n"
    )
    results.mkdir(parents=True, exist_ok=True)
    (results / "raters.md").write_text(text)
    (results / "raters.json").write_text(json.dumps(scores))
    print(text)
    sweep = epochs_sweep(P, neighbours, seeds, (100, 300) if args.quick else SWEEP_SPOTS)
    (results / "raters_epochs.md").write_text(sweep)
    print(sweep)
    if args.quick:
        print(f"(quick: written to {results}, not to {RESULTS})")
    return 0


def epochs_sweep(P, neighbours: np.ndarray, seeds: int, sizes: tuple[int, ...]) -> str:
    """The rater head under the step cap (``MAX_STEPS``) against 60 full epochs, as labels grow."""
    rows = [
        "| spots × 3 raters | epochs capped / 60 | macro-F1, capped | macro-F1, 60 epochs "
        "| fit s, capped / 60 epochs |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        f1: dict[str, list[float]] = {"capped": [], "full": []}
        seconds: dict[str, list[float]] = {"capped": [], "full": []}
        epochs = {}
        for seed in range(seeds):
            rng = np.random.default_rng([seed, 17])
            labels = simulated_raters(P.y, P.classes, neighbours, rng)
            pool, test = P.splits[seed]
            chosen = rng.choice(pool, size=min(n, len(pool)), replace=False)
            X = P.scaling.transform(P.X)
            for arm, cap in (("capped", None), ("full", 10**9)):
                t = time.perf_counter()
                head = fit_rater_model(
                    np.concatenate([X[chosen]] * len(RATERS)),
                    [r for r in RATERS for _ in chosen],
                    np.concatenate([labels[r][chosen] for r in RATERS]),
                    n_classes=len(P.classes),
                    seed=seed,
                    max_steps=cap,
                )
                seconds[arm].append(time.perf_counter() - t)
                epochs[arm] = head.epochs
                f1[arm].append(
                    np.mean(
                        [
                            _score(
                                labels[r][test],
                                head.predict_proba(X[test], r).argmax(axis=1),
                                P.classes,
                            )[1]
                            for r in RATERS
                        ]
                    )
                )
        rows.append(
            f"| {n:,} | {epochs['capped']} / {epochs['full']} "
            f"| {np.mean(f1['capped']):.3f} ± {np.std(f1['capped'], ddof=1):.3f} "
            f"| {np.mean(f1['full']):.3f} ± {np.std(f1['full'], ddof=1):.3f} "
            f"| {np.median(seconds['capped']):.1f} / {np.median(seconds['full']):.1f} |"
        )
    return (
        f"### Per-annotator model: the step cap ({MAX_STEPS} steps) against 60 epochs\n\n"
        + "\n".join(rows)
        + f"\n\n{seeds} seeds; macro-F1 averaged over the three raters' own test labels; "
        "fit seconds are medians over seeds (one torch thread).\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
