"""Query cost at cohort scale: histoloop's strategies vs scikit-activeml, side by side.

Cases (same seeded synthetic data for both implementations):

* ``activevisium`` — two-stage query over 1,000,000 spots (probabilities (1e6, 8),
  128-d hidden features), k = 100. Reference: scikit-activeml's ``uncertainty_scores``
  (entropy) for the top-5 % pool, then scikit-learn ``KMeans`` (its default k-means++
  init, as in the ActiveVisium code) and the pool spot closest to each centroid.
  scikit-activeml has no identical two-stage strategy.
* ``coreset`` — greedy k-center over 100,000 × 1024 float32 with 10 labelled spots as
  initial centres, choose 100. Reference: ``skactiveml.pool.CoreSet``. Both are exact
  greedy k-center, so the picks must be identical.
* ``typiclust`` — TypiClust cold start over 100,000 × 1024 float32, choose 100.
  Reference: ``skactiveml.pool.TypiClust`` (scikit-learn KMeans + NearestNeighbors).
* ``live`` — labels → next query set on the real DLPFC 151510 section (4,634 spots,
  500 log1p genes, standardised): the live loop's round (``fit_round``: retrain the MLP,
  warm start; predict every spot; ``select_query``: ActiveVisium query of 50); 9 rounds
  from a 100-spot cold start (100 → 500 labels). Ours only.
* ``train`` — training time of logreg / MLP / 5-MLP ensemble on 500 labelled DLPFC
  spots, 500-d log1p genes and 30 PCs. Ours only.

Every (case, implementation) runs in a fresh Python process so that its peak memory is
its own: the reported "extra peak" is the rise of the process's peak RSS
(``ru_maxrss``) during the call, over the RSS once the input exists.

Usage::

    .venv/bin/python benchmarks/bench_query.py                # every case, ~5 min
    .venv/bin/python benchmarks/bench_query.py --cases coreset --repeats 3
    .venv/bin/python benchmarks/bench_query.py --quick        # every case, small, ~1 min

``--quick`` runs every case on small inputs (checks that the script works, not speed).
The library side needs scikit-activeml (``make bench`` installs it); without it that side
is skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SEED = 0
QUICK = os.environ.get("HISTOLOOP_BENCH_QUICK") == "1"
"""Small inputs everywhere (``--quick``; inherited by the per-case processes)."""


# ----------------------------------------------------------------------------- data


def mixture(n: int, d: int, n_centres: int, seed: int) -> np.ndarray:
    """A float32 Gaussian mixture, generated in blocks (no float64 temporaries)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, d), dtype=np.float32)
    assign = rng.integers(0, n_centres, n)
    X = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 2000):
        stop = min(n, start + 2000)
        X[start:stop] = rng.standard_normal((stop - start, d), dtype=np.float32) * 0.6
        X[start:stop] += centres[assign[start:stop]]
    return X


