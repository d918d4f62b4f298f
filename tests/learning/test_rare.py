"""Rare classes early: the coverage cold start reaches a small class far from the rest."""

from __future__ import annotations

import numpy as np

from histoloop.acquisition.strategies import STRATEGIES, QueryContext, get_strategy


def test_coverage_cold_start_labels_a_five_spot_class_in_the_first_query() -> None:
    r = np.random.default_rng(0)
    big = r.standard_normal((600, 8)) + np.repeat(
        np.eye(8)[:3] * 4, 200, axis=0
    )  # three big classes
    small = r.standard_normal((5, 8)) * 0.5 + np.eye(8)[5] * 12  # a five-spot class far away
    X = np.vstack([big, small]).astype(np.float32)
    y = np.r_[np.repeat([0, 1, 2], 200), np.full(5, 3)]
    assert not STRATEGIES["coverage"].needs_model  # usable as a cold start
    ctx = QueryContext(features=X, labelled=np.zeros(len(X), bool))
    for seed in range(5):
        picked = get_strategy("coverage").select(ctx, 10, np.random.default_rng(seed)).indices
        assert 3 in set(y[picked]), seed
        assert len(set(y[picked])) == 4  # and every big class too
