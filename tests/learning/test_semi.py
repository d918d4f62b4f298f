"""Label spreading over a spatial + feature graph, and the pseudo-labels it yields."""

from __future__ import annotations

import numpy as np
import pytest

from histoloop.errors import InvalidArgument
from histoloop.training.semi import SemiSupervised, combined_graph, label_spreading, pseudo_labels


def _strip(n: int = 40):
    """A 2 × n strip of spots: the left half is class 0, the right half class 1."""
    positions = np.array([(c, r) for r in range(2) for c in range(n)], dtype=float)
    y = (positions[:, 0] >= n / 2).astype(np.int64)
    return positions, y


def test_labels_spread_along_the_spatial_graph() -> None:
    positions, y = _strip()
    features = np.zeros((len(y), 1))  # no feature signal: only the slide tells
    graph = combined_graph(features, positions, feature_neighbours=0, spatial_neighbours=3)
    labelled = np.zeros(len(y), bool)
    labelled[[0, 39]] = True  # one label at each end of the first row
    spread = label_spreading(graph, labelled, y, 2, alpha=0.99, iterations=200)
    assert (spread.argmax(axis=1) == y).mean() >= 0.95
    rows, cls = pseudo_labels(spread, labelled, 0.8)
    assert len(rows) > 20 and not labelled[rows].any()
    assert (cls == y[rows]).all()  # confident pseudo-labels are right
    assert np.all(np.diff(spread[rows].max(axis=1)) <= 1e-12)  # most confident first


def test_feature_graph_joins_similar_spots_far_apart_on_the_slide() -> None:
    r = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 30)
    features = np.eye(3)[y] * 5 + r.standard_normal((90, 3)) * 0.3
    positions = r.random((90, 2)) * 100  # positions carry no class information
    graph = combined_graph(features, positions, feature_neighbours=8, spatial_neighbours=0)
    labelled = np.zeros(90, bool)
    labelled[[0, 30, 60]] = True
    spread = label_spreading(graph, labelled, y, 3)
    assert (spread.argmax(axis=1) == y).all()


def test_a_small_class_is_not_swamped_by_a_large_one() -> None:
    positions, _ = _strip(60)
    y = np.zeros(len(positions), np.int64)
    y[positions[:, 0] >= 54] = 1  # 12 of 120 spots
    graph = combined_graph(
        np.zeros((len(y), 1)), positions, feature_neighbours=0, spatial_neighbours=3
    )
    labelled = np.zeros(len(y), bool)
    labelled[[0, 10, 20, 30, 40, 59]] = True  # five labels of the big class, one of the small
    spread = label_spreading(graph, labelled, y, 2, alpha=0.99, iterations=200, balanced=True)
    assert (spread.argmax(axis=1)[y == 1] == 1).mean() >= 0.8


def test_unreached_spots_stay_uncertain_and_bad_settings_are_named() -> None:
    graph = combined_graph(
        np.array([[0.0], [0.1], [10.0], [10.1]]), None, feature_neighbours=1, spatial_neighbours=0
    )
    spread = label_spreading(graph, np.array([True, False, False, False]), np.zeros(4, np.int64), 2)
    assert np.allclose(spread[2:], 0.5)  # the other component got no label
    assert pseudo_labels(spread, np.array([True, False, False, False]), 0.9)[0].tolist() == [1]
    with pytest.raises(InvalidArgument, match="threshold"):
        SemiSupervised(threshold=1.5).validate()
    with pytest.raises(InvalidArgument):
        combined_graph(np.zeros((4, 1)), None, feature_neighbours=0, spatial_neighbours=3)
