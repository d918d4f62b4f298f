"""A finished campaign's comparison table (JSON, Markdown, LaTeX) and plots.

How the numbers are made (also written into ``comparison.json`` and the Markdown):

* **Full supervision** of a head and seed: the reference model trained to convergence on
  every pool label; where an arm's own round reaches the whole pool with a better
  metric, that model is full supervision too and the better of the two is the yardstick
  (``full_supervision.<head>.from_arms`` counts the seeds where that happened), so the
  yardstick is never below a model of the same head trained on every pool label.

* **Learning curve** of one run: the metric on the test split after each round against
  the labelled fraction of the training pool.
* **Metric at x % labelled**: linear interpolation on each seed's curve between the two
  rounds around x (undefined outside the curve), then mean ± sd over seeds.
* **AULC**: trapezoidal area under the curve divided by the width of the fraction range
  (the same range for every arm), i.e. the curve's mean height, in metric units.
* **Labels to target**: the labelled-set size of the first round whose metric reaches
  ``target × full supervision`` of the same head and seed (resolution: one round). A
  seed that never reaches it counts as the campaign's last label count, and the value is
  marked as a lower bound (``≥``).
* **Ratio to random**: mean labels-to-target of the arm / that of ``random`` with the
  same head (``≤``/``≥`` when one side is a bound).
* **Censored seeds**: for each seed that never reaches the target, the table lists its
  best metric, the target it missed and the labels it had at the end, so a ``≥`` is
  explained rather than hidden.
* **Stopping signal**: the first round where the live loop's stopping signal (pool
  predictions stable for two round pairs) recommends stopping; the table gives its
  labels and the metric there as a share of full supervision ("how far from full
  supervision when told to stop"), over the seeds where it fired.
* **Every class labelled**: the first round after which every class has at least one
  label (0 = the initial set), mean ± sd over the seeds where it happened.
* **Gain over random**: per-seed paired differences (AULC; labels saved), with the
  Wilcoxon signed-rank test (exact, two-sided) and the paired t-test. With 5 seeds the
  Wilcoxon test cannot go below p = 0.0625 and neither test has much power: read the
  p-values as a sanity check, not as proof.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histoloop.simulation._engine import FULL

__all__: list[str] = []  # private module; the public API is histoloop.simulation

FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
_METRIC_NAMES = {
    "macro_f1": "macro-F1",
    "balanced_accuracy": "balanced accuracy",
    "accuracy": "accuracy",
    "kappa": "Cohen's kappa",
}
METHOD = {
    "metric_at": "linear interpolation on each seed's learning curve (metric vs labelled fraction of the "
    "pool) between the rounds around the fraction; undefined outside the curve; mean ± sd "
    "(ddof 1) over seeds",
    "aulc": "trapezoidal area under the learning curve divided by the width of its fraction range "
    "(the mean height of the curve); the same range for every arm",
    "labels_to_target": "labels of the first round whose metric reaches target × the full-supervision "
    "metric of the same head and seed; a seed that never reaches it counts as the last "
    "label count and the mean is a lower bound (censored)",
    "full_supervision": "the reference trained to convergence on every pool label (same head, features, "
    "scaling; early stopping on a validation split, learning rate annealed), or an arm's round "
    "at 100 % of the pool where that scored higher (counted in from_arms)",
    "ratio_to_random": "mean labels-to-target of the arm / mean labels-to-target of random with the same head",
    "stop": "first round whose stopping signal (the live loop's: ≤ 1 % of pool predictions changed and "
    "kappa ≥ 0.95 between consecutive rounds, twice in a row) recommends stopping; its labels and "
    "its metric as a share of the same seed's full-supervision metric, mean ± sd over the seeds where "
    "it fired",
    "all_classes": "first round (0 = the initial set) after which every class has a label, mean ± sd over "
    "the seeds where that happened",
    "censored": "seeds that never reach the target: their best metric, the target and the labels at the end",
    "test": "paired across seeds: Wilcoxon signed-rank (exact, two-sided) and paired t-test (scipy); with "
    "5 seeds the smallest possible Wilcoxon p is 0.0625 and both tests have little power",
}


def _mean_sd(values: Sequence[float]) -> dict[str, float | int | None]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "n": int(len(v)),
    }


def _paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean of ``a − b`` and two paired p-values (None where undefined)."""
    from scipy import stats

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    out: dict[str, Any] = {
        "mean": float(d.mean()) if len(d) else None,
        "n": int(len(d)),
        "p_wilcoxon": None,
        "p_ttest": None,
    }
    if len(d) < 2:
        return out
    if np.allclose(d, 0.0):
        out["p_wilcoxon"] = out["p_ttest"] = 1.0
        return out
    try:
        out["p_wilcoxon"] = float(stats.wilcoxon(a, b, alternative="two-sided").pvalue)
    except ValueError:
        pass
    if np.std(d) > 0:
        out["p_ttest"] = float(stats.ttest_rel(a, b).pvalue)
    return out


