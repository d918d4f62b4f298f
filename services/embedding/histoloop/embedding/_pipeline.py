"""One dataset end to end: patch-set artifact → embeddings artifact."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoloop.artifacts import ArtifactExists, ArtifactStore
from histoloop.embedding._anndata import build_embedding_anndata, write_embeddings
from histoloop.embedding._augment import embed_views
from histoloop.embedding._base import Embedder, EmbeddingShapeError
from histoloop.embedding._expression import (
    ExpressionParams,
    fit_expression,
    read_expression,
    transform_expression,
)
from histoloop.errors import InvalidArgument
from histoloop.formats.patches import PatchSet

__all__ = ["EmbeddingResult", "embed_dataset"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingResult:
    """What :func:`embed_dataset` wrote.

    Attributes:
        key: the ``.h5ad`` artifact key.
        n: rows (spots or tiles).
        dim: morphology vector length.
        model: model name; ``version`` its version.
        n_views: views per patch (1 + augmentations).
        expr_dim: expression feature length (0 without expression).
        seconds: wall time.
    """

    key: str
    n: int
    dim: int
    model: str
    version: str
    n_views: int
    expr_dim: int
    seconds: float


def embed_dataset(
    store: ArtifactStore,
    patches_prefix: str,
    embedder: Embedder,
    out_key: str,
    *,
    n_augment: int = 0,
    seed: int = 0,
    expression: str | Path | None = None,
    expression_params: ExpressionParams | None = None,
    n_top_genes: int = 1000,
    n_pcs: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> EmbeddingResult:
    """Embed every patch of a stored patch set and write one AnnData artifact.

    Streams the patch chunks (one chunk in memory at a time), embeds the clean view and
    ``n_augment`` augmented views of each patch, adds expression features when an
    expression file is given, and writes ``.h5ad`` to ``out_key``.

    Args:
        store: the artifact store holding the patches; the embeddings go there too.
        patches_prefix: the patch set's prefix (``TilingResult.prefix``).
        embedder: from :func:`make_embedder`.
        out_key: key of the ``.h5ad`` to write.
        n_augment: augmented views per patch (ActiveVisium repetitions), 0 for none.
        seed: augmentation seed.
        expression: optional 10x ``.h5`` / ``.h5ad`` with the spots' counts.
        expression_params: parameters fitted on another dataset, to transform this one
            the same way (transfer); otherwise they are fitted here.
        n_top_genes: highly variable genes when fitting.
        n_pcs: PCA components when fitting (None: none).
        on_progress: ``on_progress(done, total)`` patches after each chunk.

    Raises:
        ArtifactNotFound: no patch set under ``patches_prefix``.
        ArtifactExists: ``out_key`` is taken.
        InvalidArgument: patches of the wrong size for the model, expression rows missing.
        Unavailable, EmbeddingShapeError: from the embedder.
    """
    started = time.perf_counter()
    if store.exists(out_key):
        raise ArtifactExists(f"artifact {out_key!r} exists already; artifacts are immutable")
    patches = PatchSet.open(store, patches_prefix)
    size = embedder.input_size
    if size is not None and (patches.patch_size, patches.patch_size) != tuple(size):
        raise InvalidArgument(
            f"patch set {patches_prefix} has {patches.patch_size} px patches but model "
            f"{embedder.name!r} takes {size[0]}×{size[1]}; tile again with patch_size={size[0]}"
        )
    n, dim = patches.n, embedder.dim
    views = np.empty((n_augment + 1, n, dim), dtype=np.float32)
    order: list[np.ndarray] = []
    done = 0
    if on_progress is not None:
        on_progress(0, n)
    for stored in patches.iter_chunks():
        rows, chunk = stored.index, stored.patches
        k = len(chunk)
        out = embed_views(embedder, chunk, n_augment, seed=seed, start=done)
        if out.shape != (n_augment + 1, k, dim):
            raise EmbeddingShapeError(
                f"embedder {embedder.name!r} returned {out.shape}; expected {(n_augment + 1, k, dim)}"
            )
        views[:, done : done + k] = out
        order.append(rows.index.to_numpy())
        done += k
        if on_progress is not None:
            on_progress(done, n)
    index = patches.index.loc[np.concatenate(order)] if order else patches.index
    expr, params = None, None
    if expression is not None:
        counts = read_expression(expression).subset(index["id"].astype(str))
        if expression_params is not None:
            expr, params = transform_expression(counts, expression_params), expression_params
        else:
            expr, params = fit_expression(counts, n_top_genes=n_top_genes, n_pcs=n_pcs)
    adata = build_embedding_anndata(
        index.reset_index(drop=True),
        views[0],
        model_name=embedder.name,
        model_version=embedder.version,
        morph_aug=views if n_augment else None,
        expr=expr,
        expr_params=params,
        uns={
            "patches": patches.prefix,
            "patch_size": patches.patch_size,
            "kind": str(patches.manifest.get("kind", "")),
            "n_augment": n_augment,
            "seed": seed,
            "expression_source": str(expression) if expression is not None else "",
        },
    )
    write_embeddings(store, out_key, adata)
    seconds = time.perf_counter() - started
    log.info(
        "embedded %d patches of %s with %s (%d-d, %d views) in %.1fs → %s",
        n,
        patches_prefix,
        embedder.name,
        dim,
        n_augment + 1,
        seconds,
        out_key,
    )
    return EmbeddingResult(
        key=out_key,
        n=n,
        dim=dim,
        model=embedder.name,
        version=embedder.version,
        n_views=n_augment + 1,
        expr_dim=0 if expr is None else int(expr.shape[1]),
        seconds=seconds,
    )
