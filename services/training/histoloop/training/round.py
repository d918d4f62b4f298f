"""One round's model, the same for the live loop and for simulation.

:func:`fit_round` is what the training step runs on a label snapshot and what a simulated
campaign runs each round, so a simulated learning curve is the live loop's:

- features: the feature blocks of *every* spot (``{"image": …, "genes": …}``); the
  multimodal head keeps them apart, every other head sees them side by side;
- scaling: standardisation fitted on every spot, labels not used (or given, fitted so);
- head, seed: the project's, the same seed every round;
- validation split: :data:`VALIDATION_FRACTION` of the labels, stratified, for early
  stopping and the reported metrics, for every head;
- resampling: the project's mode;
- views: augmented image views of the labelled spots, ``(views, n_labelled, d)`` with
  view 0 clean, where the head trains by epochs on image features alone;
- warm start: the previous round's model of the same head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from histoloop.formats.vocab import DEFAULT_RESAMPLING, ResamplingMode
from histoloop.presets import head_hyperparameters
from histoloop.training.pipeline import TrainedModel, train_model
from histoloop.training.scaling import FeatureScaling
from histoloop.v1 import common_pb2

__all__ = [
    "MC_DROPOUT_RATE",
    "VALIDATION_FRACTION",
    "VIEW_HEADS",
    "fit_round",
    "head_settings",
    "round_inputs",
]

VALIDATION_FRACTION = 0.1
"""Labelled share held out (stratified) for early stopping and the reported metrics."""
VIEW_HEADS = ("mlp", "ensemble")
"""Heads that train by epochs and so can draw one augmented view per spot per epoch."""


MC_DROPOUT_RATE = 0.25
"""Hidden-layer dropout of an MLP head trained for MC-dropout (the multimodal head's default)."""


def head_settings(config: common_pb2.LoopConfig, head: str) -> dict[str, object]:
    """Head hyper-parameters that the project's settings imply: its preset's, and MC-dropout.

    The preset's come from :func:`histoloop.presets.head_hyperparameters`. With
    ``mc_dropout_samples`` > 0 the ``mlp`` head trains with dropout
    :data:`MC_DROPOUT_RATE` and both torch heads predict that many MC-dropout passes
    (for BALD); other heads ignore it (the ensemble has members of its own).
    """
    settings: dict[str, object] = dict(head_hyperparameters(config.preset, head))
    if config.mc_dropout_samples and head in ("mlp", "multimodal"):
        settings["mc_samples"] = int(config.mc_dropout_samples)
        if head == "mlp":
            settings["dropout"] = MC_DROPOUT_RATE
    return settings


def round_inputs(features: Mapping[str, np.ndarray], head: str) -> dict[str, np.ndarray]:
    """The model's inputs for every spot: the blocks apart (multimodal) or side by side."""
    if head == "multimodal":
        return {k: np.asarray(v) for k, v in features.items()}
    return {"features": np.hstack([np.asarray(features[k]) for k in features])}


def fit_round(
    features: Mapping[str, np.ndarray],
    labelled: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    head: str,
    seed: int,
    classes: Sequence[str],
    resampling: ResamplingMode | str = DEFAULT_RESAMPLING,
    scaling: Mapping[str, FeatureScaling] | None = None,
    views: np.ndarray | None = None,
    previous: TrainedModel | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    validation_fraction: float = VALIDATION_FRACTION,
    resampling_every: int = 0,
) -> TrainedModel:
    """Train one round's model on the labelled spots.

    Args:
        features: Feature blocks of every spot (raw), one row per spot.
        labelled: Row indices of the labelled spots (in any order: the model is trained on
            them in spot order, so the order labels arrived in does not matter).
        labels: Their class names, in the order of ``labelled``.
        head: Head registry name.
        seed: The project's seed (the same every round).
        classes: The project's classes in output order.
        resampling: Adaptive resampling mode.
        scaling: Scaling per model input (see :func:`round_inputs`); default: fitted here
            on every spot of ``features``.
        views: ``(views, len(labelled), d)`` augmented image views (in the order of
            ``labelled``), used by :data:`VIEW_HEADS` on a single feature block and by the
            multimodal head's image branch; None or empty: none.
        previous: The previous round's model (warm start, online resampling).
        hyperparameters: Head hyper-parameters.
        validation_fraction: Stratified validation share.
        resampling_every: ``online`` resampling: re-cluster the hidden layer every this
            many epochs (0: the head's default).

    Returns:
        The :class:`TrainedModel`.

    Raises:
        InvalidArgument: Bad shapes, labels, classes, head or settings.
    """
    inputs = round_inputs(features, head)
    order = np.argsort(
        np.asarray(labelled, dtype=np.int64), kind="stable"
    )  # spot order, however labelled
    rows = np.asarray(labelled, dtype=np.int64)[order]
    labels = np.asarray(labels, dtype=object)[order]
    if views is not None and views.size:
        views = views[:, order]
    fitted = (
        dict(scaling)
        if scaling is not None
        else {k: FeatureScaling.fit(v) for k, v in inputs.items()}
    )
    train_x: Any = {k: v[rows] for k, v in inputs.items()}
    if head != "multimodal":
        train_x = train_x["features"]
        if views is not None and views.size and head in VIEW_HEADS and len(features) == 1:
            train_x = views  # ActiveVisium repetitions: one view per spot per epoch
    elif views is not None and views.size and "image" in train_x:
        train_x["image"] = views  # the multimodal head's image branch: one view per spot per epoch
    return train_model(
        train_x,
        labels,
        head=head,
        seed=seed,
        classes=classes,
        resampling=resampling,  # type: ignore[arg-type]
        scaling=fitted,
        previous=previous,
        hyperparameters=hyperparameters,
        validation_fraction=validation_fraction,
        resampling_every=resampling_every,
    )
