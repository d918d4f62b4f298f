"""Train a head on labelled spots and package it as an immutable model artifact.

:func:`train_model` does the whole job for one round: map class names to indices,
optionally standardise with a source-dataset :class:`~.scaling.FeatureScaling`, split
a stratified validation set, compute adaptive-resampling weights, warm-start from the
previous round's model when compatible, fit, evaluate, and return a
:class:`TrainedModel`. ``TrainedModel.to_bytes()`` writes a ``torch.save`` archive of
tensors, strings and numbers only, read back with ``weights_only=True`` (loading a
model file cannot run code). The registry metadata (version, label batch ids,
embedding artifact) is added around it by the service.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import pickle
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from histoloop.errors import InvalidArgument

from .evaluate import classification_metrics
from .heads import HEADS, Head, HeadInput, MLPConfig, make_head, stratified_split
from .resampling import ResamplingMode, resampling_weights
from .scaling import FeatureScaling

__all__ = ["TrainedModel", "feature_dims", "prepare_features", "train_model"]

log = logging.getLogger(__name__)

_FORMAT = "histoloop.model.v1"


@dataclass(frozen=True, eq=False)
class TrainedModel:
    """A trained head and everything needed to use and audit it.

    Attributes:
        head: Registry name of the head (``"mlp"``, …).
        head_bytes: The serialised head (:meth:`Head.to_bytes`).
        classes: Class names by output index.
        hyperparameters: The head's resolved hyper-parameters.
        seed: Seed of the run.
        validation: :func:`~.evaluate.classification_metrics` on the validation split
            (empty without a split).
        training_seconds: Wall-clock time of :func:`train_model`.
        feature_dims: Input dimension per feature key (``{"features": d}`` or
            ``{"image": d, "genes": g}``).
        n_train: Labelled spots trained on.
        n_validation: Labelled spots held out for validation.
        resampling: Adaptive-resampling mode used.
        fit_report: :meth:`FitReport.to_dict`.
        scaling: Source-dataset scaling per feature key (may be empty).
    """

    head: str
    head_bytes: bytes
    classes: tuple[str, ...]
    hyperparameters: dict[str, Any]
    seed: int
    validation: dict[str, Any]
    training_seconds: float
    feature_dims: dict[str, int]
    n_train: int
    n_validation: int
    resampling: str = "off"
    fit_report: dict[str, Any] = field(default_factory=dict)
    scaling: dict[str, FeatureScaling] = field(default_factory=dict)

    @functools.cached_property
    def loaded_head(self) -> Head:
        """The head, deserialised once and cached."""
        return Head.from_bytes(self.head_bytes)

    def _meta(self) -> dict[str, Any]:
        return {
            "head": self.head,
            "classes": list(self.classes),
            "hyperparameters": self.hyperparameters,
            "seed": self.seed,
            "validation": self.validation,
            "training_seconds": self.training_seconds,
            "feature_dims": self.feature_dims,
            "n_train": self.n_train,
            "n_validation": self.n_validation,
            "resampling": self.resampling,
            "fit_report": self.fit_report,
            "scaling": {
                key: {
                    "names": None if s.names is None else list(s.names),
                    "log1p_target_sum": s.log1p_target_sum,
                }
                for key, s in self.scaling.items()
            },
        }

    def to_bytes(self) -> bytes:
        """Serialise (tensors + JSON only; safe to load).

        Returns:
            Bytes for :meth:`from_bytes`.
        """
        payload = {
            "format": _FORMAT,
            "meta": json.dumps(self._meta()),
            "head_bytes": torch.frombuffer(bytearray(self.head_bytes), dtype=torch.uint8),
            "scaling": {
                key: {"mean": torch.from_numpy(s.mean), "scale": torch.from_numpy(s.scale)}
                for key, s in self.scaling.items()
            },
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainedModel:
        """Load a model written by :meth:`to_bytes` (``weights_only=True``).

        Args:
            data: The artifact bytes.

        Returns:
            The model.

        Raises:
            InvalidArgument: Not a histoloop model artifact.
        """
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if payload.get("format") != _FORMAT:
                raise ValueError(f"format {payload.get('format')!r}")
            meta = json.loads(payload["meta"])
            scaling = {
                key: FeatureScaling(
                    mean=payload["scaling"][key]["mean"].numpy(),
                    scale=payload["scaling"][key]["scale"].numpy(),
                    names=None if info["names"] is None else tuple(info["names"]),
                    log1p_target_sum=info["log1p_target_sum"],
                )
                for key, info in meta.pop("scaling").items()
            }
            head_bytes = payload["head_bytes"].numpy().tobytes()
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            EOFError,
            RuntimeError,
            OSError,
            pickle.UnpicklingError,
        ) as exc:
            raise InvalidArgument(f"not a histoloop model artifact: {exc}") from None
        meta["classes"] = tuple(meta["classes"])
        return cls(head_bytes=head_bytes, scaling=scaling, **meta)


def feature_dims(features: HeadInput) -> dict[str, int]:
    """Input dimension per feature key of an array or mapping input."""
    if isinstance(features, Mapping):
        return {key: int(np.shape(value)[-1]) for key, value in features.items()}
    return {"features": int(np.shape(features)[-1])}


def prepare_features(
    features: HeadInput,
    scaling: Mapping[str, FeatureScaling] | None,
    *,
    neutral: Mapping[str, Sequence[int]] | None = None,
) -> HeadInput:
    """Apply per-key scaling to an array (key ``"features"``) or mapping input.

    Args:
        features: Array or ``{"image": …, "genes": …}``.
        scaling: Scaling per key; keys without one are passed through.
        neutral: Columns per key to neutralise after scaling (missing genes).

    Returns:
        Input of the same structure, float32 where scaled.
    """
    if not scaling:
        return features
    neutral = neutral or {}

    def one(key: str, value: np.ndarray) -> np.ndarray:
        s = scaling.get(key)
        return value if s is None else s.transform(value, neutral=neutral.get(key, ()))

    if isinstance(features, Mapping):
        unknown = set(scaling) - set(features)
        if unknown:
            raise InvalidArgument(f"scaling for unknown feature keys {sorted(unknown)}")
        return {key: one(key, value) for key, value in features.items()}
    if set(scaling) != {"features"}:
        raise InvalidArgument("array input takes scaling under the key 'features'")
    return one("features", features)


def _take(features: HeadInput, rows: np.ndarray) -> HeadInput:
    def one(value: np.ndarray) -> np.ndarray:
        arr = np.asarray(value)
        return arr[:, rows] if arr.ndim == 3 else arr[rows]

    if isinstance(features, Mapping):
        return {key: one(value) for key, value in features.items()}
    return one(features)


def _clean_first(features: HeadInput) -> np.ndarray:
    value = next(iter(features.values())) if isinstance(features, Mapping) else features
    arr = np.asarray(value, dtype=np.float32)
    return arr[0] if arr.ndim == 3 else arr


def _n_rows(features: HeadInput) -> int:
    value = next(iter(features.values())) if isinstance(features, Mapping) else features
    return int(np.shape(value)[-2])


def _encode_labels(
    labels: Sequence[Any] | np.ndarray, classes: Sequence[str] | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    raw = list(np.asarray(labels, dtype=object).ravel())
    missing = [
        i for i, v in enumerate(raw) if v is None or (isinstance(v, float) and math.isnan(v))
    ]
    if missing:
        raise InvalidArgument(
            f"{len(missing)} labels are missing (first row {missing[0]}); drop them first"
        )
    names = [str(v) for v in raw]
    if classes is None:
        classes = sorted(set(names))
    classes = tuple(str(c) for c in classes)
    if len(set(classes)) != len(classes):
        raise InvalidArgument("classes contain duplicates")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise InvalidArgument(f"labels {unknown[:5]} are not among the classes {list(classes)}")
    return np.asarray([index[v] for v in names], dtype=np.int64), classes


def train_model(
    features: HeadInput,
    labels: Sequence[Any] | np.ndarray,
    *,
    head: str = "mlp",
    seed: int = 0,
    classes: Sequence[str] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    validation_fraction: float = 0.1,
    resampling: ResamplingMode = "off",
    resampling_clusters: int = 10,
    scaling: Mapping[str, FeatureScaling] | None = None,
    previous: TrainedModel | None = None,
    resampling_every: int = 0,
) -> TrainedModel:
    """Train one round's model on the labelled spots.

    Args:
        features: Features of the labelled spots: ``(n, d)`` or ``(n_views, n, d)``
            (views[0] clean), or ``{"image": …, "genes": (n, g)}`` for the multimodal
            head. Raw (unscaled) when ``scaling`` is given.
        labels: ``(n,)`` class names (or anything ``str()`` maps to a class name).
        head: Head registry name.
        seed: Seed for the split, initialisation and sampling.
        classes: The project's class names in output order (default: sorted labels).
            Classes without labels yet get an output with zero loss weight.
        hyperparameters: Head hyper-parameters (see the head's config class).
        validation_fraction: Stratified validation share (used only when every class
            present has ≥ 2 labels; otherwise the last epoch is kept).
        resampling: Adaptive resampling ``"off"``, ``"offline"`` or ``"online"``. The
            torch heads resample inside the fit (``online``: the current hidden layer
            re-clustered every ``resampling_every`` epochs); the logistic regression
            gets fixed weights (``online``: the previous model's hidden layer).
        resampling_clusters: k-means clusters for adaptive resampling.
        scaling: Source-dataset scaling per feature key, applied before training and
            stored in the model for prediction.
        previous: Last round's model; its weights seed this one when head, classes and
            feature dimensions match (for logreg its hidden layer drives online resampling).
        resampling_every: Epochs between re-clusterings of online resampling (0 = the
            head's default, 5).

    Returns:
        The :class:`TrainedModel`.

    Raises:
        InvalidArgument: Bad shapes, labels, classes, head or hyper-parameters.
    """
    t0 = time.perf_counter()
    if not 0.0 <= validation_fraction <= 0.5:
        raise InvalidArgument(f"validation_fraction must be in [0, 0.5], got {validation_fraction}")
    n = _n_rows(features)
    y, class_names = _encode_labels(labels, classes)
    if len(y) != n:
        raise InvalidArgument(f"{n} feature rows but {len(y)} labels")
    dims = feature_dims(features)
    X = prepare_features(features, scaling)
    hyper = dict(hyperparameters or {})
    in_fit = (
        resampling != "off" and head in HEADS and issubclass(HEADS[head].config_class, MLPConfig)
    )
    if in_fit:  # the torch heads resample inside the fit, by the current latent
        hyper.setdefault("resampling", resampling)
        hyper.setdefault("resampling_clusters", resampling_clusters)
        # the resampling rebalances; on DLPFC and A1 adding class weights on top hurt
        # (benchmarks/README.md, "Issue 17"), so the loss is unweighted unless asked
        hyper.setdefault("class_weighting", False)
        if resampling_every:
            hyper.setdefault("resampling_every", resampling_every)
    model_head = make_head(head, n_classes=len(class_names), seed=seed, **hyper)
    rng = np.random.default_rng(seed)
    train_rows, val_rows = stratified_split(y, validation_fraction, rng)
    X_train, y_train = _take(X, train_rows), y[train_rows]
    X_val = _take(X, val_rows) if len(val_rows) else None
    y_val = y[val_rows] if len(val_rows) else None

    init: Head | None = None
    if (
        previous is not None
        and previous.head == head
        and previous.classes == class_names
        and previous.feature_dims == dims
    ):
        init = previous.loaded_head
    elif previous is not None:
        log.info("previous model not reused: head, classes or feature dimensions differ")

    hidden = None
    if resampling == "online" and init is not None and not in_fit:
        hidden = init.hidden(X_train)
    weights = (
        None
        if in_fit
        else resampling_weights(
            resampling,
            embeddings=_clean_first(X_train),
            hidden=hidden,
            n_clusters=resampling_clusters,
            seed=seed,
        )
    )
    report = model_head.fit(
        X_train, y_train, sample_weight=weights, X_val=X_val, y_val=y_val, init_from=init
    )
    validation: dict[str, Any] = {}
    if X_val is not None and y_val is not None:
        pred = model_head.predict_proba(X_val).argmax(axis=1)
        validation = classification_metrics(y_val, pred, classes=class_names)
    seconds = time.perf_counter() - t0
    log.info(
        "trained %s head on %d spots (%d validation) in %.2f s",
        head,
        len(train_rows),
        len(val_rows),
        seconds,
    )
    return TrainedModel(
        head=head,
        head_bytes=model_head.to_bytes(),
        classes=class_names,
        hyperparameters=model_head.hyperparameters,
        seed=int(seed),
        validation=validation,
        training_seconds=seconds,
        feature_dims=dims,
        n_train=int(len(train_rows)),
        n_validation=int(len(val_rows)),
        resampling=str(hyper.get("resampling", resampling)),
        fit_report=report.to_dict(),
        scaling=dict(scaling or {}),
    )
