"""Issue 17 in simulation: adaptive-resampling modes, the new strategies, ProbCover cold start, rater_disagreement.

Small campaigns (CPU is scarce) on DLPFC 151510 (500-gene counts, layer labels) and HER2+
ST section A1 (15,045-gene counts, pathologist labels), both from ``../shared/data``::

    nice .venv/bin/python benchmarks/bench_seeds.py            # everything, ~25 min on 2 busy cores
    nice .venv/bin/python benchmarks/bench_seeds.py --only ar  # one experiment
    nice .venv/bin/python benchmarks/bench_seeds.py --only hybrid,stopping  # the hybrid share, the stop thresholds
    .venv/bin/python benchmarks/bench_seeds.py --quick         # checks the script works (not a measurement)

``--quick`` runs every experiment on A1 (the small dataset, unless ``--data`` says otherwise)
with one seed, the first two campaigns of each experiment and a budget of two queries, into
a temporary folder (the tables in ``benchmarks/results/seeds`` are left alone).

Experiments (MLP head, warm start, 3 seeds, 30 PCs of log1p counts + 6-neighbour means):

* ``ar``: ``resampling`` off / offline / online (re-cluster the hidden layer every 5
  epochs) with the live loop's class-weighted loss, and offline / online with an
  unweighted loss (the AR paper's setting); entropy queries.
* ``strategies``: random, entropy, kmeans (closest to centroid), kmeans_far (far from
  centre), coreset, hybrid (share 0.7), BALD by MC-dropout (10 passes); every arm of this
  campaign trains the MLP with dropout 0.25 so BALD has something to sample.
* ``coldstart``: the initial set (one query of ``query_size``) by random, coldstart_kmeans,
  typiclust or probcover, then entropy.
* ``raters``: random, entropy and rater_disagreement with three simulated raters built from
  the real labels (``exact``; ``border``: half of the border spots get a neighbour's class;
  ``merge``: Layer6 → Layer5 on DLPFC, cancer in situ → invasive cancer on A1); the model
  still learns the real labels. Beside the learning curve: the share of each arm's picks
  where the simulated raters' labels differ (what rater_disagreement looks for).
* ``hybrid``: ``hybrid`` with the project setting
  ``hybrid_share`` 0.3 / 0.5 / 0.7 (the default) / 0.9, and random in the first campaign.
* ``stopping``: the project's default strategy up to 2,300 labels
  (DLPFC, 72 % of the pool) / 200 (A1, 84 %); every round records its pool predictions, so the stopping rule
  (``recommend_stop``) is replayed offline over a grid of ``stop_max_change`` ×
  ``stop_min_kappa`` × ``stop_patience``: the labels at the first recommendation and the
  metric there as a share of full supervision (same head and seed).

A1 drops the labels ``undetermined`` (5 spots, not a class) and ``immune infiltrate``
(2 spots: too few to split into pool and test). Writes ``benchmarks/results/seeds/*.md``
and prints the tables that ``benchmarks/README.md`` quotes.
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

from histoloop.acquisition.stopping import RoundPredictions, recommend_stop
from histoloop.presets import DEFAULTS
from histoloop.simulation import SimulationConfig, prepare_data, run_campaign
from histoloop.simulation._engine import _unpack

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results" / "seeds"
SEEDS = 3
AR_ARMS = (
    ("off", True),
    ("offline", True),
    ("online", True),
    ("offline", False),
    ("online", False),
)
"""(resampling, class_weighting): the live loop weights the loss by inverse class frequency; the AR
paper resamples instead, so the resampling modes also run with an unweighted loss."""
HYBRID_SHARES = (0.3, 0.5, 0.7, 0.9)
STOP_GRID = tuple(
    (change, kappa, patience)
    for change in (0.005, 0.01, 0.02)
    for kappa in (0.9, 0.95, 0.98)
    for patience in (1, 2, 3)
)
"""(stop_max_change, stop_min_kappa, stop_patience) replayed on the ``stopping`` campaigns."""


def dlpfc():
    """DLPFC 151510 as shipped (an ``.h5ad`` with ``obs['layer']``)."""
    import anndata as ad

    return ad.read_h5ad(SHARED / "dlpfc" / "151510" / "dlpfc151510_500genes.h5ad")


def her2st_a1():
    """HER2+ ST section A1: counts joined to the pathologist's labels and array positions."""
    import anndata as ad
    import pandas as pd

    folder = SHARED / "her2st" / "A1"
    counts = pd.read_csv(folder / "A1.tsv.gz", sep="\t", index_col=0)
    selection = pd.read_csv(folder / "A1_selection.tsv", sep="\t")
    labels = pd.read_csv(folder / "A1_labeled_coordinates.tsv", sep="\t")
    key = lambda x, y: f"{float(x):.3f}_{float(y):.3f}"  # noqa: E731
    label_of = {key(x, y): lab for x, y, lab in zip(labels.x, labels.y, labels.label, strict=True)}
    selection["label"] = [
        label_of.get(key(x, y)) for x, y in zip(selection.new_x, selection.new_y, strict=True)
    ]
    selection.index = [f"{x}x{y}" for x, y in zip(selection.x, selection.y, strict=True)]
    keep = selection[
        selection.label.notna() & ~selection.label.isin(["undetermined", "immune infiltrate"])
    ]
    keep = keep[keep.index.isin(counts.index)]
    obs = pd.DataFrame(
        {
            "label": keep.label.astype(str).to_numpy(),
            "array_row": keep.y.to_numpy(),
            "array_col": keep.x.to_numpy(),
        },
        index=keep.index,
    )
    X = counts.loc[keep.index].to_numpy(dtype=np.float32)
    return ad.AnnData(X=X, obs=obs)


