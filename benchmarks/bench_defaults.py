"""Defaults by evidence: small campaigns on the development data, one summary table.

Runs the same grid of arms on DLPFC 151510 (Visium, 500-gene counts) and on the HER2+
breast-cancer section A1 (legacy ST, 15,045-gene counts, built here from the raw files in
``../shared/data/her2st/A1``; nothing is copied into the repository), 5 seeds each, and
writes one Markdown table per dataset plus a summary to ``--out``::

    nice .venv/bin/python benchmarks/bench_defaults.py --out /tmp/histoloop-defaults

Every number comes from ``histoloop.simulation.run_campaign`` (the same round
functions as ``histoloop simulate``); the query size is the simulator's default, 2 % of
the training pool, so both sections get the same relative budget (no per-dataset
constants). The ``query-half`` and ``query-double`` cases sweep that size (1 % and 4 % of the
pool, the same labels in twice or half as many rounds) for the project default
(activevisium / mlp with neighbour means) and random; the ``nb6`` case is the ×1 point.
``--case`` runs one case only; ``--quick`` runs the A1 cases with 1 seed and 2 rounds (a check that
the script runs, no evidence).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from histoloop.presets import head_hyperparameters
from histoloop.simulation import DEFAULT_QUERY_FRACTION, SimulationConfig, run_campaign

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
DLPFC = SHARED / "dlpfc" / "151510" / "dlpfc151510_500genes.h5ad"
A1 = SHARED / "her2st" / "A1"
STRATEGIES = ("random", "entropy", "margin", "activevisium", "bandit")


def a1_anndata(folder: Path = A1) -> Any:
    """Section A1 as an AnnData: raw counts, the pathologist's label per spot, pixel positions.

    Spots are joined as SOURCES.md (section 3) says: counts rows ``<x>x<y>`` = selection
    ``x``, ``y``; labels on selection ``new_x``, ``new_y``. ``undetermined`` (5 spots) is not
    a tissue class and is left unlabelled; ``obsm["spatial"]`` holds the spot centres in
    the original image frame (the ST array is square, not Visium's hexagonal one).
    """
    import anndata as ad
    import pandas as pd

    with gzip.open(folder / "A1.tsv.gz", "rt") as fh:
        counts = pd.read_csv(fh, sep="\t", index_col=0)
    sel = pd.read_csv(folder / "A1_selection.tsv", sep="\t")
    lab = pd.read_csv(folder / "A1_labeled_coordinates.tsv", sep="\t")
    sel["spot"] = sel["x"].astype(int).astype(str) + "x" + sel["y"].astype(int).astype(str)
    key = lambda x, y: np.round(x, 3).astype(str) + "_" + np.round(y, 3).astype(str)  # noqa: E731
    labels = dict(zip(key(lab["x"], lab["y"]), lab["label"], strict=True))
    sel["label"] = [labels.get(k) for k in key(sel["new_x"], sel["new_y"])]
    sel = sel.set_index("spot").loc[[s for s in counts.index if s in set(sel["spot"])]]
    obs = pd.DataFrame(
        {"label": sel["label"].where(sel["label"] != "undetermined")}, index=sel.index
    )
    adata = ad.AnnData(X=counts.loc[sel.index].to_numpy(np.float32), obs=obs)
    adata.obsm["spatial"] = sel[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    return adata


def cases(quick: bool, genes_seeds: int = 3) -> dict[str, tuple[str, SimulationConfig]]:
    """Case name → (dataset, campaign); the two ``genes`` cases run ``genes_seeds`` seeds (CPU)."""
    seeds, rounds = (1, 2) if quick else (5, 12)
    out = {}
    sections = (
        (("her2st_a1", "label"),) if quick else (("dlpfc151510", "layer"), ("her2st_a1", "label"))
    )
    for data, label in sections:
        # 12 rounds of 2 % of the pool, then rounds to 40 % and 60 % (so random reaches the target)
        base = dict(
            label_column=label,
            pca=30,
            seeds=seeds,
            rounds=rounds,
            schedule=() if quick else (0.4, 0.6),
            initial="per_class",
        )
        # logreg with every strategy, the mlp with the main ones (CPU), on [PCs, neighbour means] and on PCs;
        # without neighbours the mlp arms include the former project default (activevisium / mlp)
        out[f"{data}.nb6"] = (
            data,
            SimulationConfig(
                neighbours=6,
                heads=("logreg", "mlp"),
                strategies=(
                    *[f"{s}@logreg" for s in STRATEGIES],
                    "random@mlp",
                    "entropy@mlp",
                    "activevisium@mlp",
                ),
                **base,
            ),
        )
        # the nb6 MLP arms again with the paper's training settings, warm-started round by round
        out[f"{data}.nb6-paper"] = (
            data,
            SimulationConfig(
                neighbours=6,
                heads=("mlp",),
                strategies=("random", "activevisium"),
                hyperparameters={"mlp": head_hyperparameters("activevisium", "mlp")},
                **base,
            ),
        )
        out[f"{data}.nb0"] = (
            data,
            SimulationConfig(
                neighbours=0,
                heads=("logreg", "mlp"),
                strategies=(*[f"{s}@logreg" for s in STRATEGIES], "random@mlp", "activevisium@mlp"),
                **base,
            ),
        )
        # query size: the default relative size (2 %, the nb6 case) halved and doubled, the same labels
        for kind, factor in (("half", 0.5), ("double", 2)):
            out[f"{data}.query-{kind}"] = (
                data,
                SimulationConfig(
                    neighbours=6,
                    heads=("mlp",),
                    strategies=("random", "activevisium"),
                    **{
                        **base,
                        "query_fraction": DEFAULT_QUERY_FRACTION * factor,
                        "rounds": round(rounds / factor),
                    },
                ),
            )
        # unlabelled spots put to work: the same head with label spreading (spatial + feature graph)
        out[f"{data}.ssl"] = (
            data,
            SimulationConfig(
                neighbours=6,
                heads=("logreg", "logreg+ssl"),
                strategies=("random", "entropy", "bandit"),
                **base,
            ),
        )
        # rare classes: the initial set drawn by each cold start instead of one label per class
        for cold in (
            ("random", "coldstart_kmeans", "typiclust", "coverage")
            if data == "her2st_a1"
            else ("coldstart_kmeans", "coverage")
        ):
            out[f"{data}.cold-{cold}"] = (
                data,
                SimulationConfig(
                    neighbours=6,
                    heads=("logreg",),
                    strategies=("random", "entropy", "bandit"),
                    **{**base, "initial": cold},
                ),
            )
    # the live loop's expression features (log-normalised genes, no PCA: what the embedding step
    # stores) rather than 30 PCs: does the head choice hold on them?
    out["dlpfc151510.genes"] = (
        "dlpfc151510_genes",
        SimulationConfig(
            label_column="layer",
            obsm=("X_expr",),
            neighbours=6,
            heads=("logreg", "mlp"),
            strategies=("random", "entropy", "activevisium@mlp"),
            seeds=min(seeds, genes_seeds),
            rounds=rounds,
            initial="per_class",
        ),
    )
    # the same MLP arms with the paper's training settings (the activevisium preset), warm-started
    # round by round as in the live loop: is the new training better inside the loop too?
    out["dlpfc151510.genes-paper"] = (
        "dlpfc151510_genes",
        SimulationConfig(
            label_column="layer",
            obsm=("X_expr",),
            neighbours=6,
            heads=("mlp",),
            strategies=("random", "activevisium"),
            seeds=min(seeds, genes_seeds),
            rounds=rounds,
            initial="per_class",
            hyperparameters={"mlp": head_hyperparameters("activevisium", "mlp")},
        ),
    )
    if quick:  # a check that the script runs: the A1 cases and the cheaper of the genes cases
        del out["dlpfc151510.genes"]
    return out


def _load(name: str) -> Any:
    import anndata as ad

    from histoloop.training.scaling import log1p_normalise

    if name == "dlpfc151510_genes":
        adata = ad.read_h5ad(DLPFC)
        adata.obsm["X_expr"] = log1p_normalise(
            adata.X
        )  # as the embedding step's expression features
        return adata
    return ad.read_h5ad(DLPFC) if name == "dlpfc151510" else a1_anndata()


def summary(name: str, comparison: dict[str, Any]) -> list[str]:
    """One line per arm: labels to target, × random, AULC, where the stopping signal fires."""
    lines = []
    full = comparison["full_supervision"]
    for r in sorted(
        comparison["rows"], key=lambda r: (r["head"], r["labels_to_target"]["mean"] or 0)
    ):
        ltt = r["labels_to_target"]
        ratio = (
            "—"
            if r["ratio_to_random"] is None
            else (
                f"{'' if r['ratio_bound'] in (None, '=') else r['ratio_bound']}{r['ratio_to_random']:.2f}×"
            )
        )
        stop = r["stop"]
        cover = r["all_classes_round"]
        cover_s = (
            "never"
            if not cover["seeds"]
            else f"{cover['mean']:.1f} ({cover['seeds']}/{ltt['seeds']})"
        )
        stop_s = (
            "never"
            if not stop["seeds"]
            else (
                f"{stop['labels']['mean']:.0f} ({100 * stop['share_of_full']['mean']:.1f} %, {stop['seeds']} seeds)"
            )
        )
        lines.append(
            f"| {name} | {r['head']} | {r['strategy']} | {'≥ ' if ltt['censored'] else ''}{ltt['mean']:.0f} "
            f"({ltt['reached']}/{ltt['seeds']}) | {ratio} | {r['aulc']['mean']:.3f} ± {r['aulc']['sd']:.3f} | "
            f"{full[r['head']]['mean']:.3f} | {stop_s} | {cover_s} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        help="campaign folders (default /tmp/histoloop-defaults; with --quick a new temporary one)",
    )
    parser.add_argument("--case", action="append", help="run only these cases (repeatable)")
    parser.add_argument("--quick", action="store_true", help="the A1 cases, 1 seed, 2 rounds")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--genes-seeds",
        type=int,
        default=3,
        help="seeds of the two dlpfc151510.genes cases (1,000 features: the slowest MLP arms)",
    )
    parser.add_argument(
        "--summarise",
        action="store_true",
        help="only rebuild summary.md from the finished case folders in --out",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_simulation import _machine

    if args.out is None:  # a quick check never meets (or resumes) a real run's campaigns
        args.out = (
            tempfile.mkdtemp(prefix="histoloop-defaults-quick-")
            if args.quick
            else "/tmp/histoloop-defaults"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {_machine()}", flush=True)
    table = [
        "| case | head | strategy | labels to 95 % of full (seeds reached) | × random | AULC | full "
        "supervision | stop signal: labels (% of full) | rounds to every class |",
        "|---|---|---|---:|---:|---:|---:|---|---:|",
    ]

    def cost(name: str) -> tuple[int, int, str]:  # cheap campaigns first
        kind = name.rsplit(".", 1)[1]
        return (
            0 if name.startswith("her2st") else 1,
            0 if kind.startswith("cold") or kind == "ssl" else 1,
            name,
        )

    ranked = sorted(cases(args.quick, args.genes_seeds).items(), key=lambda kv: cost(kv[0]))
    for name, (data, cfg) in ranked:
        if args.case and name not in args.case:
            continue
        if args.summarise:
            path = out / name / "comparison.json"
            if path.exists():
                table += summary(name, json.loads(path.read_text()))
            continue
        started = time.perf_counter()
        result = run_campaign(
            _load(data), cfg, out / name, workers=args.workers, resume=(out / name).exists()
        )
        assert result.comparison is not None
        print(
            f"{name}: {result.rounds_run} rounds in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        (out / f"{name}.md").write_text((out / name / "comparison.md").read_text())
        table += summary(name, result.comparison)
    text = "\n".join(table) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"machine": _machine()}, indent=1))
    print(text)
    print(f"machine after: {_machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
