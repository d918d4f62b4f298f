"""The embedding step of the loop: patches (and counts) → one AnnData → ``embeddings.ready``.

The AnnData is written in one put under a key derived from the event id, so a crash mid-way
leaves nothing behind and a redelivered event re-announces the stored result.
"""

from __future__ import annotations

import io
import logging
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from histoloop import events
from histoloop.artifacts.base import ArtifactStore
from histoloop.bus.base import EventBus
from histoloop.config import Settings
from histoloop.datasets import read_anndata
from histoloop.embedding._anndata import build_embedding_anndata, write_embeddings
from histoloop.embedding._base import Embedder
from histoloop.embedding._expression import (
    ExpressionParams,
    fit_expression,
    read_expression,
    transform_expression,
)
from histoloop.embedding._factory import make_embedder
from histoloop.embedding._pipeline import embed_dataset
from histoloop.errors import FailedPrecondition, NotFound
from histoloop.formats.embeddings import (
    embedding_dim,
    embeddings_key,
    embeddings_prefix,
    parse_embeddings_key,
)
from histoloop.formats.vocab import DEFAULT_AUGMENT_VIEWS
from histoloop.metrics import EMBEDDED_PATCHES
from histoloop.progress import ProgressBoard
from histoloop.v1 import common_pb2, events_pb2

__all__ = ["EPOCH_HEADS", "EmbeddingStep", "augment_views", "embedder_from_settings"]

log = logging.getLogger(__name__)
PRODUCER = "embedding"


EPOCH_HEADS = ("mlp", "ensemble", "multimodal")
"""Heads that train by epochs and so draw one augmented view per spot per epoch."""


def augment_views(config: common_pb2.LoopConfig, settings: Settings) -> int:
    """Augmented views to embed for a project: ``HISTOLOOP_AUGMENT_VIEWS`` if set, else the
    project's ``augment_views`` (unset: :data:`~histoloop.formats.vocab.DEFAULT_AUGMENT_VIEWS`); 0 when its head does not train by epochs or its
    features use no image (the views would never be drawn)."""
    if settings.augment_views is not None:
        return settings.augment_views
    if config.head and config.head not in EPOCH_HEADS:
        return 0
    if config.features == common_pb2.FEATURE_SET_EXPRESSION:
        return 0
    return int(config.augment_views) if config.HasField("augment_views") else DEFAULT_AUGMENT_VIEWS


def embedder_from_settings(settings: Settings) -> Embedder:
    """The embedder the settings choose (Triton, in-process ONNX, EfficientNet-Lite0, or
    handcrafted features, the last only when named)."""
    kind = settings.embedder_backend
    if kind == "triton":
        return make_embedder(
            "triton",
            url=settings.triton_url,
            model_name=settings.triton_model,
            model_version=settings.triton_model_version,
        )
    if kind == "onnx":
        return make_embedder("onnx", model_path=settings.model_path)
    if kind == "efficientnet":
        return make_embedder("efficientnet")
    return make_embedder("handcrafted")