DATASETS = {
    "dlpfc151510": dict(
        load=dlpfc,
        label_column="layer",
        query_size=46,
        budget=460,
        stop_budget=2300,
        raters=("exact", "border", "merge:Layer6:Layer5"),
    ),
    "her2st_a1": dict(
        load=her2st_a1,
        label_column="label",
        query_size=10,
        budget=100,
        stop_budget=200,
        raters=("exact", "border", "merge:cancer in situ:invasive cancer"),
    ),
}


def experiments(
    name: str, *, seeds: int = SEEDS, budget: int = 0
) -> dict[str, tuple[SimulationConfig, ...]]:
    """The campaigns of one dataset, by experiment (``budget``: 0 = the dataset's)."""
    d = DATASETS[name]
    base = dict(
        label_column=d["label_column"],
        pca=30,
        neighbours=6,
        heads=("mlp",),
        seeds=seeds,
        test_fraction=0.3,
        query_size=d["query_size"],
        budget=budget or d["budget"],
        metric="macro_f1",
    )
    ar = tuple(
        SimulationConfig(
            **base,
            strategies=("entropy",),
            hyperparameters={"mlp": {"resampling": mode, "class_weighting": weighted}},
        )
        for mode, weighted in AR_ARMS
    )
    strategies = (
        SimulationConfig(
            **base,
            strategies=("random", "entropy", "kmeans", "kmeans_far", "coreset", "hybrid", "bald"),
            hyperparameters={"mlp": {"dropout": 0.25, "mc_samples": 10}},
        ),
    )
    cold = tuple(
        SimulationConfig(
            **{**base, "budget": 3 * d["query_size"]},
            strategies=("entropy",),
            initial=initial,
            initial_size=d["query_size"],
        )
        for initial in ("random", "coldstart_kmeans", "typiclust", "probcover")
    )
    raters = (
        SimulationConfig(
            **base, strategies=("random", "entropy", "rater_disagreement"), raters=d["raters"]
        ),
    )
    hybrid = tuple(
        SimulationConfig(
            **base,
            strategies=("random", "hybrid") if i == 0 else ("hybrid",),
            loop={"hybrid_share": share},
        )
        for i, share in enumerate(HYBRID_SHARES)
    )
    stopping = (
        SimulationConfig(
            **{**base, "budget": 2 * budget or d["stop_budget"]}, strategies=(DEFAULTS["strategy"],)
        ),
    )
    return {
        "ar": ar,
        "strategies": strategies,
        "coldstart": cold,
        "raters": raters,
        "hybrid": hybrid,
        "stopping": stopping,
    }


