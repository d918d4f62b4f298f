"""Predict every spot with a trained model; align another dataset's genes for transfer.

The model's stored source-dataset scaling is applied to whatever features are given,
so a model trained on one section predicts another section (or patient) with the same
normalisation. For gene features, :func:`align_genes` reorders the target's genes to
the source's order by name, fills genes the target lacks with zeros and reports them;
passing that list as ``missing_genes`` to :func:`predict` sets those inputs to the
source mean after scaling (a neutral value) instead of a spurious "zero expression".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from histoloop.errors import InvalidArgument
from histoloop.training.heads import EnsembleHead, HeadInput
from histoloop.training.mc_dropout import mc_dropout_proba, mc_masks_for
from histoloop.training.pipeline import TrainedModel, feature_dims, prepare_features

__all__ = ["ModelOutput", "align_genes", "predict"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ModelOutput:
    """The model's view of every spot (in memory; the stored artifact is
    :class:`histoloop.datasets.Predictions`).

    Attributes:
        probabilities: ``(n, C)`` float32 class probabilities.
        hidden: ``(n, h)`` float32 hidden features (for diversity strategies).
        predicted: ``(n,)`` int64 most likely class index.
        classes: Class names by index.
        member_probabilities: ``(M, n, C)`` float32 for ensemble heads and for heads
            sampling MC-dropout (``M`` = passes), else None.
    """

    probabilities: np.ndarray
    hidden: np.ndarray
    predicted: np.ndarray
    classes: tuple[str, ...]
    member_probabilities: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        """``(n,)`` predicted class names."""
        return np.asarray(self.classes, dtype=object)[self.predicted]

    @property
    def confidence(self) -> np.ndarray:
        """``(n,)`` probability of the predicted class."""
        return self.probabilities.max(axis=1)


def align_genes(
    source_gene_names: Sequence[str],
    target_matrix: np.ndarray,
    target_gene_names: Sequence[str],
) -> tuple[np.ndarray, list[str]]:
    """Reorder a target expression matrix to the source's genes, by name.

    Args:
        source_gene_names: Genes the model was trained on, in its column order.
        target_matrix: ``(n, g_t)`` target expression (dense or scipy sparse).
        target_gene_names: The target's gene names, one per column.

    Returns:
        ``(aligned, missing)``: ``(n, len(source))`` float32 with zeros for genes the
        target lacks, and the list of those missing gene names (source order).

    Raises:
        InvalidArgument: Shape/name mismatch or duplicate target names.
    """
    if hasattr(target_matrix, "toarray"):
        target_matrix = target_matrix.toarray()
    T = np.asarray(target_matrix, dtype=np.float32)
    target = [str(g) for g in target_gene_names]
    if T.ndim != 2 or T.shape[1] != len(target):
        raise InvalidArgument(
            f"target matrix {T.shape} does not match {len(target)} target gene names"
        )
    if len(set(target)) != len(target):
        raise InvalidArgument("target gene names contain duplicates")
    position = {g: i for i, g in enumerate(target)}
    source = [str(g) for g in source_gene_names]
    cols = np.asarray([position.get(g, -1) for g in source], dtype=np.int64)
    aligned = np.zeros((T.shape[0], len(source)), dtype=np.float32)
    found = cols >= 0
    aligned[:, found] = T[:, cols[found]]
    missing = [g for g, ok in zip(source, found, strict=True) if not ok]
    if missing:
        log.info("transfer: %d of %d source genes missing in the target", len(missing), len(source))
    return aligned, missing


def _neutral_columns(model: TrainedModel, missing_genes: Sequence[str]) -> dict[str, list[int]]:
    if not missing_genes:
        return {}
    out: dict[str, list[int]] = {}
    wanted = set(missing_genes)
    for key, scaling in model.scaling.items():
        if scaling.names is not None:
            cols = [i for i, name in enumerate(scaling.names) if name in wanted]
            if cols:
                out[key] = cols
    if not out:
        log.info("missing genes given but the model stores no gene names; ignored")
    return out


def predict(
    model: TrainedModel,
    features: HeadInput,
    *,
    missing_genes: Sequence[str] = (),
) -> ModelOutput:
    """Class probabilities and hidden features for every spot.

    Args:
        model: A :class:`TrainedModel`.
        features: Raw features of every spot, same structure as in training
            (``(n, d)`` array or ``{"image": …, "genes": …}``; views are not used).
        missing_genes: Genes absent from this dataset (from :func:`align_genes`);
            their inputs are set to the source mean after scaling.

    Returns:
        :class:`ModelOutput`.

    Raises:
        InvalidArgument: Feature keys or dimensions differ from the model's.
    """
    dims = feature_dims(features)
    if dims != model.feature_dims:
        raise InvalidArgument(f"features {dims} do not match the model's {model.feature_dims}")
    if isinstance(features, Mapping):
        features = {k: (v[0] if np.ndim(v) == 3 else v) for k, v in features.items()}
    elif np.ndim(features) == 3:
        features = np.asarray(features)[0]
    X = prepare_features(features, model.scaling, neutral=_neutral_columns(model, missing_genes))
    head = model.loaded_head
    members = head.member_proba(X) if isinstance(head, EnsembleHead) else None
    P = members.mean(axis=0) if members is not None else head.predict_proba(X)
    if members is None and mc_masks_for(head) is not None:
        members = mc_dropout_proba(head, X)  # P stays the deterministic (dropout-off) prediction
    return ModelOutput(
        probabilities=P,
        hidden=head.hidden(X),
        predicted=P.argmax(axis=1).astype(np.int64),
        classes=model.classes,
        member_probabilities=members,
    )
