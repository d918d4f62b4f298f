"""Strategy comparison on DLPFC 151510, from scratch: the campaign behind benchmarks/README.md.

One command runs every arm, writes the campaign folder (records, plots, tables) and copies
the reference outputs to ``benchmarks/results/dlpfc151510/``::

    .venv/bin/python benchmarks/bench_simulation.py

Setup (the issue's plain loop is the ``entropy`` / ``logreg`` row): 30 PCs of the
log1p-normalised counts plus the mean of the 6 nearest spots' PCs (60 features), one seed
label per class, a stratified 70/30 pool/test split, 5 seeds, 46 spots per round up to
50 % of the pool (1,608 labels), then rounds to 60/70/80/90 %. Heads: logistic regression
and the ActiveVisium MLP with every strategy except BALD; BALD on a 3-member MLP ensemble,
with random on the same ensemble as its baseline. Running it twice gives the same numbers
(timings aside); ``--check`` reruns the logistic-regression arms in a second folder and
compares them record by record.

``--sample her2st-a1`` runs the morphology campaign on section A1 instead (``her2st_a1.py``,
outputs copied to ``benchmarks/results/her2st_a1/``). ``--quick`` (with either sample) runs a
tiny campaign in a new temporary folder and copies nothing: it checks that the script works::

    .venv/bin/python benchmarks/bench_simulation.py --sample her2st-a1 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from histoloop.simulation import SimulationConfig, default_strategies, run_campaign

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
DATA = SHARED / "dlpfc" / "151510" / "dlpfc151510_500genes.h5ad"
RESULTS = REPO / "benchmarks" / "results" / "dlpfc151510"
COPIED = (
    "learning_curves.png",
    "efficiency.png",
    "comparison.md",
    "comparison.json",
    "vs_reference_loop.md",
)
REFERENCE = ("logreg", "entropy")  # the plain loop
QUICK_A1 = {
    "seeds": 1,
    "views": 1,
    "quiet_views": 1,
    "feature_sets": ("efficientnet", "multimodal"),
    "strategies": ("activevisium",),
    "budget": 25,
    "schedule": (),
}
"""``run_a1`` options of ``--sample her2st-a1 --quick``: every step of the A1 run, on all its
spots, at the smallest size (two feature sets so that the summary compares something)."""


def config(seeds: int = 5) -> SimulationConfig:
    """The benchmark campaign."""
    plain = [s for s in default_strategies("mlp")]  # every strategy but BALD
    strategies = (
        [f"{s}@logreg" for s in plain]
        + [f"{s}@mlp" for s in plain]
        + ["bald@ensemble", "random@ensemble"]
    )
    return SimulationConfig(
        label_column="layer",
        pca=30,
        neighbours=6,
        heads=("logreg", "mlp", "ensemble"),
        strategies=tuple(strategies),
        seeds=seeds,
        test_fraction=0.3,
        initial="per_class",
        query_size=46,
        budget=1608,
        schedule=(0.6, 0.7, 0.8, 0.9),
        metric="macro_f1",
        target=0.95,
        hyperparameters={"ensemble": {"members": 3}},
    )


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} × {model}, Python {platform.python_version()}, load average {load}"


def vs_reference_loop(comparison: dict) -> str:
    """Every arm against the issue's plain loop (entropy / logreg), paired across seeds."""
    from scipy import stats

    rows = {(r["head"], r["strategy"]): r for r in comparison["rows"]}
    ref = rows[REFERENCE]["labels_to_target"]["per_seed"]
    lines = [
        "| strategy | head | labels to target (mean) | minus the reference loop's, per seed | mean "
        "difference | p Wilcoxon | p paired t |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for key, row in sorted(rows.items(), key=lambda kv: kv[1]["labels_to_target"]["mean"]):
        if key == REFERENCE:
            continue
        mine = row["labels_to_target"]["per_seed"]
        diff = [a - b for a, b in zip(mine, ref, strict=True)]
        p_w = p_t = "—"
        if any(diff):
            p_w = f"{stats.wilcoxon(mine, ref).pvalue:.3f}"
            p_t = f"{stats.ttest_rel(mine, ref).pvalue:.3f}"
        lines.append(
            f"| {key[1]} | {key[0]} | {row['labels_to_target']['mean']:.0f} | "
            f"{', '.join(f'{d:+.0f}' for d in diff)} | {sum(diff) / len(diff):+.0f} | {p_w} | {p_t} |"
        )
    return (
        f"Reference loop: {REFERENCE[1]} / {REFERENCE[0]} needs "
        f"{rows[REFERENCE]['labels_to_target']['mean']:.0f} labels on average "
        f"(per seed {', '.join(f'{v:.0f}' for v in ref)}). Negative = fewer labels than the loop.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def _numbers(folder: Path, head: str) -> list[dict]:
    out = []
    for line in (folder / "rounds.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["head"] == head:
            out.append({k: v for k, v in rec.items() if not k.endswith("_seconds")})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", default="/tmp/histoloop-sim-dlpfc151510", help="campaign folder")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument("--resume", action="store_true", help="continue the campaign in --out")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--results",
        default=str(RESULTS),
        help="where the reference outputs are copied ('' = no copy)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny campaign in a temporary folder that checks the script works (not the reference)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="afterwards rerun the logreg arms in a second folder and compare the numbers",
    )
    parser.add_argument(
        "--sample",
        choices=("dlpfc151510", "her2st-a1"),
        default="dlpfc151510",
        help="her2st-a1: the morphology campaign on real labelled H&E (see her2st_a1.py)",
    )
    parser.add_argument("--views", type=int, default=10, help="her2st-a1: augmented views per spot")
    args = parser.parse_args()
    if args.sample == "her2st-a1":
        return _her2st_a1(args)
    campaign = config(args.seeds)
    if args.quick:
        args.out, args.fresh, args.results, args.check = (
            tempfile.mkdtemp(prefix="bench-sim-quick-"),
            True,
            "",
            False,
        )
        args.workers = 1
        campaign = SimulationConfig(
            label_column="layer",
            pca=10,
            neighbours=6,
            heads=("logreg",),
            strategies=("random@logreg", "entropy@logreg"),
            seeds=1,
            query_size=46,
            rounds=2,
            metric="macro_f1",
            target=0.95,
        )
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    print(f"machine: {_machine()}", flush=True)
    started = time.perf_counter()
    result = run_campaign(args.data, campaign, out, workers=args.workers, resume=args.resume)
    wall = time.perf_counter() - started
    print((out / "comparison.md").read_text())
    versus = vs_reference_loop(json.loads((out / "comparison.json").read_text()))
    (out / "vs_reference_loop.md").write_text(versus)
    print(versus)
    print(
        f"campaign {result.campaign_id}: {result.rounds_run} rounds in {wall:.0f} s wall "
        f"({args.workers} workers); machine after: {_machine()}"
    )
    if args.results:
        target = Path(args.results)
        target.mkdir(parents=True, exist_ok=True)
        for name in COPIED:
            shutil.copyfile(out / name, target / name)
        print(f"copied {', '.join(COPIED)} to {target}")
    if args.check:
        check_out = out.with_name(out.name + "-check")
        if check_out.exists():
            shutil.rmtree(check_out)
        base = config(args.seeds)
        logreg_only = SimulationConfig(
            **{
                **base.__dict__,
                "heads": ("logreg",),
                "strategies": tuple(s for s in base.strategies if s.endswith("@logreg")),
                "hyperparameters": {},
            }
        )
        run_campaign(args.data, logreg_only, check_out, workers=args.workers, progress=False)
        same = _numbers(out, "logreg") == _numbers(check_out, "logreg")
        print(f"check: logreg records of a second run {'identical' if same else 'DIFFER'}")
        return 0 if same else 1
    return 0


def _her2st_a1(args: argparse.Namespace) -> int:
    """The A1 campaign: features × strategies × seeds, and the views experiment."""
    from her2st_a1 import run_a1

    options: dict[str, Any] = {"seeds": args.seeds, "views": args.views}
    if args.quick:
        args.out, args.results, args.workers = tempfile.mkdtemp(prefix="bench-sim-a1-quick-"), "", 1
        options = QUICK_A1
    out = Path(args.out if args.out != parser_default_out() else "/tmp/histoloop-sim-her2st-a1")
    if args.fresh and out.exists():
        shutil.rmtree(out)
    print(f"machine: {_machine()}", flush=True)
    started = time.perf_counter()
    text = run_a1(
        SHARED / "her2st" / "A1", out, **options, workers=args.workers, resume=args.resume
    )
    print(text)
    curves = sorted(str(p) for p in out.glob("*/learning_curves.png"))
    print(f"learning curves: {', '.join(curves)}")
    print(
        f"A1 campaign in {time.perf_counter() - started:.0f} s wall ({args.workers} workers); "
        f"machine after: {_machine()}"
    )
    if args.results:
        target = REPO / "benchmarks" / "results" / "her2st_a1"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "a1_summary.md", target / "a1_summary.md")
        for name in ("efficientnet", "multimodal"):
            shutil.copyfile(
                out / name / "learning_curves.png", target / f"learning_curves_{name}.png"
            )
        print(f"copied the summary and curves to {target}")
    return 0


def parser_default_out() -> str:
    """The DLPFC campaign folder (the default of --out)."""
    return "/tmp/histoloop-sim-dlpfc151510"


if __name__ == "__main__":
    sys.exit(main())
