"""The stored patch-set format and its reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histoloop.artifacts import ArtifactNotFound
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.errors import InvalidArgument
from histoloop.formats.patches import array_to_npy, npy_to_array
from histoloop.tiling import PatchSet


def test_npy_round_trip_without_pickle() -> None:
    a = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(npy_to_array(array_to_npy(a)), a)
    with pytest.raises(ValueError):
        npy_to_array(array_to_npy(np.array([{"a": 1}], dtype=object)))


def test_open_missing_or_foreign(store: LocalArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound):
        PatchSet.open(store, "none")
    store.put("other/manifest.json", json.dumps({"format": "something"}).encode())
    with pytest.raises(InvalidArgument, match="format"):
        PatchSet.open(store, "other")
