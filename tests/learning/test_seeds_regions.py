"""Click-to-region: the connected same-class region around a clicked unit."""

from __future__ import annotations

import numpy as np
import pytest

from histoloop.errors import InvalidArgument
from histoloop.prediction.regions import propose_region
from histoloop.spatial import visium_array_positions
from histoloop.training.raters import fit_rater_model


def _grid(rows: int = 10, cols: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, c = np.divmod(np.arange(rows * cols), cols)
    return r, c, np.c_[c, r].astype(float)


def test_region_is_the_connected_component_of_the_clicked_class() -> None:
    r, c, pos = _grid()
    labels = np.where(c < 5, "A", "B")
    labels[(r == 2) & (c == 8)] = "A"  # an island of A inside B: not connected to the left block
    region = propose_region(pos, labels, clicked=0, k=4)
    assert region[0] == 0
    assert set(region.tolist()) == set(np.flatnonzero(c < 5).tolist())
    island = propose_region(pos, labels, clicked=int(np.flatnonzero((r == 2) & (c == 8))[0]), k=4)
    assert len(island) == 1
    # a tear in the tissue: the same class across a gap is another region
    torn = pos.copy()
    torn[c >= 3, 0] += 10
    assert set(propose_region(torn, labels, clicked=0, k=4).tolist()) == set(
        np.flatnonzero(c < 3).tolist()
    )
    assert len(propose_region(pos, labels, clicked=0, k=4, max_units=7)) == 7


def test_region_follows_the_raters_model() -> None:
    # two raters draw the border between two layers at different columns
    rr, cc = np.divmod(np.arange(12 * 12), 12)
    pos = visium_array_positions(rr, cc * 2 + (rr % 2))
    X = np.c_[cc, rr].astype(np.float32)
    early, late = (cc >= 4).astype(int), (cc >= 8).astype(int)
    model = fit_rater_model(
        np.r_[X, X],
        ["early"] * len(X) + ["late"] * len(X),
        np.r_[early, late],
        n_classes=2,
        epochs=100,
        lr=1e-2,
        batch_size=128,
    )
    for rater, border in (("early", 4), ("late", 8)):
        predicted = model.predict_proba(X, rater).argmax(axis=1)
        region = propose_region(pos, predicted, clicked=0)
        assert abs(len(region) - 12 * border) <= 6  # the rater's own region, ±½ a column


def test_bad_clicks_are_named() -> None:
    _, _, pos = _grid(2, 2)
    with pytest.raises(InvalidArgument, match="clicked"):
        propose_region(pos, np.zeros(4), clicked=9)
    with pytest.raises(InvalidArgument, match="positions"):
        propose_region(pos[:3], np.zeros(4), clicked=0)
