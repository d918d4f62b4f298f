"""Section A1 of her2st (Andersson et al. 2021) as a morphology benchmark: features and views.

Used by ``bench_simulation.py --sample her2st-a1``. From the shared data alone it:

1. tiles the plain 2000-px H&E PNG at the 348 legacy ST spots (224-px patches of one spot
   diameter, slide scale 2000/6954) through histoloop's plain-image slide reader;
2. embeds every patch with EfficientNet-Lite0 (clean + ``views`` augmented views) and with
   the 56 handcrafted features, and the raw counts with histoloop's expression transform
   (1000 highly variable genes → 30 PCs);
3. keeps the spots with a tissue label and a counts row ("undetermined" is not a tissue
   class and is left out), and writes one AnnData with every feature set in ``obsm``.

``views_experiment`` then answers "do augmentation views help?" with the live training
code: the MLP head trained on clean vectors vs on (views, n, d) (one view per spot per
epoch), same splits and labels, scored on clean held-out spots.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from histoloop.her2st import A1_SLIDE_SCALE, load_a1, write_counts_h5ad

__all__ = [
    "A1_STRATEGIES",
    "FEATURE_SETS",
    "a1_config",
    "a1_features",
    "a1_patches",
    "noise_free_views",
    "run_a1",
    "views_experiment",
]

FEATURE_SETS = {
    "handcrafted": "X_handcrafted",
    "efficientnet": "X_effnet",
    "expression": "X_expr",
    "multimodal": "X_multimodal",
}
"""Feature set name → ``obsm`` key of the campaign AnnData."""


def _patches(sample: Any) -> tuple[np.ndarray, list[str]]:
    from histoloop.artifacts.local import LocalArtifactStore
    from histoloop.tiling import PatchSet, tile_visium

    with tempfile.TemporaryDirectory(prefix="a1-tiles-") as tmp:
        store = LocalArtifactStore(Path(tmp))
        result = tile_visium(
            sample.image,
            sample.folder,
            store,
            "a1",
            scale=A1_SLIDE_SCALE,
            workers=1,
            chunk_size=512,
        )
        patches = PatchSet.open(store, result.prefix)
        index = patches.index.sort_values(["chunk", "offset"])
        return patches.read_all(), index["id"].astype(str).tolist()


def a1_patches(folder: Path, n: int) -> np.ndarray:
    """``n`` of A1's 224-px spot patches (repeated if ``n`` > 348), uint8 (n, 224, 224, 3)."""
    patches, _ = _patches(load_a1(folder))
    return patches[np.arange(n) % len(patches)]


def a1_features(
    folder: Path, cache: Path, *, views: int = 10, seed: int = 0
) -> tuple[Any, np.ndarray]:
    """The campaign AnnData (obs ``label``; obsm per :data:`FEATURE_SETS`) and the
    EfficientNet views ``(views + 1, n, 1280)`` of its spots (view 0 clean).

    Cached in ``cache`` (``a1_features.h5ad``, ``a1_views.npy``): embedding the views is the
    slow part (≈ 3,800 patches on the CPU).
    """
    import anndata as ad
    import pandas as pd
    from sklearn.decomposition import PCA
    from tqdm import tqdm

    from histoloop.embedding import (
        EfficientNetEmbedder,
        HandcraftedEmbedder,
        embed_views,
        fit_expression,
        read_expression,
    )

    h5ad, views_file = cache / "a1_features.h5ad", cache / f"a1_views{views}.npy"
    if h5ad.is_file() and views_file.is_file():
        return ad.read_h5ad(h5ad), np.load(views_file)
    cache.mkdir(parents=True, exist_ok=True)
    sample = load_a1(folder)
    patches, ids = _patches(sample)
    t0 = time.perf_counter()
    effnet = EfficientNetEmbedder(batch_size=32)
    all_views = np.empty((views + 1, len(patches), 1280), np.float32)
    for start in tqdm(range(0, len(patches), 32), desc="EfficientNet-Lite0 views", unit="batch"):
        chunk = patches[start : start + 32]
        all_views[:, start : start + len(chunk)] = embed_views(
            effnet, chunk, views, seed=seed, start=start
        )
    seconds = time.perf_counter() - t0
    hand = HandcraftedEmbedder().embed(patches)
    counts = read_expression(write_counts_h5ad(sample, cache / "a1_counts.h5ad"))
    labels = sample.labels.loc[ids]
    keep = (
        np.array([i in set(counts.barcodes) for i in ids]) & (labels != "undetermined").to_numpy()
    )
    kept = [i for i, k in zip(ids, keep, strict=True) if k]
    expr, _ = fit_expression(counts.subset(kept), n_pcs=30, seed=seed)
    clean = all_views[0][keep]
    effnet_pcs = PCA(30, random_state=seed).fit_transform(clean).astype(np.float32)
    adata = ad.AnnData(
        obs=pd.DataFrame({"label": labels.to_numpy()[keep]}, index=pd.Index(kept, name="barcode"))
    )
    adata.obsm["X_handcrafted"] = hand[keep]
    adata.obsm["X_effnet"] = clean
    adata.obsm["X_expr"] = expr.astype(np.float32)
    adata.obsm["X_multimodal"] = np.hstack([effnet_pcs, expr]).astype(np.float32)
    adata.uns["embedding"] = {
        "model": effnet.name,
        "version": effnet.version,
        "views": views,
        "seconds_all_views": seconds,
        "n_patches": int(len(patches)),
    }
    adata.write_h5ad(h5ad)
    np.save(views_file, all_views[:, keep])
    return adata, all_views[:, keep]


