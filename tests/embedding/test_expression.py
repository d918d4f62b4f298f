"""Gene-expression features: 10x h5 and h5ad readers, normalisation, HVGs, PCA, transfer."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histoloop.embedding import (
    ExpressionMatrix,
    ExpressionParams,
    fit_expression,
    highly_variable_genes,
    log_normalize,
    read_10x_h5,
    read_expression,
    read_h5ad_counts,
    transform_expression,
)
from histoloop.errors import InvalidArgument, NotFound


@pytest.fixture(scope="module")
def dlpfc(shared_data: Path) -> Path:
    return shared_data / "dlpfc" / "151510"


def test_both_readers_give_the_same_matrix(dlpfc: Path) -> None:
    h5 = read_10x_h5(dlpfc / "filtered_feature_bc_matrix_500genes.h5")
    ad = read_h5ad_counts(dlpfc / "dlpfc151510_500genes.h5ad")
    assert h5.counts.shape == (4634, 500) and h5.counts.nnz == 1_112_107
    assert list(h5.gene_ids) == list(ad.gene_ids)
    # the same barcodes in a shuffled order still give the same rows
    barcodes = np.random.default_rng(0).permutation(h5.barcodes)
    a, b = h5.subset(barcodes), ad.subset(barcodes)
    assert list(a.barcodes) == list(b.barcodes) == list(barcodes)
    assert (a.counts != b.counts).nnz == 0
    assert a.counts.dtype == np.float32


def test_reader_errors(tmp_path: Path, dlpfc: Path) -> None:
    with pytest.raises(NotFound):
        read_expression(tmp_path / "missing.h5")
    with pytest.raises(InvalidArgument, match="expected a 10x"):
        read_expression(tmp_path / "counts.csv")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(InvalidArgument, match="junk.h5"):
        read_expression(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "partial.h5", "w") as f:
        f.create_dataset("matrix/barcodes", data=np.array([b"A-1"]))
    with pytest.raises(InvalidArgument, match="matrix/data"):
        read_10x_h5(tmp_path / "partial.h5")
    with pytest.raises(InvalidArgument, match="no expression row"):
        read_expression(dlpfc / "filtered_feature_bc_matrix_500genes.h5").subset(["NOPE-1"])


def test_log_normalize() -> None:
    counts = sp.csr_matrix(np.array([[1, 3, 0], [0, 0, 0], [5, 5, 0]], np.float32))
    out = log_normalize(counts, 100).toarray()
    np.testing.assert_allclose(out[0], np.log1p([25, 75, 0]), rtol=1e-6)
    np.testing.assert_allclose(out[1], 0)
    np.testing.assert_allclose(np.expm1(out[2]).sum(), 100, rtol=1e-5)


def _reference_hvg(log_norm: np.ndarray, n_top: int, n_bins: int = 20) -> np.ndarray:
    """Straight per-gene pandas version of the Seurat flavour (scanpy's seurat recipe)."""
    x = np.expm1(log_norm.astype(np.float64))
    df = pd.DataFrame({"mean": x.mean(0), "var": x.var(0, ddof=1)})
    df.loc[df["mean"] == 0, "mean"] = 1e-12
    df["disp"] = np.log((df["var"] / df["mean"]).replace(0, np.nan))
    df["bin"] = pd.cut(np.log1p(df["mean"]), bins=n_bins)
    stats = df.groupby("bin", observed=False)["disp"].agg(["mean", "std"])
    single = stats["std"].isna()
    stats.loc[single, "std"] = stats.loc[single, "mean"]
    stats.loc[single, "mean"] = 0
    norm = (df["disp"] - stats.loc[df["bin"], "mean"].to_numpy()) / stats.loc[
        df["bin"], "std"
    ].to_numpy()
    norm = norm.fillna(-np.inf).to_numpy()
    return np.sort(np.argsort(-norm, kind="stable")[:n_top])


def _synthetic(n_spots: int = 300, n_genes: int = 200, seed: int = 0) -> ExpressionMatrix:
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, n_genes)
    base[:10] = np.linspace(0.8, 5.0, 10)  # 10 marker genes spread over the mean bins
    group = rng.integers(0, 3, n_spots)
    rates = np.tile(base, (n_spots, 1))
    rates[:, :10] *= np.array([0.2, 1.0, 3.0])[group][:, None]
    counts = rng.poisson(rates).astype(np.float32)
    ids = np.array([f"ENSG{i:011d}" for i in range(n_genes)], dtype=object)
    return ExpressionMatrix(
        sp.csr_matrix(counts),
        np.array([f"S{i}-1" for i in range(n_spots)], dtype=object),
        ids,
        ids.copy(),
        Path("synthetic"),
    )


