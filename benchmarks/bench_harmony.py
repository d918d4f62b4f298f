"""Harmony for transfer: train on one section, predict another, with and without integration.

There is no honest two-section expression benchmark in ``../shared/data``: DLPFC 151673
has labels but no counts, and HER2+ A1 is another tissue with other genes. So this splits
DLPFC 151510 at its median array column into a left and a right "section" (both cut
across every layer) and gives the right one a **synthetic** batch effect on the counts —
a per-gene capture efficiency ``exp(N(0, σ))`` and a library-size factor 0.6 — before
the usual normalisation (counts per 10⁴, log1p). That is a weak stand-in for a real
second section (the effect is one we chose), so read the table as "Harmony undoes a
per-gene capture difference of this size", not as evidence about real batch effects.

Features: 30 PCs of the standardised log-expression of both halves together ("no
integration") or the same PCs integrated by Harmony with the half as the batch
(:func:`histoloop.integration.harmonize`, what ``LoopConfig.harmony`` runs). A model of
each head is trained on every labelled spot of the left half and scored on the right::

    nice .venv/bin/python benchmarks/bench_harmony.py
    .venv/bin/python benchmarks/bench_harmony.py --quick   # σ 1 only, 2 seeds, logreg; a temporary folder
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

from histoloop.integration import harmonize
from histoloop.training.evaluate import classification_metrics
from histoloop.training.pipeline import train_model
from histoloop.training.predict import predict

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results" / "seeds"
SIGMAS = (0.0, 0.5, 1.0)
HEADS = ("logreg", "mlp")
SEEDS = 3


def _log_norm(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True).clip(min=1.0)
    return np.log1p(counts / totals * 1e4)


def _pcs(blocks: list[np.ndarray], k: int = 30) -> list[np.ndarray]:
    X = np.concatenate(blocks).astype(np.float64)
    X = (X - X.mean(axis=0)) / np.where(X.std(axis=0) > 1e-12, X.std(axis=0), 1.0)
    Z = (X @ np.linalg.svd(X, full_matrices=False)[2][:k].T).astype(np.float32)
    return [Z[: len(blocks[0])], Z[len(blocks[0]) :]]


def main(argv: list[str] | None = None) -> int:
    """Run the transfer table and write ``benchmarks/results/seeds/harmony.md``."""
    import anndata as ad

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run that checks the script works (make bench; "
        "not a measurement): σ 1 only, 2 seeds, logreg, written to a temporary folder",
    )
    args = parser.parse_args(argv)
    sigmas, heads, seeds, results = SIGMAS, HEADS, SEEDS, RESULTS
    if args.quick:
        sigmas, heads, seeds, results = (
            (1.0,),
            ("logreg",),
            2,
            Path(tempfile.mkdtemp(prefix="bench-harmony-quick-")),
        )
    t0 = time.perf_counter()
    adata = ad.read_h5ad(SHARED / "dlpfc" / "151510" / "dlpfc151510_500genes.h5ad")
    keep = adata.obs["layer"].notna().to_numpy()
    adata = adata[keep]
    counts = np.asarray(
        adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X, dtype=np.float64
    )
    labels = adata.obs["layer"].astype(str).to_numpy()
    left = adata.obs["array_col"].to_numpy() < np.median(adata.obs["array_col"].to_numpy())
    rows = []
    for sigma in sigmas:
        for seed in range(seeds):
            rng = np.random.default_rng([seed, 11])
            right = (
                counts[~left]
                * np.exp(rng.normal(0.0, sigma, counts.shape[1]))
                * (0.6 if sigma else 1.0)
            )
            blocks = [_log_norm(counts[left]), _log_norm(right)]
            plain = _pcs(blocks)
            integrated = harmonize(blocks, n_pcs=30, seed=seed)
            for head in heads:
                for name, (a, b) in (("no integration", plain), ("harmony", integrated)):
                    model = train_model(a, labels[left], head=head, seed=seed)
                    pred = np.asarray(model.classes)[predict(model, b).predicted]
                    classes = tuple(model.classes)
                    index = {c: i for i, c in enumerate(classes)}
                    m = classification_metrics(
                        np.array([index[x] for x in labels[~left]]),
                        np.array([index[x] for x in pred]),
                        classes=classes,
                    )
                    rows.append(
                        {
                            "sigma": sigma,
                            "seed": seed,
                            "head": head,
                            "features": name,
                            "macro_f1": float(m["macro_f1"]),
                            "accuracy": float(m["accuracy"]),
                        }
                    )
            print(f"sigma {sigma} seed {seed} done", flush=True)
    wall = time.perf_counter() - t0
    lines = [
        "| synthetic batch effect σ | head | macro-F1 on the right half, no integration | with Harmony |",
        "|---:|---|---:|---:|",
    ]
    for sigma in sigmas:
        for head in heads:
            cell = []
            for name in ("no integration", "harmony"):
                v = np.array(
                    [
                        r["macro_f1"]
                        for r in rows
                        if r["sigma"] == sigma and r["head"] == head and r["features"] == name
                    ]
                )
                cell.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}")
            lines.append(f"| {sigma:g} | {head} | {cell[0]} | {cell[1]} |")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = (
        "### Harmony: train on the left half of DLPFC 151510, predict the right (synthetic batch effect)\n\n"
        + "\n".join(lines)
        + f"\n\n{seeds} seeds (the batch effect's draw and the model's seed); "
        f"{int(left.sum())} training spots, {int((~left).sum())} scored. {wall:.0f} s wall on "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, load average {load}.\n"
    )
    results.mkdir(parents=True, exist_ok=True)
    (results / "harmony.md").write_text(text)
    (results / "harmony.json").write_text(json.dumps(rows))
    print(text)
    if args.quick:
        print(f"(quick: written to {results}, not to {RESULTS})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