def _aulc(f: np.ndarray, v: np.ndarray) -> float:
    if len(f) < 2 or f[-1] <= f[0]:
        return float(v[0])
    return float(np.sum((v[1:] + v[:-1]) * 0.5 * np.diff(f)) / (f[-1] - f[0]))


def _at(f: np.ndarray, v: np.ndarray, x: float) -> float | None:
    if x < f[0] - 1e-12 or x > f[-1] + 1e-12:
        return None
    return float(np.interp(x, f, v))


def compare(
    records: Sequence[dict[str, Any]], meta: dict[str, Any], metric: str, target: float
) -> dict[str, Any]:
    """The comparison table of a finished campaign (see the module docstring)."""
    full: dict[tuple[str, int], float] = {}
    runs: dict[tuple[str, str], dict[int, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for rec in records:
        if rec["strategy"] == FULL:
            full[(rec["head"], rec["seed"])] = rec[metric]
        else:
            runs[(rec["head"], rec["strategy"])][rec["seed"]].append(rec)
    seeds = sorted({s for _, s in full})
    from_arms: dict[str, int] = defaultdict(int)
    for key in list(full):  # an arm's model on the whole pool is full supervision too
        at_pool = [
            r[metric]
            for by_seed in (v for (h, _), v in runs.items() if h == key[0])
            for r in by_seed.get(key[1], [])
            if r["labels"] >= meta["pool_size"]
        ]
        if at_pool and max(at_pool) > full[key]:
            full[key] = max(at_pool)
            from_arms[key[0]] += 1
    heads = list(dict.fromkeys(h for h, _ in meta["arms"]))
    last_labels = meta["targets"][-1]
    pool = meta["pool_size"]

    per_arm: dict[tuple[str, str], dict[str, Any]] = {}
    for (head, strategy), by_seed in runs.items():
        aulc, ltt, reached, at = [], [], [], defaultdict(list)
        qs, ts, ps = [], [], []
        censored, stop_labels, stop_share, all_classes = [], [], [], []
        for seed in seeds:
            recs = sorted(by_seed[seed], key=lambda r: r["round"])
            f = np.array([r["fraction"] for r in recs])
            v = np.array([r[metric] for r in recs], dtype=np.float64)
            aulc.append(_aulc(f, v))
            for x in FRACTIONS:
                at[x].append(_at(f, v, x))
            goal = target * full[(head, seed)]
            hit = next((r["labels"] for r in recs if r[metric] >= goal - 1e-12), None)
            reached.append(hit is not None)
            ltt.append(float(hit if hit is not None else last_labels))
            if hit is None:
                censored.append(
                    {
                        "seed": seed,
                        "best": float(v.max()),
                        "target": float(goal),
                        "labels": int(recs[-1]["labels"]),
                    }
                )
            covered = next(
                (r["round"] for r in recs if r.get("classes_labelled", 0) >= len(meta["classes"])),
                None,
            )
            if covered is not None:
                all_classes.append(float(covered))
            stop = next((r for r in recs if r.get("stop")), None)
            if stop is not None:
                stop_labels.append(float(stop["labels"]))
                stop_share.append(
                    float(stop[metric]) / full[(head, seed)] if full[(head, seed)] else float("nan")
                )
            qs += [r["query_seconds"] for r in recs[1:]]
            ts += [r["train_seconds"] for r in recs]
            ps += [r.get("predict_seconds", 0.0) for r in recs[1:]]
        per_arm[(head, strategy)] = {
            "aulc": aulc,
            "ltt": ltt,
            "reached": reached,
            "at": at,
            "query_s": qs,
            "train_s": ts,
            "predict_s": ps,
            "censored": censored,
            "stop_labels": stop_labels,
            "stop_share": stop_share,
            "all_classes": all_classes,
        }

    rows = []
    for head, strategy in [tuple(a) for a in meta["arms"]]:
        arm = per_arm[(head, strategy)]
        base = per_arm.get((head, "random"))
        stat = _mean_sd(arm["ltt"])
        is_censored = not all(arm["reached"])
        row: dict[str, Any] = {
            "strategy": strategy,
            "head": head,
            "metric_at": {
                f"{x:g}": _mean_sd([a for a in arm["at"][x] if a is not None]) for x in FRACTIONS
            },
            "aulc": _mean_sd(arm["aulc"]),
            "labels_to_target": {
                **stat,
                "reached": int(sum(arm["reached"])),
                "seeds": len(seeds),
                "censored": is_censored,
                "per_seed": arm["ltt"],
                "fraction_of_pool": None if stat["mean"] is None else stat["mean"] / pool,
            },
            "ratio_to_random": None,
            "ratio_bound": None,
            "aulc_gain": None,
            "labels_saved": None,
            "censored_seeds": arm["censored"],
            "all_classes_round": {**_mean_sd(arm["all_classes"]), "seeds": len(arm["all_classes"])},
            "stop": {
                "seeds": len(arm["stop_labels"]),
                "labels": _mean_sd(arm["stop_labels"]),
                "share_of_full": _mean_sd(arm["stop_share"]),
            },
            "query_seconds_mean": float(np.mean(arm["query_s"])) if arm["query_s"] else 0.0,
            "train_seconds_mean": float(np.mean(arm["train_s"])) if arm["train_s"] else 0.0,
            "predict_seconds_mean": float(np.mean(arm["predict_s"])) if arm["predict_s"] else 0.0,
        }
        if base is not None:
            base_mean = float(np.mean(base["ltt"]))
            base_censored = not all(base["reached"])
            if stat["mean"] is not None and base_mean > 0 and not (is_censored and base_censored):
                row["ratio_to_random"] = stat["mean"] / base_mean
                row["ratio_bound"] = {(False, False): "=", (True, False): "≥", (False, True): "≤"}[
                    (is_censored, base_censored)
                ]
            if strategy != "random":
                row["aulc_gain"] = _paired(arm["aulc"], base["aulc"])
                row["labels_saved"] = _paired(base["ltt"], arm["ltt"])
        rows.append(row)
    return {
        "campaign_id": meta["campaign_id"],
        "metric": metric,
        "target_share": target,
        "pool_size": pool,
        "test_size": meta["test_size"],
        "initial_size": meta["initial_size"],
        "n_rounds": len(meta["targets"]),
        "last_labels": last_labels,
        "seeds": seeds,
        "heads": heads,
        "fractions": list(FRACTIONS),
        "method": METHOD,
        "full_supervision": {
            h: {
                **_mean_sd([full[(h, s)] for s in seeds]),
                "per_seed": [full[(h, s)] for s in seeds],
                "from_arms": from_arms[h],
            }
            for h in heads
        },
        "rows": rows,
    }


# --------------------------------------------------------------------------- tables


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _pm(stat: dict[str, Any], digits: int = 3) -> str:
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _p(x: float | None) -> str:
    return "—" if x is None else (f"{x:.3f}" if x >= 0.001 else "<0.001")


def _sorted_rows(comparison: dict[str, Any]) -> list[dict[str, Any]]:
    order = {h: i for i, h in enumerate(comparison["heads"])}
    return sorted(
        comparison["rows"],
        key=lambda r: (
            order[r["head"]],
            r["labels_to_target"]["mean"] or 0,
            -(r["aulc"]["mean"] or 0),
            r["strategy"],
        ),
    )


def _cells(row: dict[str, Any], comparison: dict[str, Any]) -> list[str]:
    ltt = row["labels_to_target"]
    bound = "≥ " if ltt["censored"] else ""
    ratio = row["ratio_to_random"]
    rb = row["ratio_bound"] if row["ratio_bound"] not in (None, "=") else ""
    gain = row["aulc_gain"]
    gain_s = (
        "—"
        if gain is None
        else (f"{gain['mean']:+.3f} (p {_p(gain['p_wilcoxon'])} / {_p(gain['p_ttest'])})")
    )
    saved = row["labels_saved"]
    saved_s = (
        "—"
        if saved is None
        else f"{saved['mean']:+.0f} (p {_p(saved['p_wilcoxon'])} / {_p(saved['p_ttest'])})"
    )
    return [
        row["strategy"],
        row["head"],
        f"{bound}{ltt['mean']:.0f} ± {ltt['sd']:.0f}"
        + ("" if not ltt["censored"] else f" ({ltt['reached']}/{ltt['seeds']} reached)"),
        f"{bound}{100 * ltt['fraction_of_pool']:.1f} %",
        "—" if ratio is None else f"{rb}{ratio:.2f}×",
        _pm(row["aulc"]),
        gain_s,
        saved_s,
        *[_num(row["metric_at"][f"{x:g}"]["mean"]) for x in comparison["fractions"]],
        _stop_cell(row, comparison),
        f"{row['query_seconds_mean']:.3f} / {row['train_seconds_mean']:.3f}",
    ]


def _stop_cell(row: dict[str, Any], comparison: dict[str, Any]) -> str:
    stop = row.get("stop") or {"seeds": 0}
    n = len(comparison["seeds"])
    if not stop["seeds"]:
        return f"never (0/{n})"
    return (
        f"{stop['labels']['mean']:.0f} labels, {100 * stop['share_of_full']['mean']:.1f} % of full "
        f"({stop['seeds']}/{n})"
    )


def _header(comparison: dict[str, Any]) -> list[str]:
    m = _METRIC_NAMES.get(comparison["metric"], comparison["metric"])
    share = f"{100 * comparison['target_share']:g} %"
    return [
        "strategy",
        "head",
        f"labels to {share} of full {m} (mean ± sd)",
        "% of pool",
        "× random",
        f"AULC ({m})",
        "AULC gain vs random (p Wilcoxon / t)",
        "labels saved vs random (p W / t)",
        *[f"{m} @ {100 * x:g} %" for x in comparison["fractions"]],
        "stop signal: labels, % of full (seeds)",
        "query / train s per round",
    ]


def to_markdown(comparison: dict[str, Any]) -> str:
    """The comparison as a Markdown table with its footnotes."""
    head = _header(comparison)
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|",
    ]
    for row in _sorted_rows(comparison):
        lines.append("| " + " | ".join(_cells(row, comparison)) + " |")
    for h, fs in comparison["full_supervision"].items():
        vals = [
            "full supervision",
            h,
            f"{comparison['pool_size']}",
            "100 %",
            "",
            _pm(fs),
            "",
            "",
            *(["—"] * len(comparison["fractions"])),
            "",
            "",
        ]
        lines.append("| " + " | ".join(vals) + " |")
    m = _METRIC_NAMES.get(comparison["metric"], comparison["metric"])
    notes = [
        "",
        f"Pool {comparison['pool_size']} spots, test split {comparison['test_size']} spots, "
        f"{len(comparison['seeds'])} seeds, {comparison['n_rounds']} rounds from {comparison['initial_size']} "
        f"to {comparison['last_labels']} labels. Full supervision = a model trained on every pool label; "
        f"its test {m} is in the AULC column (the height of a flat curve).",
        "",
        *[f"- **{k.replace('_', ' ')}**: {v}" for k, v in comparison["method"].items()],
        *_censored_notes(comparison),
    ]
    return "\n".join(lines + notes) + "\n"


def _censored_notes(comparison: dict[str, Any]) -> list[str]:
    """One line per arm with seeds that never reached the target (why its mean is a bound)."""
    lines = []
    for row in _sorted_rows(comparison):
        seeds = row.get("censored_seeds") or []
        if seeds:
            parts = "; ".join(
                f"seed {c['seed']}: best {c['best']:.3f} < target {c['target']:.3f} after "
                f"{c['labels']} labels"
                for c in seeds
            )
            lines.append(f"- censored, {row['strategy']} / {row['head']}: {parts}")
    return (
        [
            "",
            "Seeds that never reached the target (their labels-to-target counts as the last label count):",
            *lines,
        ]
        if lines
        else []
    )


def _tex(s: str) -> str:
    s = s.replace("\\", "\\textbackslash{}")
    for a, b in (("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#")):
        s = s.replace(a, b)
    for a, b in (
        ("±", "$\\pm$"),
        ("×", "$\\times$"),
        ("≥", "$\\geq$"),
        ("≤", "$\\leq$"),
        ("—", "--"),
        ("<", "$<$"),
    ):
        s = s.replace(a, b)
    return s


def to_latex(comparison: dict[str, Any]) -> str:
    """The comparison as a LaTeX ``tabular`` (booktabs)."""
    head = _header(comparison)
    cols = "ll" + "r" * (len(head) - 2)
    out = [
        "% generated by histoloop simulate; needs \\usepackage{booktabs}",
        f"\\begin{{tabular}}{{{cols}}}",
        "\\toprule",
        " & ".join(_tex(h) for h in head) + " \\\\",
        "\\midrule",
    ]
    for row in _sorted_rows(comparison):
        out.append(" & ".join(_tex(c) for c in _cells(row, comparison)) + " \\\\")
    out.append("\\midrule")
    for h, fs in comparison["full_supervision"].items():
        cells = [
            "full supervision",
            h,
            str(comparison["pool_size"]),
            "100 %",
            "",
            _pm(fs),
            "",
            "",
            *(["—"] * len(comparison["fractions"])),
            "",
            "",
        ]
        out.append(" & ".join(_tex(c) for c in cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- plots


def _colours(strategies: Sequence[str]) -> dict[str, tuple[Any, str]]:
    import matplotlib.pyplot as plt

    palette = [plt.get_cmap("tab10")(i) for i in range(10)] + [
        plt.get_cmap("Dark2")(i) for i in range(8)
    ]
    markers = "osD^v<>pPX*h"
    out: dict[str, tuple[Any, str]] = {}
    others = [s for s in strategies if s != "random"]
    for i, s in enumerate(others):
        out[s] = (palette[i % len(palette)], markers[i % len(markers)])
    out["random"] = ((0.0, 0.0, 0.0), "x")
    return out


def plot_learning_curves(
    path: Path, records: Sequence[dict[str, Any]], comparison: dict[str, Any]
) -> None:
    """Metric vs labelled fraction, mean ± sd over seeds, one panel per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    metric = comparison["metric"]
    heads = comparison["heads"]
    strategies = sorted({r["strategy"] for r in comparison["rows"]})
    style = _colours(strategies)
    curves: dict[tuple[str, str], dict[int, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for rec in records:
        if rec["strategy"] != FULL:
            curves[(rec["head"], rec["strategy"])][rec["seed"]].append(
                (rec["fraction"], rec[metric])
            )
    fig, axes = plt.subplots(
        1, len(heads), figsize=(5.6 * len(heads) + 1.8, 5.4), dpi=120, squeeze=False, sharey=True
    )
    name = _METRIC_NAMES.get(metric, metric)
    for ax, head in zip(axes[0], heads, strict=True):
        for strategy in strategies:
            by_seed = curves.get((head, strategy))
            if not by_seed:
                continue
            series = [sorted(v) for _, v in sorted(by_seed.items())]
            f = np.array([p[0] for p in series[0]])
            v = np.array([[p[1] for p in s] for s in series])
            mean, sd = v.mean(axis=0), v.std(axis=0, ddof=1) if len(v) > 1 else np.zeros(v.shape[1])
            colour, marker = style[strategy]
            ax.plot(
                100 * f,
                mean,
                color=colour,
                marker=marker,
                markersize=3,
                lw=1.6 if strategy == "random" else 1.2,
                ls="-",
                label=strategy,
                markevery=max(1, len(f) // 12),
            )
            ax.fill_between(100 * f, mean - sd, mean + sd, color=colour, alpha=0.12, lw=0)
        fs = comparison["full_supervision"][head]["mean"]
        ax.axhline(fs, color="0.2", ls="--", lw=1.2, label="full supervision")
        ax.axhline(
            comparison["target_share"] * fs,
            color="0.5",
            ls=":",
            lw=1.0,
            label=f"{100 * comparison['target_share']:g} % of full",
        )
        lo = 100 * comparison["initial_size"] / comparison["pool_size"]
        hi = 100 * comparison["last_labels"] / comparison["pool_size"]
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.15, hi * 1.15)
        ax.set_xticks(
            [t for t in (0.2, 0.5, 1, 2, 5, 10, 20, 30, 50, 70, 100) if lo / 1.15 <= t <= hi * 1.15]
        )
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
        ax.set_xlabel("labelled spots (% of the training pool, log scale)")
        ax.set_title(f"head: {head}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(f"test {name} (mean ± sd, {len(comparison['seeds'])} seeds)")
    legend: dict[str, Any] = {}
    for ax in axes[0]:  # every strategy once, even those run with one head only
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    order = [s for s in strategies if s in legend] + [k for k in legend if k not in strategies]
    fig.legend([legend[k] for k in order], order, loc="center right", frameon=False, fontsize=8)
    fig.suptitle(f"Learning curves ({comparison['campaign_id']})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 0.97))
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def plot_efficiency(path: Path, comparison: dict[str, Any]) -> None:
    """Labels needed to reach the target per arm (mean ± sd), random's as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = comparison["heads"]
    rows = _sorted_rows(comparison)
    strategies = sorted({r["strategy"] for r in rows})
    style = _colours(strategies)
    counts = [sum(1 for r in rows if r["head"] == h) for h in heads]
    fig, axes = plt.subplots(
        len(heads),
        1,
        figsize=(8.5, 0.36 * sum(counts) + 0.9 * len(heads) + 0.9),
        dpi=120,
        squeeze=False,
        sharex=True,
        gridspec_kw={"height_ratios": [c + 1.2 for c in counts]},
    )
    pool = comparison["pool_size"]
    for ax, head in zip(axes[:, 0], heads, strict=True):
        mine = [r for r in rows if r["head"] == head][::-1]
        y = np.arange(len(mine))
        for i, r in enumerate(mine):
            ltt = r["labels_to_target"]
            colour, _ = style[r["strategy"]]
            ax.barh(
                i,
                100 * ltt["mean"] / pool,
                xerr=100 * ltt["sd"] / pool,
                color=colour,
                alpha=0.85,
                hatch="//" if ltt["censored"] else None,
                edgecolor="white",
                error_kw={"lw": 0.8},
            )
            ratio = r["ratio_to_random"]
            text = ("≥ " if ltt["censored"] else "") + f"{ltt['mean']:.0f}"
            if ratio is not None:
                text += (
                    f"  ({r['ratio_bound'] if r['ratio_bound'] != '=' else ''}{ratio:.2f}× random)"
                )
            ax.text(100 * (ltt["mean"] + ltt["sd"]) / pool + 0.5, i, text, va="center", fontsize=7)
        base = next((r for r in mine if r["strategy"] == "random"), None)
        if base is not None:
            ax.axvline(100 * base["labels_to_target"]["mean"] / pool, color="black", ls="--", lw=1)
        ax.set_yticks(y, [r["strategy"] for r in mine], fontsize=8)
        ax.set_title(f"head: {head}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    m = _METRIC_NAMES.get(comparison["metric"], comparison["metric"])
    axes[-1][0].set_xlabel(
        f"labels to reach {100 * comparison['target_share']:g} % of full-supervision {m}, "
        f"% of the {pool}-spot pool\n(mean ± sd over {len(comparison['seeds'])} seeds; "
        "hatched: not reached by every seed; dashed: random)",
        fontsize=8,
    )
    xmax = max(
        100 * (r["labels_to_target"]["mean"] + r["labels_to_target"]["sd"]) / pool for r in rows
    )
    axes[-1][0].set_xlim(0, xmax * 1.35 + 1)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


# --------------------------------------------------------------------------- all outputs


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_outputs(
    folder: Path, records: list[dict[str, Any]], meta: dict[str, Any], config: Any
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Write every output of a finished campaign; returns ``(comparison, name → path)``."""
    order = {h: i for i, h in enumerate(dict.fromkeys(h for h, _ in meta["arms"]))}
    records = sorted(
        records,
        key=lambda r: (
            order.get(r["head"], 99),
            r["strategy"] != FULL,
            r["strategy"],
            r["seed"],
            r["round"],
        ),
    )
    comparison = compare(records, meta, config.metric, config.target)
    files = {
        name: folder / name
        for name in (
            "rounds.jsonl",
            "comparison.json",
            "comparison.md",
            "comparison.tex",
            "learning_curves.png",
            "efficiency.png",
        )
    }
    slim = (
        {k: v for k, v in r.items() if k != "pool_predicted"} for r in records
    )  # kept in runs/ only
    _write(
        files["rounds.jsonl"], "".join(json.dumps(r, sort_keys=True) + "\n" for r in slim).encode()
    )
    _write(files["comparison.json"], json.dumps(comparison, indent=1, sort_keys=True).encode())
    _write(files["comparison.md"], to_markdown(comparison).encode())
    _write(files["comparison.tex"], to_latex(comparison).encode())
    plot_learning_curves(files["learning_curves.png"], records, comparison)
    plot_efficiency(files["efficiency.png"], comparison)
    return comparison, files
