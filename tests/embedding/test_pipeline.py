"""Augmentation views, the embeddings AnnData, and patches artifact → embeddings artifact."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histoloop.artifacts import ArtifactExists
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.embedding import (
    ExpressionParams,
    HandcraftedEmbedder,
    augment_patches,
    build_embedding_anndata,
    embed_dataset,
    embed_views,
    fit_expression,
    make_embedder,
    read_embeddings,
    read_expression,
    write_embeddings,
)
from histoloop.errors import InvalidArgument
from histoloop.tiling import PatchSet, TilingResult
from tests.embedding.conftest import TOY, TOY_DIM


@pytest.fixture(scope="module")
def patches(visium_patches: tuple[LocalArtifactStore, TilingResult]) -> PatchSet:
    store, result = visium_patches
    return PatchSet.open(store, result.prefix)


def _mean_embedder(p: np.ndarray) -> np.ndarray:
    return p.reshape(len(p), -1, 3).mean(axis=1).astype(np.float32)


# -- augmentation ------------------------------------------------------------------------


def test_views_are_seeded_and_independent_of_chunking(patches: PatchSet) -> None:
    p = patches.read_all()[:12]
    views = embed_views(_mean_embedder, p, 3, seed=7)
    assert views.shape == (4, 12, 3) and views.dtype == np.float32
    np.testing.assert_array_equal(views[0], _mean_embedder(p))  # view 0 is clean
    np.testing.assert_array_equal(views, embed_views(_mean_embedder, p, 3, seed=7))
    halves = np.concatenate(
        [
            embed_views(_mean_embedder, p[:5], 3, seed=7, start=0),
            embed_views(_mean_embedder, p[5:], 3, seed=7, start=5),
        ],
        axis=1,
    )
    np.testing.assert_array_equal(views, halves)
    assert not np.array_equal(views[1], views[2])
    assert not np.array_equal(embed_views(_mean_embedder, p, 1, seed=8)[1], views[1])


def test_augmentations_keep_patches_valid(patches: PatchSet) -> None:
    p = patches.read_all()[:6]
    a = augment_patches(p, 1, seed=0)
    assert a.shape == p.shape and a.dtype == np.uint8 and not np.array_equal(a, p)
    # flips, rotations, blur, noise and gamma keep the colour statistics close
    assert np.abs(a.mean(axis=(1, 2, 3)).astype(float) - p.mean(axis=(1, 2, 3))).max() < 25
    assert augment_patches(p, 0) is p
    with pytest.raises(InvalidArgument):
        embed_views(_mean_embedder, p, -1)


# -- AnnData -----------------------------------------------------------------------------


def test_build_write_read_round_trip(tmp_path: Path, patches: PatchSet) -> None:
    index = patches.index
    n = len(index)
    rng = np.random.default_rng(0)
    morph = rng.normal(size=(n, 5)).astype(np.float32)
    aug = np.stack([morph, morph + 1, morph + 2])
    expr = rng.normal(size=(n, 7)).astype(np.float32)
    params = ExpressionParams(
        gene_ids=np.array([f"G{i}" for i in range(7)], dtype=object),
        gene_names=np.array([f"g{i}" for i in range(7)], dtype=object),
        target_sum=1e4,
        n_genes_input=50,
    )
    adata = build_embedding_anndata(
        index,
        morph,
        model_name="toy",
        model_version="3",
        morph_aug=aug,
        expr=expr,
        expr_params=params,
        uns={"patches": "proj/cmu/tiles"},
    )
    assert list(adata.obs_names) == list(index["id"]) and adata.obs_names.name == "barcode"
    for column in (
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
        "in_tissue",
    ):
        assert column in adata.obs.columns
    assert "chunk" not in adata.obs.columns
    assert adata.obsm["X_morph_aug"].shape == (n, 3, 5)
    np.testing.assert_array_equal(adata.obsm["X_morph_aug"][:, 0], morph)
    np.testing.assert_array_equal(adata.obsm["spatial"][:, 0], index["pxl_col_in_fullres"])
    store = LocalArtifactStore(tmp_path / "store")
    info = write_embeddings(store, "proj/cmu/emb/toy.h5ad", adata)
    assert info.size > 0
    back = read_embeddings(store, "proj/cmu/emb/toy.h5ad")
    for key in ("X_morph", "X_morph_aug", "X_expr", "spatial"):
        np.testing.assert_array_equal(back.obsm[key], adata.obsm[key])
    assert back.uns["embedding"]["model"] == "toy" and back.uns["embedding"]["version"] == "3"
    assert list(ExpressionParams.from_uns(back.uns["expression"]).gene_ids) == list(params.gene_ids)
    pd.testing.assert_frame_equal(back.obs, adata.obs, check_dtype=False)
    with pytest.raises(ArtifactExists):
        write_embeddings(store, "proj/cmu/emb/toy.h5ad", adata)
    with pytest.raises(InvalidArgument):
        build_embedding_anndata(index, morph[:3], model_name="x")


# -- the whole dataset -------------------------------------------------------------------


def _fake_counts(path: Path, barcodes: list[str], n_genes: int = 60) -> Path:
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(
        rng.poisson(rng.gamma(2, 1, n_genes), (len(barcodes), n_genes)).astype(np.float32)
    )
    var = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(n_genes)])
    anndata.AnnData(X=counts, obs=pd.DataFrame(index=barcodes[::-1]), var=var).write_h5ad(path)
    return path


def test_embed_dataset_handcrafted_with_expression_and_views(
    visium_patches: tuple[LocalArtifactStore, TilingResult], tmp_path: Path
) -> None:
    store, tiles = visium_patches
    index = PatchSet.open(store, tiles.prefix).index
    counts = _fake_counts(tmp_path / "counts.h5ad", list(index["id"])[::-1])  # other order
    progress: list[tuple[int, int]] = []
    result = embed_dataset(
        store,
        tiles.prefix,
        HandcraftedEmbedder(),
        "proj/cmu/emb/hc.h5ad",
        n_augment=2,
        seed=1,
        expression=counts,
        n_top_genes=20,
        n_pcs=5,
        on_progress=lambda d, t: progress.append((d, t)),
    )
    n = tiles.n_patches
    assert (result.n, result.n_views, result.expr_dim) == (n, 3, 5)
    assert (
        progress[0] == (0, n)
        and progress[-1] == (n, n)
        and len(progress) == 1 + len(tiles.patch_keys)
    )
    adata = read_embeddings(store, result.key)
    assert adata.n_obs == n and set(adata.obs_names) == set(index["id"])
    assert adata.obsm["X_morph"].shape == (n, HandcraftedEmbedder().dim)
    assert adata.obsm["X_morph_aug"].shape == (n, 3, HandcraftedEmbedder().dim)
    np.testing.assert_array_equal(adata.obsm["X_morph_aug"][:, 0], adata.obsm["X_morph"])
    assert adata.uns["embedding"]["model"] == "handcrafted-morphology"
    assert adata.uns["embedding"]["n_augment"] == 2
    # the clean vectors are those of the patches with the same barcode
    all_patches = PatchSet.open(store, tiles.prefix)
    direct = HandcraftedEmbedder().embed(all_patches.read_all())
    order = pd.Index(all_patches.index["id"]).get_indexer(adata.obs_names)
    np.testing.assert_array_equal(adata.obsm["X_morph"], direct[order])
    # expression rows follow the barcodes, not the file's order
    expr = read_expression(counts).subset(adata.obs_names)
    x, _ = fit_expression(expr, n_top_genes=20, n_pcs=5)
    np.testing.assert_allclose(adata.obsm["X_expr"], x, atol=1e-4)
    params = ExpressionParams.from_uns(adata.uns["expression"])
    assert params.pca_components.shape == (5, 20)


def test_embed_dataset_with_the_onnx_model(
    visium_patches: tuple[LocalArtifactStore, TilingResult], model_repo: Path
) -> None:
    store, tiles = visium_patches
    onnx = make_embedder("onnx", model_repository=model_repo, model_name=TOY)
    # the manifest key (what a tiles.ready event carries, as a URI) works as the prefix
    result = embed_dataset(store, tiles.manifest_key, onnx, "proj/cmu/emb/toy.h5ad")
    adata = read_embeddings(store, result.key)
    assert adata.obsm["X_morph"].shape == (tiles.n_patches, TOY_DIM)
    assert "X_morph_aug" not in adata.obsm and "X_expr" not in adata.obsm
    assert adata.uns["embedding"]["model"] == TOY and adata.uns["embedding"]["version"] == "1"
    with pytest.raises(ArtifactExists):
        embed_dataset(store, tiles.prefix, onnx, "proj/cmu/emb/toy.h5ad")


def test_patch_size_must_fit_the_model(
    visium_patches: tuple[LocalArtifactStore, TilingResult], tmp_path: Path, export_tool: object
) -> None:
    from tests.embedding.models import small_cnn

    export_tool.export_module(small_cnn(4), tmp_path, "small", input_size=64)  # type: ignore[attr-defined]
    store, tiles = visium_patches
    onnx = make_embedder("onnx", model_path=tmp_path / "small" / "1" / "model.onnx")
    with pytest.raises(InvalidArgument, match="patch_size=64"):
        embed_dataset(store, tiles.prefix, onnx, "proj/cmu/emb/small.h5ad")