def test_hvg_matches_the_reference_and_finds_marker_genes(dlpfc: Path) -> None:
    expr = _synthetic()
    norm = log_normalize(expr.counts, 1e4)
    hvg = highly_variable_genes(norm, 20)
    np.testing.assert_array_equal(hvg, _reference_hvg(norm.toarray(), 20))
    assert len(set(range(10)) & set(hvg.tolist())) >= 9
    real = read_expression(dlpfc / "filtered_feature_bc_matrix_500genes.h5")
    real_norm = log_normalize(real.counts, 1e4)
    np.testing.assert_array_equal(
        highly_variable_genes(real_norm, 100), _reference_hvg(real_norm.toarray(), 100)
    )


def test_fewer_genes_than_asked_uses_them_all(
    dlpfc: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expr = read_expression(dlpfc / "dlpfc151510_500genes.h5ad")
    with caplog.at_level(logging.WARNING):
        x, params = fit_expression(expr, n_top_genes=1000)
    assert x.shape == (4634, 500) and params.n_features == 500
    assert "500 genes" in caplog.text and "1000" in caplog.text


def test_fit_then_transfer_to_another_dataset(dlpfc: Path) -> None:
    expr = read_expression(dlpfc / "filtered_feature_bc_matrix_500genes.h5")
    x, params = fit_expression(expr, n_top_genes=200, scale=True, n_pcs=30)
    assert x.shape == (4634, 30) and params.pca_components.shape == (30, 200)
    assert len(params.gene_ids) == 200
    # the same data transformed with the stored parameters gives the same features
    np.testing.assert_allclose(transform_expression(expr, params), x, atol=1e-4)
    # parameters survive a round trip through AnnData's uns
    again = ExpressionParams.from_uns(params.to_uns())
    np.testing.assert_allclose(transform_expression(expr, again), x, atol=1e-4)
    # another dataset with the genes in another order and some missing
    keep = np.random.default_rng(1).permutation(500)[:450]
    other = ExpressionMatrix(
        expr.counts[:100][:, keep],
        expr.barcodes[:100],
        expr.gene_ids[keep],
        expr.gene_names[keep],
        Path("other.h5"),
    )
    y = transform_expression(other, params)
    assert y.shape == (100, 30) and np.isfinite(y).all()
    disjoint = ExpressionMatrix(
        expr.counts[:5],
        expr.barcodes[:5],
        np.array([f"X{i}" for i in range(500)], dtype=object),
        expr.gene_names,
        Path("mouse.h5"),
    )
    with pytest.raises(InvalidArgument, match="none of the 200"):
        transform_expression(disjoint, params)


def test_no_pca_gives_log_normalised_hvgs() -> None:
    expr = _synthetic()
    x, params = fit_expression(expr, n_top_genes=25, target_sum=None)
    assert x.shape == (300, 25) and params.pca_components is None
    totals = np.asarray(expr.counts.sum(axis=1)).ravel()
    assert params.target_sum == pytest.approx(float(np.median(totals)))
    hvg = highly_variable_genes(log_normalize(expr.counts, params.target_sum), 25)
    np.testing.assert_allclose(
        x, log_normalize(expr.counts, params.target_sum)[:, hvg].toarray(), rtol=1e-6
    )