def probabilities(n: int, c: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    P = rng.standard_normal((n, c), dtype=np.float32) * 2.0
    P -= P.max(axis=1, keepdims=True)
    np.exp(P, out=P)
    P /= P.sum(axis=1, keepdims=True)
    return P


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def coverage(X: np.ndarray, picked: np.ndarray) -> float:
    """Mean distance of every row to its nearest picked row (lower = better covered)."""
    from histoloop.acquisition.cluster import nearest_centres

    _, d = nearest_centres(X, np.ascontiguousarray(X[picked]))
    return float(np.sqrt(d).mean())


# ----------------------------------------------------------------------------- cases


def case_activevisium(impl: str, repeats: int) -> dict:
    n, k = (20_000, 20) if QUICK else (1_000_000, 100)
    P = probabilities(n, 8, SEED)
    H = mixture(n, 128, 32, SEED + 1)
    labelled = np.zeros(n, bool)
    labelled[np.random.default_rng(SEED).choice(n, n // 1000, replace=False)] = True
    input_mb = (P.nbytes + H.nbytes) / 2**20
    if impl == "ours":
        from histoloop.acquisition import QueryContext, get_strategy

        ctx = QueryContext(features=H, labelled=labelled, probabilities=P)
        strategy = get_strategy("activevisium")

        def run() -> np.ndarray:
            return strategy.select(ctx, k, np.random.default_rng(SEED)).indices
    else:
        from skactiveml.pool import uncertainty_scores
        from sklearn.cluster import KMeans
        from sklearn.metrics import pairwise_distances_argmin

        def run() -> np.ndarray:
            u = uncertainty_scores(P, method="entropy")
            u[labelled] = -np.inf
            pool = np.argsort(-u, kind="stable")[: int(np.ceil(0.05 * (~labelled).sum()))]
            km = KMeans(n_clusters=k, random_state=SEED).fit(H[pool])
            return pool[pairwise_distances_argmin(km.cluster_centers_, H[pool])]

    out = measure(run, repeats, input_mb)
    picked = out.pop("picked")
    u = -(P * np.log(np.clip(P, 1e-12, 1))).sum(1)
    u[labelled] = -np.inf
    pool = np.argsort(-u, kind="stable")[: int(np.ceil(0.05 * (~labelled).sum()))]
    out["quality"] = {
        "pool_coverage": coverage(H[pool], np.flatnonzero(np.isin(pool, picked))),
        "n_unique": int(len(np.unique(picked))),
        "all_in_pool": bool(np.isin(picked, pool).all()),
        "any_labelled": bool(labelled[picked].any()),
    }
    return out


def case_coreset(impl: str, repeats: int) -> dict:
    n, d, k = (5_000, 64, 20) if QUICK else (100_000, 1024, 100)
    X = mixture(n, d, 64, SEED + 2)
    labelled_rows = np.random.default_rng(SEED).choice(n, 10, replace=False)
    input_mb = X.nbytes / 2**20
    if impl == "ours":
        from histoloop.acquisition import QueryContext, get_strategy

        labelled = np.zeros(n, bool)
        labelled[labelled_rows] = True
        ctx = QueryContext(features=X, labelled=labelled)
        strategy = get_strategy("coreset")

        def run() -> np.ndarray:
            return strategy.select(ctx, k, np.random.default_rng(SEED)).indices
    else:
        from skactiveml.pool import CoreSet

        y = np.full(n, np.nan)
        y[labelled_rows] = 0

        def run() -> np.ndarray:
            return np.asarray(CoreSet(random_state=SEED).query(X, y, batch_size=k))

    out = measure(run, repeats, input_mb)
    picked = out.pop("picked")
    out["quality"] = {
        "coverage": coverage(X, np.r_[labelled_rows, picked]),
        "picked_sha": hash_indices(picked),
    }
    return out


def case_typiclust(impl: str, repeats: int, subset: int | None) -> dict:
    n, d, k = (subset or 5_000, 64, 20) if QUICK else (subset or 100_000, 1024, 100)
    X = mixture(n, d, 64, SEED + 3)
    input_mb = X.nbytes / 2**20
    if impl == "ours":
        from histoloop.acquisition import QueryContext, get_strategy

        ctx = QueryContext(features=X, labelled=np.zeros(n, bool))
        strategy = get_strategy("typiclust")

        def run() -> np.ndarray:
            return strategy.select(ctx, k, np.random.default_rng(SEED)).indices
    else:
        from skactiveml.pool import TypiClust

        y = np.full(n, np.nan)

        def run() -> np.ndarray:
            return np.asarray(TypiClust(random_state=SEED).query(X, y, batch_size=k))

    out = measure(run, repeats, input_mb)
    picked = out.pop("picked")
    out["quality"] = {"coverage": coverage(X, picked), "n_unique": int(len(np.unique(picked)))}
    out["n"] = n
    return out


def _dlpfc() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import anndata as ad

    data = Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
    adata = ad.read_h5ad(data / "dlpfc" / "151510" / "dlpfc151510_500genes.h5ad")
    counts = adata.X.toarray().astype(np.float32)
    truth = adata.obs["layer"].astype(str).to_numpy()
    return counts, truth, adata.obs["layer"].notna().to_numpy()


def case_live(impl: str, repeats: int) -> dict:
    from histoloop.acquisition import QueryContext
    from histoloop.acquisition.round import select_query
    from histoloop.training import FeatureScaling
    from histoloop.training.predict import predict
    from histoloop.training.round import fit_round

    counts, truth, has = _dlpfc()
    scaling = {"features": FeatureScaling.fit(counts, log1p_target_sum=1e4)}
    classes = sorted(set(truth[has]))
    X = scaling["features"].transform(counts)
    n_cold, n_query, n_rounds = (30, 20, 2) if QUICK else (100, 50, 9)
    labelled = ~has  # spots without a ground-truth label are never queried
    cold = select_query(
        QueryContext(features=X, labelled=labelled, round=0),
        strategy="coldstart_kmeans",
        query_size=n_cold,
        seed=SEED,
    )
    labelled[cold.indices] = True
    asked = list(cold.indices)
    rounds, previous, f1, sizes = [], None, [], []
    for round_no in range(1, n_rounds + 1):
        t0 = time.perf_counter()
        model = fit_round(
            {"features": counts},
            np.asarray(asked),
            truth[asked],
            head="mlp",
            seed=SEED,
            classes=classes,
            scaling=scaling,
            previous=previous,
        )
        p = predict(model, counts)
        ctx = QueryContext(
            features=p.hidden, labelled=labelled, probabilities=p.probabilities, round=round_no
        )
        sel = select_query(ctx, strategy="activevisium", query_size=n_query, seed=SEED)
        rounds.append(time.perf_counter() - t0)
        f1.append(round(float((p.labels[has] == truth[has]).mean()), 3))
        sizes.append(len(asked))
        labelled[sel.indices] = True
        asked += list(sel.indices)
        previous = model
    return {
        "round_seconds": [round(r, 3) for r in rounds],
        "labels_per_round": sizes,
        "median_seconds": float(np.median(rounds)),
        "max_seconds": float(np.max(rounds)),
        "accuracy_all_spots": f1,
    }


def case_train(impl: str, repeats: int) -> dict:
    """Training time of the heads on 500 labelled DLPFC spots (median of ``repeats``)."""
    from sklearn.decomposition import PCA

    from histoloop.training import log1p_normalise, train_model

    counts, truth, has = _dlpfc()
    genes = log1p_normalise(counts)
    pcs = PCA(30, random_state=0).fit_transform(genes).astype(np.float32)
    rows = np.random.default_rng(SEED).choice(
        np.flatnonzero(has), 200 if QUICK else 500, replace=False
    )
    train_model(pcs[rows], truth[rows], head="mlp", hyperparameters={"max_epochs": 1})  # warm-up
    out = {}
    cases = (("30-d PCs", pcs),) if QUICK else (("500-d log1p genes", genes), ("30-d PCs", pcs))
    for name, feats in cases:
        for head in ("logreg", "mlp") if QUICK else ("logreg", "mlp", "ensemble"):
            times, model = [], None
            for _ in range(repeats if head != "ensemble" else 1):
                t0 = time.perf_counter()
                model = train_model(feats[rows], truth[rows], head=head, seed=SEED)
                times.append(time.perf_counter() - t0)
            out[f"{head} / {name}"] = {
                "seconds": round(float(np.median(times)), 3),
                "epochs": model.fit_report["epochs"],
                "val_macro_f1": round(model.validation["macro_f1"], 3),
            }
    return out


def hash_indices(idx: np.ndarray) -> str:
    import hashlib

    return hashlib.sha1(np.asarray(idx, dtype=np.int64).tobytes()).hexdigest()[:12]


def measure(run, repeats: int, input_mb: float) -> dict:
    base_rss, base_peak = rss_mb(), peak_mb()
    times, picked = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        picked = run()
        times.append(time.perf_counter() - t0)
    return {
        "seconds": float(np.median(times)),
        "all_seconds": [round(t, 3) for t in times],
        "input_mb": input_mb,
        "extra_peak_mb": max(0.0, peak_mb() - max(base_rss, base_peak)),
        "baseline_slack_mb": base_peak - base_rss,
        "picked": np.asarray(picked),
    }


# ----------------------------------------------------------------------------- driver


def child(case: str, impl: str, repeats: int, subset: int | None) -> None:
    if impl == "lib":
        import skactiveml  # noqa: F401  (import cost outside the timing)
    import sklearn.cluster  # noqa: F401

    import histoloop.acquisition  # noqa: F401

    fn = {
        "activevisium": lambda: case_activevisium(impl, repeats),
        "coreset": lambda: case_coreset(impl, repeats),
        "typiclust": lambda: case_typiclust(impl, repeats, subset),
        "live": lambda: case_live(impl, repeats),
        "train": lambda: case_train(impl, repeats),
    }[case]
    print("RESULT " + json.dumps(fn()))


def spawn(case: str, impl: str, repeats: int, subset: int | None, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--child", case, impl, "--repeats", str(repeats)]
    if subset:
        cmd += ["--subset", str(subset)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": proc.stderr[-2000:]}
    out = json.loads(lines[-1][7:])
    out["process_seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="activevisium,coreset,typiclust,live,train")
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours (median)")
    parser.add_argument("--lib-repeats", type=int, default=1, help="runs of the library")
    parser.add_argument("--subset", type=int, default=None, help="rows for library TypiClust")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--quick", action="store_true", help="every case on small inputs, one run each"
    )
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.repeats, args.subset)
        return
    if args.quick:
        os.environ["HISTOLOOP_BENCH_QUICK"] = "1"
        args.repeats = args.lib_repeats = 1
    import importlib.util

    have_lib = importlib.util.find_spec("skactiveml") is not None
    if not have_lib:
        print(
            "scikit-activeml is not installed (`make bench` installs it): the library side is skipped"
        )
    results: dict[str, dict] = {}
    failed = False
    for case in args.cases.split(","):
        impls = ["ours"] if case in ("live", "train") or not have_lib else ["ours", "lib"]
        results[case] = {}
        for impl in impls:
            repeats = args.repeats if impl == "ours" else args.lib_repeats
            subset = args.subset if (case == "typiclust" and impl == "lib") else None
            res = spawn(case, impl, repeats, subset, args.timeout)
            results[case][impl] = res
            failed |= "error" in res
            print(f"{case:13s} {impl:4s} {json.dumps(res)}", flush=True)
    print()
    print(
        "| case | ours (s) | scikit-activeml (s) | ratio | ours extra peak / input | lib extra peak / input |"
    )
    print("|---|---|---|---|---|---|")
    for case, res in results.items():
        ours, lib = res.get("ours", {}), res.get("lib", {})
        if case == "live":
            print(
                f"| live loop, median round (max) | {ours.get('median_seconds', float('nan')):.2f} "
                f"({ours.get('max_seconds', float('nan')):.2f}) | – | – | – | – |"
            )
            continue
        if case == "train":
            for key, val in ours.items():
                if isinstance(val, dict):
                    print(f"| train {key} | {val['seconds']:.2f} | – | – | – | – |")
            continue
        o, li = ours.get("seconds"), lib.get("seconds")
        ratio = f"{li / o:.1f}×" if o and li else "–"

        def mem(r: dict) -> str:
            if "extra_peak_mb" not in r:
                return "–"
            return f"{r['extra_peak_mb']:.0f} MB / {r['input_mb']:.0f} MB"

        li_s = f"{li:.2f}" if li else lib.get("error", "–")[:40]
        print(f"| {case} | {o:.2f} | {li_s} | {ratio} | {mem(ours)} | {mem(lib)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if failed:
        raise SystemExit("some cases failed (see above)")


if __name__ == "__main__":
    main()
