"""Harmony integration of a multi-dataset project's expression features (ActiveVisium).

When a project holds several sections (patients, slides, runs), their expression features
differ by batch as well as by biology, and a model trained on one section's labels
transfers poorly to the next. With the project setting ``LoopConfig.harmony`` the
expression block of every dataset is standardised over all datasets together, reduced to
``n_pcs`` principal components and integrated with Harmony (Korsunsky et al., 2019;
``harmonypy``), the dataset being the batch. Training and prediction both call
:func:`project_feature_blocks`, so they see the same integrated features; the result is
a pure function of the embeddings it was computed from and is stored once in the
artifact store (``integration/<digest>.npz``) for the other service to read.

With one dataset, without an expression block, or with ``harmony`` off, the blocks are
returned unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence

import numpy as np

from histoloop.artifacts.base import ArtifactExists, ArtifactStore
from histoloop.datasets import feature_blocks, read_anndata
from histoloop.errors import InvalidArgument

__all__ = ["DEFAULT_PCS", "harmonize", "project_feature_blocks"]

log = logging.getLogger(__name__)

DEFAULT_PCS = 30
"""Principal components of the expression block that Harmony integrates."""


def harmonize(
    blocks: Sequence[np.ndarray], *, n_pcs: int = DEFAULT_PCS, seed: int = 0
) -> list[np.ndarray]:
    """Integrate one feature block per dataset with Harmony.

    Args:
        blocks: ``(n_i, g)`` features of each dataset, same columns.
        n_pcs: Principal components kept (clipped to ``min(g, n) − 1``).
        seed: Harmony's random state.

    Returns:
        ``(n_i, n_pcs)`` float32 integrated PCs per dataset, in the given order.

    Raises:
        InvalidArgument: Fewer than two datasets, differing columns, or non-finite values.
    """
    import harmonypy

    if len(blocks) < 2:
        raise InvalidArgument("harmony needs at least two datasets")
    widths = {b.shape[1] for b in blocks}
    if len(widths) != 1:
        raise InvalidArgument(f"the datasets' expression blocks differ in width: {sorted(widths)}")
    X = np.concatenate([np.asarray(b, dtype=np.float64) for b in blocks])
    if not np.isfinite(X).all():
        raise InvalidArgument("expression features contain NaN or infinite values")
    X -= X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-12] = 1.0
    X /= scale
    k = int(max(1, min(n_pcs, X.shape[1], X.shape[0] - 1)))
    _, _, vt = np.linalg.svd(X[:: max(1, X.shape[0] // 20_000)], full_matrices=False)
    pcs = X @ vt[:k].T
    batch = np.concatenate([np.full(len(b), i) for i, b in enumerate(blocks)]).astype(str)
    result = harmonypy.run_harmony(
        pcs, {"dataset": batch}, "dataset", random_state=seed, verbose=False
    )
    Z = np.asarray(result.Z_corr, dtype=np.float32)
    if Z.shape != pcs.shape:
        Z = Z.T
    bounds = np.cumsum([0] + [len(b) for b in blocks])
    return [Z[bounds[i] : bounds[i + 1]] for i in range(len(blocks))]


def _digest(uris: Sequence[str], features: int, neighbours: int, n_pcs: int, seed: int) -> str:
    text = json.dumps([list(uris), features, neighbours, n_pcs, seed, "harmonypy-2"])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def project_feature_blocks(
    store: ArtifactStore,
    embeddings_uris: Sequence[str],
    features: int,
    spatial_neighbours: int = 0,
    *,
    harmony: bool = False,
    n_pcs: int = DEFAULT_PCS,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """The feature blocks of every dataset of a project, expression integrated if asked.

    Args:
        store: Artifact store (embeddings; the integration cache).
        embeddings_uris: One embeddings artifact per dataset, in project order.
        features: ``common_pb2.FeatureSet`` value.
        spatial_neighbours: k for neighbour-mean features (0 = off).
        harmony: Integrate the ``genes`` block across datasets with Harmony.
        n_pcs: Principal components integrated.
        seed: Harmony's random state.

    Returns:
        Per dataset, ``{"image": …, "genes": …}`` as :func:`histoloop.datasets.feature_blocks`
        gives them, with ``genes`` replaced by ``(n, n_pcs)`` integrated PCs when Harmony ran.
    """
    blocks = [
        feature_blocks(read_anndata(store, uri), features, spatial_neighbours)
        for uri in embeddings_uris
    ]
    if not harmony or len(blocks) < 2 or any("genes" not in b for b in blocks):
        if harmony and len(blocks) >= 2:
            log.info("harmony asked for but the features have no expression block; not integrated")
        return blocks
    key = f"integration/{_digest(embeddings_uris, features, spatial_neighbours, n_pcs, seed)}.npz"
    if store.exists(key):
        with np.load(io.BytesIO(store.get(key))) as npz:
            integrated = [npz[f"d{i}"] for i in range(len(blocks))]
    else:
        integrated = harmonize([b["genes"] for b in blocks], n_pcs=n_pcs, seed=seed)
        buffer = io.BytesIO()
        np.savez(buffer, **{f"d{i}": z for i, z in enumerate(integrated)})
        try:
            store.put(key, buffer.getvalue(), content_type="application/octet-stream")
        except ArtifactExists:
            pass  # the other service stored the same result first
        log.info(
            "harmony: integrated %d datasets (%d spots) into %d PCs",
            len(blocks),
            sum(len(z) for z in integrated),
            integrated[0].shape[1],
        )
    return [{**b, "genes": z} for b, z in zip(blocks, integrated, strict=True)]