def noise_free_views(
    folder: Path, cache: Path, ids: list[str], *, views: int = 3, seed: int = 0
) -> np.ndarray:
    """EfficientNet views of the campaign spots ``ids`` without pixel noise (flips, rot90,
    blur, gamma only): ``(views + 1, n, 1280)``, cached as ``a1_views{views}_nonoise.npy``."""
    from tqdm import tqdm

    from histoloop.embedding import EfficientNetEmbedder, embed_views

    path = cache / f"a1_views{views}_nonoise.npy"
    if path.is_file():
        return np.load(path)
    patches, all_ids = _patches(load_a1(folder))
    where = {b: i for i, b in enumerate(all_ids)}
    patches = patches[[where[b] for b in ids]]
    effnet = EfficientNetEmbedder(batch_size=32)
    out = np.empty((views + 1, len(patches), 1280), np.float32)
    for start in tqdm(
        range(0, len(patches), 32), desc="EfficientNet-Lite0 noise-free views", unit="batch"
    ):
        chunk = patches[start : start + 32]
        out[:, start : start + len(chunk)] = embed_views(
            effnet, chunk, views, seed=seed, start=start, max_noise=0.0
        )
    np.save(path, out)
    return out


def views_experiment(
    adata: Any,
    views: np.ndarray,
    *,
    seeds: int = 5,
    budgets: tuple[int, ...] = (40, 0),
    test_fraction: float = 0.3,
) -> list[dict[str, Any]]:
    """Macro-F1 of the MLP head on clean vs augmented views, per seed and label budget.

    A budget of 0 means the whole pool (full supervision); a budget of k takes one random
    pool spot per class, then random pool spots up to k. Clean and views arms of a seed and
    budget train on the same spots; the test spots (clean) are never trained on.
    """
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split

    from histoloop.training.pipeline import train_model
    from histoloop.training.predict import predict
    from histoloop.training.scaling import FeatureScaling

    labels = adata.obs["label"].astype(str).to_numpy()
    classes = sorted(set(labels))
    clean = views[0]
    scaling = {"features": FeatureScaling.fit(clean)}
    rows: list[dict[str, Any]] = []
    for seed in range(seeds):
        idx = np.arange(len(labels))
        pool, test = train_test_split(
            idx, test_size=test_fraction, stratify=labels, random_state=seed
        )
        rng = np.random.default_rng(seed)
        for budget in budgets:
            if budget:
                first = [
                    rng.choice(pool[labels[pool] == c])
                    for c in classes
                    if (labels[pool] == c).any()
                ]
                rest = rng.permutation(np.setdiff1d(pool, first))[: max(0, budget - len(first))]
                train = np.concatenate([first, rest]).astype(np.int64)
            else:
                train = pool
            for arm, X in (
                ("clean", clean[train]),
                (f"{len(views) - 1} views + clean", views[:, train]),
            ):
                model = train_model(
                    X, labels[train], head="mlp", seed=seed, classes=classes, scaling=scaling
                )
                out = predict(model, clean[test])
                predicted = np.asarray(out.classes)[out.predicted]
                rows.append(
                    {
                        "seed": seed,
                        "budget": int(len(train)),
                        "arm": arm,
                        "macro_f1": float(
                            f1_score(
                                labels[test],
                                predicted,
                                labels=classes,
                                average="macro",
                                zero_division=0,
                            )
                        ),
                    }
                )
    return rows


A1_STRATEGIES = ("random", "activevisium", "margin", "least_confidence")
"""random, ActiveVisium and the two best other strategies of the DLPFC campaign (MLP head)."""


def a1_config(
    obsm_key: str,
    seeds: int = 5,
    *,
    strategies: tuple[str, ...] = A1_STRATEGIES,
    budget: int = 100,
    schedule: tuple[float, ...] = (0.6, 0.8),
) -> Any:
    """One feature set's campaign: the MLP head, by default 4 strategies, 5 seeds, 10 spots
    per round to 100 labels, then rounds to 60 % and 80 % of the pool."""
    from histoloop.simulation import SimulationConfig

    return SimulationConfig(
        label_column="label",
        obsm=(obsm_key,),
        pca=0,
        heads=("mlp",),
        strategies=strategies,
        seeds=seeds,
        test_fraction=0.3,
        initial="per_class",
        query_size=10,
        budget=budget,
        schedule=schedule,
        metric="macro_f1",
        target=0.95,
    )


