"""On real data: DLPFC section 151510 (Maynard et al. 2021), 4,634 spots, 500 genes.

Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histoloop.acquisition import QueryContext, get_strategy
from histoloop.spatial import neighbour_indices, neighbour_mean_features, visium_array_positions
from histoloop.training import log1p_normalise, train_model
from histoloop.training.predict import predict

POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"]


@pytest.fixture(scope="module")
def dlpfc(shared_data: Path) -> dict[str, np.ndarray]:
    import anndata as ad
    from sklearn.decomposition import PCA

    folder = shared_data / "dlpfc" / "151510"
    adata = ad.read_h5ad(folder / "dlpfc151510_500genes.h5ad")
    positions = pd.read_csv(
        folder / "spatial" / "tissue_positions_list.csv", header=None, names=POSITION_COLUMNS
    ).set_index("barcode")
    positions = positions.loc[adata.obs_names]
    expr = log1p_normalise(adata.X)
    pcs = PCA(n_components=30, random_state=0).fit_transform(expr).astype(np.float32)
    labels = adata.obs["layer"]
    return {
        "expr": expr,
        "pcs": pcs,
        "labels": labels.astype(str).to_numpy(),
        "has_label": labels.notna().to_numpy(),
        "xy": visium_array_positions(positions["array_row"], positions["array_col"]),
    }


def _cv_macro_f1(X: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    pred = cross_val_predict(model, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0))
    return float(f1_score(y, pred, average="macro"))


def test_data_is_what_the_issue_describes(dlpfc: dict[str, np.ndarray]) -> None:
    assert dlpfc["expr"].shape == (4634, 500)
    assert (~dlpfc["has_label"]).sum() == 39
    assert len(set(dlpfc["labels"][dlpfc["has_label"]])) == 7


def test_neighbour_mean_features_raise_macro_f1(dlpfc: dict[str, np.ndarray]) -> None:
    keep = dlpfc["has_label"]
    nb = neighbour_indices(dlpfc["xy"], 6)
    with_nb = neighbour_mean_features(dlpfc["pcs"], nb)
    y = dlpfc["labels"][keep]
    plain = _cv_macro_f1(dlpfc["pcs"][keep], y)
    spatial = _cv_macro_f1(with_nb[keep], y)
    print(
        f"\nDLPFC 151510, 5-fold logreg macro-F1 (30 PCs): {plain:.3f} without, "
        f"{spatial:.3f} with neighbour-mean features (k=6)"
    )
    assert spatial - plain > 0.1


def test_one_live_round_on_real_spots(dlpfc: dict[str, np.ndarray]) -> None:
    """Train on 500 labels, predict all 4,634 spots, choose the next 20."""
    rng = np.random.default_rng(0)
    labelled_rows = rng.choice(np.flatnonzero(dlpfc["has_label"]), 500, replace=False)
    labelled = np.zeros(len(dlpfc["labels"]), bool)
    labelled[labelled_rows] = True
    y = dlpfc["labels"][labelled_rows]
    timings = {}
    for name, feats in (("500-d genes", dlpfc["expr"]), ("30-d PCs", dlpfc["pcs"])):
        for head in ("logreg", "mlp"):
            t0 = time.perf_counter()
            model = train_model(feats[labelled_rows], y, head=head, seed=0)
            timings[(name, head)] = time.perf_counter() - t0
            if head == "mlp" and name == "30-d PCs":
                mlp_model = model
    t0 = time.perf_counter()
    p = predict(mlp_model, dlpfc["pcs"])
    ctx = QueryContext(features=p.hidden, labelled=labelled, probabilities=p.probabilities)
    sel = get_strategy("activevisium").select(ctx, 20, rng)
    loop = time.perf_counter() - t0
    for (name, head), sec in timings.items():
        print(f"train {head:6s} on 500 labels, {name}: {sec:.2f} s")
    print(
        f"predict 4,634 spots + activevisium query: {loop:.3f} s; "
        f"validation macro-F1 of the 30-d MLP {mlp_model.validation['macro_f1']:.3f}"
    )
    assert len(sel) == 20 and not labelled[sel.indices].any()
    assert p.probabilities.shape == (4634, 7)
    assert timings[("30-d PCs", "logreg")] < 5.0  # generous: cores are shared