def _records(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.rglob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def _summary(folder: Path, comparison: dict, label: str) -> list[dict]:
    records = [r for r in _records(folder) if r.get("strategy") != "full" and "round" in r]
    rows = []
    for row in comparison["rows"]:
        mine = [r for r in records if r["strategy"] == row["strategy"] and r["head"] == row["head"]]
        by_seed: dict[int, list[dict]] = {}
        for r in mine:
            by_seed.setdefault(r["seed"], []).append(r)
        first = [min(v, key=lambda r: r["round"])["macro_f1"] for v in by_seed.values()]
        last = [max(v, key=lambda r: r["round"])["macro_f1"] for v in by_seed.values()]
        rows.append(
            {
                "arm": label or row["strategy"],
                "strategy": row["strategy"],
                "aulc": row["aulc"]["mean"],
                "aulc_sd": row["aulc"]["sd"],
                "first": float(np.mean(first)),
                "last": float(np.mean(last)),
                "last_sd": float(np.std(last, ddof=1)) if len(last) > 1 else 0.0,
                "labels_first": min(r["labels"] for r in mine),
                "labels_last": max(r["labels"] for r in mine),
                "full": comparison["full_supervision"]["mlp"]["mean"],
                "ltt": row["labels_to_target"]["mean"],
                "ltt_sd": row["labels_to_target"]["sd"],
                "ltt_reached": row["labels_to_target"]["reached"],
                "seeds": row["labels_to_target"]["seeds"],
                "train_s": row["train_seconds_mean"],
                "query_s": row["query_seconds_mean"],
            }
        )
    return rows


def _table(rows: list[dict]) -> str:
    lines = [
        "| arm | AULC (mean ± sd) | macro-F1 first round | macro-F1 last round (± sd) | labels first → last "
        "| labels to 95 % of full (seeds reaching) | full supervision | train / query s per round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: -r["aulc"]):
        bound = (
            "≥ " if r["ltt_reached"] < r["seeds"] else ""
        )  # a seed that never reached it counts its last labels
        ltt = "never" if r["ltt"] is None else f"{bound}{r['ltt']:.0f} ± {r['ltt_sd'] or 0:.0f}"
        lines.append(
            f"| {r['arm']} | {r['aulc']:.3f} ± {r['aulc_sd']:.3f} | {r['first']:.3f} | "
            f"{r['last']:.3f} ± {r['last_sd']:.3f} | {r['labels_first']} → {r['labels_last']} | "
            f"{ltt} ({r['ltt_reached']}/{r['seeds']}) | {r['full']:.3f} | "
            f"{r['train_s']:.2f} / {r['query_s']:.3f} |"
        )
    return "\n".join(lines)


def _stop_grid(folder: Path, metric: str = "macro_f1") -> str:
    """Replay the stopping rule on every run's recorded pool predictions, per grid setting."""
    records = _records(folder)
    full = {r["seed"]: r[metric] for r in records if r.get("strategy") == "full"}
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        if r.get("strategy") not in (None, "full") and r.get("pool_predicted"):
            runs.setdefault((r["strategy"], r["seed"]), []).append(r)
    lines = [
        "| stop_max_change | stop_min_kappa | stop_patience | runs stopped | labels at the first "
        "recommendation (mean ± sd) | metric there, % of full supervision (mean ± sd) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for change, kappa, patience in STOP_GRID:
        labels, shares = [], []
        for (_, seed), rounds in sorted(runs.items()):
            rounds = sorted(rounds, key=lambda r: r["round"])
            history = [RoundPredictions(predicted=_unpack(r["pool_predicted"])) for r in rounds]
            first = next(
                (
                    i
                    for i in range(len(rounds))
                    if recommend_stop(
                        history[: i + 1], max_change=change, min_kappa=kappa, patience=patience
                    ).stop
                ),
                None,
            )
            if first is not None:
                labels.append(rounds[first]["labels"])
                shares.append(100 * rounds[first][metric] / full[seed])
        sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
        there = (
            f"{np.mean(labels):.0f} ± {sd(labels):.0f} | {np.mean(shares):.1f} ± {sd(shares):.1f}"
            if labels
            else "— | —"
        )
        lines.append(
            f"| {change:g} | {kappa:g} | {patience} | {len(labels)}/{len(runs)} | {there} |"
        )
    last = [
        100 * max(v, key=lambda r: r["round"])[metric] / full[seed] for (_, seed), v in runs.items()
    ]
    end = max(r["labels"] for v in runs.values() for r in v) if runs else 0
    return (
        "\n".join(lines)
        + f"\n\nAt the end of the budget ({end} labels): {np.mean(last):.1f} % of full supervision."
    )


def _disputed(folder: Path, data, config: SimulationConfig) -> str:
    """Per arm, the share of its picks (after the initial set) where the simulated raters differ."""
    labels = np.stack([given for _, given in prepare_data(data, config).problem.raters])
    differ = (labels != labels[0]).any(axis=0)
    records = [
        r
        for r in _records(folder)
        if r.get("strategy") not in (None, "full") and r.get("round", 0) > 0
    ]
    lines = [
        "| arm | picks where the raters differ (mean ± sd over seeds) | all spots |",
        "|---|---:|---:|",
    ]
    for strategy in config.strategies:
        shares = [
            float(
                differ[
                    [
                        i
                        for r in records
                        if r["strategy"] == strategy and r["seed"] == seed
                        for i in r["picked"]
                    ]
                ].mean()
            )
            for seed in range(config.seeds)
        ]
        sd = float(np.std(shares, ddof=1)) if len(shares) > 1 else 0.0
        lines.append(f"| {strategy} | {np.mean(shares):.3f} ± {sd:.3f} | {differ.mean():.3f} |")
    return "\n".join(lines)


def _machine() -> str:
    model = "unknown CPU"
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} × {model}, Python {platform.python_version()}, load average {load}"


def main() -> int:
    """Run the chosen experiments on the chosen datasets and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default="ar,strategies,coldstart,raters,hybrid,stopping",
        help="experiments (comma-separated)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="datasets (comma-separated; default: all, her2st_a1 with --quick)",
    )
    parser.add_argument("--out", default="/tmp/histoloop-bench-seeds", help="campaign folders")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run that checks the script works (make bench; "
        "not a measurement): A1, 1 seed, 2 campaigns per experiment, 2 queries, a temporary folder",
    )
    args = parser.parse_args()
    seeds, results = SEEDS, RESULTS
    if args.quick:
        seeds, results = 1, Path(tempfile.mkdtemp(prefix="bench-seeds-quick-"))
        args.out, args.workers = str(results / "campaigns"), 1
        args.data = args.data or "her2st_a1"
    args.data = args.data or ",".join(DATASETS)
    results.mkdir(parents=True, exist_ok=True)
    for data_name in args.data.split(","):
        data = DATASETS[data_name]["load"]()
        for exp_name in args.only.split(","):
            t0 = time.perf_counter()
            rows: list[dict] = []
            extra = ""
            if args.quick:
                configs = experiments(
                    data_name, seeds=1, budget=2 * DATASETS[data_name]["query_size"]
                )[exp_name][:2]
            else:
                configs = experiments(data_name)[exp_name]
            for config in configs:
                label = ""
                if exp_name == "ar":
                    hp = config.hyperparameters["mlp"]
                    label = f"resampling={hp['resampling']}" + (
                        "" if hp["class_weighting"] else ", unweighted loss"
                    )
                elif exp_name == "coldstart":
                    label = f"initial={config.initial}"
                elif exp_name == "hybrid":
                    label = f"hybrid_share={config.loop['hybrid_share']}"
                result = run_campaign(
                    data,
                    config,
                    root=Path(args.out) / data_name / exp_name,
                    workers=args.workers,
                    resume=True,
                    progress=False,
                )
                assert result.comparison is not None
                rows += [
                    {**r, "arm": r["strategy"]} if r["strategy"] == "random" else r
                    for r in _summary(result.folder, result.comparison, label)
                ]
                if exp_name == "raters":
                    extra += f"Simulated raters {', '.join(config.raters)}:\n\n{_disputed(result.folder, data, config)}\n\n"
                if exp_name == "stopping":
                    extra += f"Stopping rule replayed on the recorded rounds:\n\n{_stop_grid(result.folder)}\n\n"
            wall = time.perf_counter() - t0
            text = (
                f"### {data_name}: {exp_name}\n\n{_table(rows)}\n\n{extra}"
                f"{seeds} seeds; {wall:.0f} s wall on {_machine()}.\n"
            )
            (results / f"{data_name}_{exp_name}.md").write_text(text)
            (results / f"{data_name}_{exp_name}.json").write_text(json.dumps(rows, indent=1))
            print(text, flush=True)
    if args.quick:
        print(f"(quick: written to {results}, not to {RESULTS})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