class EmbeddingStep:
    """Embeds tiled datasets and announces the vectors."""

    def __init__(self, store: ArtifactStore, bus: EventBus, settings: Settings) -> None:
        self.store = store
        self.bus = bus
        self.settings = settings
        self.progress = ProgressBoard()
        self._embedder: Embedder | None = None
        self._lock = threading.Lock()
        log.info(
            "embedder: %s (HISTOLOOP_EMBEDDER=%s)", settings.embedder_backend, settings.embedder
        )

    @property
    def embedder(self) -> Embedder:
        """Created on first use, so the service starts (and reports health) before Triton is up."""
        with self._lock:
            if self._embedder is None:
                self._embedder = embedder_from_settings(self.settings)
            return self._embedder

    def ping(self) -> None:
        """Health: the embedder's backend answers (Triton in distributed mode)."""
        if self.settings.embedder_backend == "triton":
            self.embedder.ping()

    def close(self) -> None:
        """Release the embedder's connections."""
        if self._embedder is not None:
            self._embedder.close()

    def on_tiles(self, msg: events_pb2.TilesReady, _record: object = None) -> None:
        """Handle ``tiles.ready``."""
        project, dataset = msg.meta.project, msg.meta.dataset
        key = embeddings_key(project, dataset, events.derived_id(msg.meta.event_id, "embeddings"))
        if not self.store.exists(key):
            self.progress.begin(project, dataset, "embedding")
            try:
                with tempfile.TemporaryDirectory(prefix="histoloop-embedding-") as tmp:
                    expression = (
                        self._fetch(msg.expression_uri, Path(tmp)) if msg.expression_uri else None
                    )
                    self._embed(msg, key, expression)
            except Exception as exc:
                self.progress.finish(project, dataset, error=str(exc))
                raise
            self.progress.finish(project, dataset)
        adata = read_anndata(self.store, self.store.uri(key))
        dim = embedding_dim(adata.obsm)
        meta = dict(adata.uns.get("embedding", {}))
        message = events_pb2.EmbeddingsReady(
            meta=events.new_meta(
                project=project,
                dataset=dataset,
                producer=PRODUCER,
                event_id=events.derived_id(msg.meta.event_id, "embeddings"),
                source_versions={**msg.meta.source_versions, "tiles": msg.meta.event_id},
                trace_id=msg.meta.trace_id,
            ),
            embeddings_uri=self.store.uri(key),
            model_name=str(meta.get("model", "")),
            model_version=str(meta.get("version", "")),
            n_spots=adata.n_obs,
            dim=dim,
            config=msg.config,
        )
        events.publish(self.bus, message)
        log.info("embeddings ready for %s/%s: %d spots, %d-d", project, dataset, adata.n_obs, dim)

    def latest_embeddings(self, project: str, dataset: str) -> tuple[str, int, int]:
        """``(uri, n_spots, dim)`` of a dataset's newest embeddings artifact.

        Raises:
            NotFound: the dataset has no embeddings yet.
        """
        infos = [
            i
            for i in self.store.list(embeddings_prefix(project, dataset))
            if i.key.endswith(".h5ad")
        ]
        if not infos:
            raise NotFound(f"dataset {project}/{dataset} has no embeddings yet")
        latest = max(infos, key=lambda i: i.created)
        n_obs, dim = latest.metadata.get("n_obs"), latest.metadata.get("dim")
        if n_obs is None or dim is None:  # written before the metadata carried them
            adata = read_anndata(self.store, self.store.uri(latest.key))
            return self.store.uri(latest.key), adata.n_obs, embedding_dim(adata.obsm)
        return self.store.uri(latest.key), int(n_obs), int(dim)

    def reference_expression(self, project: str, dataset: str) -> ExpressionParams | None:
        """The expression transform of the project's first embedded dataset (transfer).

        Every later dataset of a project is mapped into the same gene space — genes matched by
        id, the ones it lacks set to zero — so one model serves all of them.
        """
        others = [
            i
            for i in self.store.list(embeddings_prefix(project))
            if i.key.endswith(".h5ad") and parse_embeddings_key(i.key).dataset != dataset
        ]
        if not others:
            return None
        first = min(others, key=lambda i: (i.created, i.key))
        uns = read_anndata(self.store, self.store.uri(first.key)).uns
        return ExpressionParams.from_uns(dict(uns["expression"])) if "expression" in uns else None

    def _embed(self, msg: events_pb2.TilesReady, key: str, expression: Path | None) -> None:
        project, dataset = msg.meta.project, msg.meta.dataset
        reference = self.reference_expression(project, dataset) if expression is not None else None
        if msg.patches_uri:

            def on_progress(done: int, total: int) -> None:
                self.progress.update(project, dataset, done, total)

            views = augment_views(msg.config, self.settings)
            if views:
                log.info(
                    "embedding %s/%s with %d augmented views per spot: %d× the embedding cost "
                    "of clean patches alone",
                    project,
                    dataset,
                    views,
                    views + 1,
                )
            result = embed_dataset(
                self.store,
                self.store.key_from_uri(msg.patches_uri),
                self.embedder,
                key,
                expression=expression,
                expression_params=reference,
                n_augment=views,
                seed=int(msg.config.seed),
                on_progress=on_progress,
            )
            EMBEDDED_PATCHES.labels(embedder=result.model).inc(result.n)
            return
        if expression is None or not msg.spots_uri:
            raise FailedPrecondition(
                f"dataset {project}/{dataset} has no patches and no expression counts"
            )
        spots = pd.read_csv(io.BytesIO(self.store.get(self.store.key_from_uri(msg.spots_uri))))
        spots = (
            spots[spots["in_tissue"] == 1].rename(columns={"barcode": "id"}).reset_index(drop=True)
        )
        counts = read_expression(expression).subset(spots["id"].astype(str))
        if reference is None:
            features, params = fit_expression(counts)
            missing: list[str] = []
        else:
            features, params = transform_expression(counts, reference), reference
            present = set(map(str, counts.gene_ids))
            missing = [str(g) for g in reference.gene_ids if str(g) not in present]
        self.progress.update(project, dataset, len(spots), len(spots), "expression features")
        adata = build_embedding_anndata(
            spots,
            None,
            model_name="expression",
            expr=features.astype(np.float32),
            expr_params=params,
            uns={"expression_source": expression.name},
        )
        adata.uns["missing_genes"] = missing
        write_embeddings(self.store, key, adata)

    def _fetch(self, uri: str, folder: Path) -> Path:
        key = self.store.key_from_uri(uri)
        return self.store.get_file(key, folder / key.rsplit("/", 1)[-1])
