"""The embedding step on a real slide's patches: views stored for training, event announced."""

from __future__ import annotations

from pathlib import Path

from histoloop import events
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.embedded import EmbeddedBus
from histoloop.config import load_settings
from histoloop.datasets import read_anndata
from histoloop.embedding.step import EmbeddingStep
from histoloop.tiling import tile_wsi
from histoloop.v1 import events_pb2


def test_augmented_views_are_stored_with_the_clean_one(shared_data: Path, tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    bus = EmbeddedBus(tmp_path / "events.sqlite")
    tiled = tile_wsi(
        shared_data / "wsi" / "CMU-1-Small-Region.svs",
        store,
        "tiles/p/wsi",
        mpp=2.0,
        tile_size=64,
        workers=1,
    )
    settings = load_settings(data_dir=tmp_path, embedder="handcrafted", augment_views=2)
    step = EmbeddingStep(store, bus, settings)
    step.on_tiles(
        events_pb2.TilesReady(
            meta=events.new_meta(project="p", dataset="wsi", producer="test"),
            patches_uri=store.uri(tiled.manifest_key),
            n_tiles=tiled.n_patches,
        )
    )
    (record,) = bus.consumer("t", [events.EMBEDDINGS_READY]).poll(1.0)
    ready = events.decode(record)
    adata = read_anndata(store, ready.embeddings_uri)
    n, d = adata.obsm["X_morph"].shape
    assert n == tiled.n_patches and ready.n_spots == n and ready.dim == d
    assert adata.obsm["X_morph_aug"].shape == (n, 3, d)  # view 0 clean, then 2 augmented
    assert (adata.obsm["X_morph_aug"][:, 0] == adata.obsm["X_morph"]).all()


def test_views_are_a_project_setting_and_only_made_where_a_head_draws_them(
    shared_data: Path, tmp_path: Path
) -> None:
    from histoloop.embedding.step import augment_views
    from histoloop.v1 import common_pb2

    settings = load_settings(data_dir=tmp_path, embedder="handcrafted")
    morph = common_pb2.FEATURE_SET_MORPHOLOGY
    assert (
        augment_views(common_pb2.LoopConfig(head="mlp", features=morph), settings) == 0
    )  # off by evidence
    assert (
        augment_views(common_pb2.LoopConfig(head="mlp", features=morph, augment_views=10), settings)
        == 10
    )
    assert (
        augment_views(common_pb2.LoopConfig(head="mlp", features=morph, augment_views=0), settings)
        == 0
    )
    assert (
        augment_views(
            common_pb2.LoopConfig(head="logreg", features=morph, augment_views=4), settings
        )
        == 0
    )
    assert (
        augment_views(common_pb2.LoopConfig(features=common_pb2.FEATURE_SET_EXPRESSION), settings)
        == 0
    )
    assert augment_views(common_pb2.LoopConfig(head="multimodal", augment_views=4), settings) == 4
    override = load_settings(data_dir=tmp_path, embedder="handcrafted", augment_views=0)
    assert augment_views(common_pb2.LoopConfig(head="mlp", augment_views=4), override) == 0

    store = LocalArtifactStore(tmp_path / "artifacts")
    bus = EmbeddedBus(tmp_path / "events.sqlite")
    tiled = tile_wsi(
        shared_data / "wsi" / "CMU-1-Small-Region.svs",
        store,
        "tiles/p/wsi",
        mpp=4.0,
        tile_size=64,
        workers=1,
    )
    step = EmbeddingStep(store, bus, settings)
    step.on_tiles(
        events_pb2.TilesReady(
            meta=events.new_meta(project="p", dataset="wsi", producer="test"),
            patches_uri=store.uri(tiled.manifest_key),
            n_tiles=tiled.n_patches,
            config=common_pb2.LoopConfig(head="mlp", features=morph, augment_views=1),
        )
    )
    (record,) = bus.consumer("t", [events.EMBEDDINGS_READY]).poll(1.0)
    adata = read_anndata(store, events.decode(record).embeddings_uri)
    assert adata.obsm["X_morph_aug"].shape[1] == 2 and adata.uns["embedding"]["n_augment"] == 1
