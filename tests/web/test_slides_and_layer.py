"""Deep Zoom pyramids, the tile cache and the overlay encoding, in-process (no server)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import openslide
import pytest
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from histoloop.errors import InvalidArgument, NotFound
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.web.layer import encode_layer
from histoloop.web.slides import PillowDeepZoom, Slide, TileCache, check_address, open_deep_zoom


def _decode(data: bytes) -> tuple[dict, dict]:
    (length,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8 : 8 + length])
    base = 8 + length + (-(8 + length)) % 8
    columns = {}
    for c in header["columns"]:
        raw = data[base + c["offset"] : base + c["offset"] + c["length"]]
        columns[c["name"]] = (
            raw.decode().split("\n") if c["dtype"] == "utf8" else np.frombuffer(raw, c["dtype"])
        )
    return header, columns


def test_pillow_pyramid_has_openslides_geometry(shared_data: Path) -> None:
    path = shared_data / "dlpfc" / "151510" / "spatial" / "tissue_lowres_image.png"
    ours = open_deep_zoom(path)
    assert isinstance(ours, PillowDeepZoom)
    reference = DeepZoomGenerator(
        openslide.ImageSlide(str(path)), tile_size=254, overlap=1, limit_bounds=False
    )
    assert ours.level_count == reference.level_count
    assert ours.level_dimensions == reference.level_dimensions
    assert ours.level_tiles == reference.level_tiles
    top = ours.level_count - 1
    for address in ((0, 0), (1, 1), (2, 2)):
        mine, theirs = ours.get_tile(top, address), reference.get_tile(top, address)
        assert mine.size == theirs.size
        assert np.array_equal(
            np.asarray(mine), np.asarray(theirs.convert("RGB"))
        )  # full resolution: identical
    for level in range(top):
        assert ours.get_tile(level, (0, 0)).size == reference.get_tile(level, (0, 0)).size


def test_openslide_slides_use_the_deep_zoom_generator(shared_data: Path) -> None:
    dz = open_deep_zoom(shared_data / "wsi" / "CMU-1-Small-Region.svs")
    assert isinstance(dz, DeepZoomGenerator) and dz.level_dimensions[-1] == (2220, 2967)


def test_tile_cache_hits_and_bounds(tmp_path: Path) -> None:
    slide = Slide(
        key="a" * 64,
        deep_zoom=PillowDeepZoom(Image.new("RGB", (600, 500), "white")),
        unit_scale=1.0,
    )
    cache = TileCache(max_bytes=4000)
    assert cache.cached(slide, 10, 0, 0) is None  # a lookup never renders
    assert (cache.hits, cache.misses, cache._bytes) == (0, 0, 0)
    first = cache.get(slide, 10, 0, 0)
    assert first[:2] == b"\xff\xd8" and cache.get(slide, 10, 0, 0) is first
    assert cache.cached(slide, 10, 0, 0) is first
    assert (cache.hits, cache.misses) == (2, 1)
    for col in range(3):
        cache.get(slide, 10, col, 1)
    assert cache._bytes <= 4000
    assert slide.etag(10, 0, 0) == '"' + "a" * 20 + '-10-0-0"'
    with pytest.raises(NotFound, match="level 11 does not exist"):
        slide.render(11, 0, 0)
    with pytest.raises(NotFound, match="tile 3_0 does not exist at level 10"):
        slide.render(10, 3, 0)
    with pytest.raises(InvalidArgument, match="column '-1'"):
        check_address("3", "-1", "0")


def test_overlay_of_100000_tiles_is_under_3_mb() -> None:
    n = 100_000
    rng = np.random.default_rng(0)
    rows, cols = np.divmod(np.arange(n), 400)
    layer = pb.UnitLayer(
        project_id="p",
        dataset_id="d",
        kind=2,
        coordinates="slide",
        classes=["tumour", "stroma", "other"],
        class_colors=["#d62728", "#2ca02c", "#7f7f7f"],
        unit_ids=[f"r{r}_c{c}" for r, c in zip(rows, cols, strict=True)],
        x=(cols * 448 + 224).tolist(),
        y=(rows * 448 + 224).tolist(),
        size=[448.0] * n,
        in_tissue=[True] * n,
        consensus=rng.integers(-1, 3, n).tolist(),
        mine=[-1] * n,
        predicted=rng.integers(0, 3, n).tolist(),
        uncertainty=rng.random(n).astype(np.float32).tolist(),
        disputed=[False] * n,
        query_rank=[0] * (n - 20) + list(range(1, 21)),
        queryset_id="q",
        round=3,
    )
    data = encode_layer(layer)
    assert len(data) < 3_000_000
    header, columns = _decode(data)
    assert header["n"] == n and header["size"] == 448.0 and "size" not in columns
    assert columns["ids"][12345] == "r30_c345"
    assert np.array_equal(columns["x"], np.asarray(layer.x, np.float32))
    assert np.array_equal(columns["predicted"], np.asarray(layer.predicted, np.int8))
    assert columns["query_rank"][-1] == 20 and columns["query_rank"].dtype == np.uint16
    assert abs(columns["uncertainty"][7] / 254 - layer.uncertainty[7]) < 0.003