def run_a1(
    folder: Path,
    out: Path,
    *,
    seeds: int = 5,
    views: int = 10,
    quiet_views: int = 3,
    feature_sets: tuple[str, ...] = tuple(FEATURE_SETS),
    strategies: tuple[str, ...] = A1_STRATEGIES,
    budget: int = 100,
    schedule: tuple[float, ...] = (0.6, 0.8),
    workers: int = 2,
    resume: bool = False,
) -> str:
    """Every feature set's campaign, the views experiment, and the Markdown summary.

    The defaults are the reference run; ``bench_simulation.py --quick`` shrinks them.

    Args:
        folder: The shared A1 data folder.
        out: Output folder (features cached in ``out/cache``, a campaign per feature set).
        seeds: Seeds of the campaigns and of the views experiment.
        views: Augmented views per spot (with pixel noise).
        quiet_views: Noise-free augmented views per spot.
        feature_sets: Names in :data:`FEATURE_SETS`, one campaign each.
        strategies: The campaigns' strategies (summary rows in this order).
        budget: Labels reached 10 spots per round.
        schedule: Labelled fractions of the pool to reach after the budget.
        workers: Parallel processes of each campaign.
        resume: Continue the campaigns already in ``out``.

    Returns:
        The summary (also written to ``out/a1_summary.md`` with ``a1_summary.json``).
    """
    import json

    from histoloop.simulation import run_campaign

    cache = out / "cache"
    adata, all_views = a1_features(folder, cache, views=views)
    counts = adata.obs["label"].value_counts()
    table = [
        "| features | strategy | full-supervision macro-F1 (mean ± sd) | labels to 95 % of it "
        "(mean ± sd; censored) | AULC macro-F1 | macro-F1 @ 30 % of pool |",
        "|---|---|---:|---:|---:|---:|",
    ]
    summary: dict[str, Any] = {
        "spots": int(adata.n_obs),
        "classes": counts.to_dict(),
        "campaigns": {},
    }
    for name in feature_sets:
        campaign = out / name
        run_campaign(
            adata,
            a1_config(
                FEATURE_SETS[name], seeds, strategies=strategies, budget=budget, schedule=schedule
            ),
            campaign,
            workers=workers,
            resume=resume or campaign.exists(),
        )
        comparison = json.loads((campaign / "comparison.json").read_text())
        summary["campaigns"][name] = comparison
        full = comparison["full_supervision"]["mlp"]
        for row in sorted(comparison["rows"], key=lambda r: strategies.index(r["strategy"])):
            ltt = row["labels_to_target"]
            missed = int(ltt["seeds"]) - int(ltt["reached"])
            at30 = (row["metric_at"].get("0.3") or {}).get("mean")
            note = f" ({missed} of {ltt['seeds']} seeds never reached it)" if missed else ""
            at30_text = "—" if at30 is None else f"{at30:.3f}"
            table.append(
                f"| {name} | {row['strategy']} | {full['mean']:.3f} ± {full['sd']:.3f} | "
                f"{ltt['mean']:.0f} ± {ltt['sd']:.0f}{note} | {row['aulc']['mean']:.3f} | {at30_text} |"
            )
    rows = views_experiment(adata, all_views, seeds=seeds)
    quiet = noise_free_views(folder, cache, list(adata.obs_names), views=quiet_views)
    rows += [
        {**r, "arm": r["arm"].replace("views", "noise-free views")}
        for r in views_experiment(adata, quiet, seeds=seeds)
        if r["arm"] != "clean"
    ]
    summary["views"] = rows
    lines = [
        "| labels | arm | macro-F1 (mean ± sd) | arm − clean, per seed |",
        "|---:|---|---:|---|",
    ]
    for labels in sorted({r["budget"] for r in rows}):
        clean = np.array(
            [r["macro_f1"] for r in rows if r["budget"] == labels and r["arm"] == "clean"]
        )
        for arm in dict.fromkeys(r["arm"] for r in rows):
            got = np.array(
                [r["macro_f1"] for r in rows if r["budget"] == labels and r["arm"] == arm]
            )
            diff = "—" if arm == "clean" else ", ".join(f"{d:+.3f}" for d in got - clean)
            sd = got.std(ddof=1) if len(got) > 1 else 0.0
            lines.append(f"| {labels} | {arm} | {got.mean():.3f} ± {sd:.3f} | {diff} |")
    shares = [f"{f:.0%}".replace("%", " %") for f in schedule]
    then = f" then {' and '.join(shares)} of the pool" if shares else ""
    text = (
        f"her2st A1: {adata.n_obs} spots ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
        f"MLP head, {seeds} seed{'s' if seeds != 1 else ''}, stratified 70/30 pool/test split, "
        f"one seed label per class, 10 spots per round to {budget} labels{then}.\n\n"
        + "\n".join(table)
        + "\n\nDo augmentation views help? EfficientNet-Lite0, MLP head, "
        f"clean vectors vs {views} augmented views + clean (flips, rot90, blur, noise σ ≤ 8, gamma), "
        f"and vs {quiet_views} noise-free views + clean (no pixel noise); one view per spot per epoch, "
        "same spots, scored on the clean test split:\n\n" + "\n".join(lines) + "\n"
    )
    (out / "a1_summary.md").write_text(text)
    (out / "a1_summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return text
