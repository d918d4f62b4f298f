"""A small real data set for simulation tests: 1,500 spots of DLPFC 151510."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histoloop.simulation import SimulationConfig


@pytest.fixture(scope="session")
def small_adata(shared_data: Path):
    import anndata as ad

    full = ad.read_h5ad(shared_data / "dlpfc" / "151510" / "dlpfc151510_500genes.h5ad")
    rows = np.sort(np.random.default_rng(0).choice(full.n_obs, 1500, replace=False))
    return full[rows].copy()


@pytest.fixture(scope="session")
def small_h5ad(small_adata, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.h5ad"
    small_adata.write_h5ad(path)
    return path


@pytest.fixture()
def config() -> SimulationConfig:
    """Fast: logreg on 10 PCs + neighbour means, 3 strategies, 2 seeds, 4 rounds of 20."""
    return SimulationConfig(
        label_column="layer",
        pca=10,
        neighbours=6,
        heads=("logreg",),
        strategies=("random", "entropy", "typiclust"),
        seeds=2,
        query_size=20,
        rounds=4,
    )
