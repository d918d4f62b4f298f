"""The :class:`Head` interface, its shared helpers and the name → class registry.

Every head implements :class:`Head` (fit, probabilities, hidden features, a code-free
artifact) and registers itself in :data:`HEADS` with :func:`register_head`;
:func:`make_head` builds one by name. Helpers shared by the heads (label and input
checks, class weights, the validation split, validation metrics) live here too.
"""

from __future__ import annotations

import abc
import dataclasses
import io
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from histoloop.errors import InvalidArgument

__all__ = [
    "HEADS",
    "FitReport",
    "Head",
    "HeadInput",
    "UnknownHead",
    "inverse_frequency_weights",
    "make_head",
    "register_head",
    "stratified_split",
]

HeadInput = np.ndarray | Mapping[str, np.ndarray]
"""An array ``(n, d)`` / ``(n_views, n, d)``, or ``{"image": …, "genes": …}``."""

_FORMAT = "histoloop.head.v1"
_PREDICT_CHUNK = 65536


class UnknownHead(InvalidArgument):
    """The requested head name is not registered."""


@dataclass(frozen=True)
class FitReport:
    """What one :meth:`Head.fit` did.

    Attributes:
        epochs: Epochs run (1 for logreg).
        best_epoch: Epoch whose weights were kept (0 = the warm-start weights).
        train_loss: Mean training loss of the last epoch.
        val_loss: Class-weighted validation cross-entropy of the kept weights, or None.
        val_macro_f1: Validation macro-F1 of the kept weights, or None.
        seconds: Wall-clock time of the fit.
        warm_started: True when initialised from a previous model's weights.
        early_stopped: True when stopped by patience before ``max_epochs``.
        checkpoint_metric: What chose the kept weights: ``"val_loss"`` or
            ``"last_epoch"`` (no validation split).
    """

    epochs: int
    best_epoch: int
    train_loss: float
    val_loss: float | None
    val_macro_f1: float | None
    seconds: float
    warm_started: bool
    early_stopped: bool
    checkpoint_metric: str

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dataclasses.asdict(self)


def inverse_frequency_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-class-frequency loss weights, normalised to sum to 1.

    Args:
        y: Integer labels in ``[0, n_classes)``.
        n_classes: Number of classes.

    Returns:
        ``(n_classes,)`` float32; ``w_c ∝ 1/count_c``, 0 for classes without labels.
    """
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    w = np.zeros(n_classes, dtype=np.float64)
    present = counts > 0
    w[present] = 1.0 / counts[present]
    return (w / w.sum()).astype(np.float32)


def stratified_split(
    y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified validation split that keeps every class on both sides.

    Each class with ``m`` labels gives ``max(1, round(fraction·m))`` of them (at most
    ``m − 1``) to validation. When any class present has fewer than 2 labels, or
    ``fraction`` is 0, there is no split.

    Args:
        y: Integer labels.
        fraction: Share for validation, in [0, 0.5].
        rng: Source of randomness.

    Returns:
        ``(train_rows, val_rows)`` sorted int64; ``val_rows`` is empty without a split.
    """
    y = np.asarray(y, dtype=np.int64)
    all_rows = np.arange(len(y))
    if fraction <= 0:
        return all_rows, np.empty(0, dtype=np.int64)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) == 0 or counts.min() < 2:
        return all_rows, np.empty(0, dtype=np.int64)
    val: list[np.ndarray] = []
    for c, m in zip(classes, counts, strict=True):
        take = int(min(m - 1, max(1, round(fraction * m))))
        val.append(rng.choice(np.flatnonzero(y == c), size=take, replace=False))
    val_rows = np.sort(np.concatenate(val))
    return np.setdiff1d(all_rows, val_rows), val_rows


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    classes = np.unique(np.concatenate([y_true, y_pred]))
    f1s = []
    for c in classes:
        tp = float(np.sum((y_pred == c) & (y_true == c)))
        fp = float(np.sum((y_pred == c) & (y_true != c)))
        fn = float(np.sum((y_pred != c) & (y_true == c)))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def _weighted_ce(P: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    w = weights[y].astype(np.float64)
    nll = -np.log(np.clip(P[np.arange(len(y)), y], 1e-12, 1.0))
    return float((w * nll).sum() / max(w.sum(), 1e-12))


def _make_config(cls: type, params: Mapping[str, Any], head: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise InvalidArgument(
            f"head {head!r} has no hyper-parameter(s) {unknown}; it accepts {sorted(fields)}"
        )
    values: dict[str, Any] = {}
    for key, value in params.items():
        default = fields[key].default
        try:
            if isinstance(default, bool):
                values[key] = bool(value)
            elif isinstance(default, int):
                values[key] = int(value)
            elif isinstance(default, float):
                values[key] = float(value)
            else:
                values[key] = value
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"hyper-parameter {key}={value!r}: {exc}") from None
    config = cls(**values)
    config.validate()
    return config


def _check_labels(y: Any, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise InvalidArgument(f"labels must have shape ({n},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InvalidArgument("labels must be integer class indices")
    y = y.astype(np.int64)
    if n and (y.min() < 0 or y.max() >= n_classes):
        raise InvalidArgument(f"labels must be in [0, {n_classes}), got {y.min()}..{y.max()}")
    if len(np.unique(y)) < 2:
        raise InvalidArgument("training needs labels of at least two classes")
    return y


def _as_array(value: Any, name: str, ndims: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise InvalidArgument(f"{name} must be {want}, got shape {arr.shape}")
    flat = arr.reshape(-1, arr.shape[-1]) if arr.size else arr.reshape(0, 1)
    for start in range(0, flat.shape[0], _PREDICT_CHUNK):  # no n×d boolean temporary
        if not np.isfinite(flat[start : start + _PREDICT_CHUNK]).all():
            raise InvalidArgument(f"{name} contains NaN or infinite values")
    return np.ascontiguousarray(arr)


def _check_sample_weight(sample_weight: np.ndarray | None, n: int) -> np.ndarray | None:
    if sample_weight is None:
        return None
    sw = np.asarray(sample_weight, dtype=np.float64)
    if sw.shape != (n,) or not np.isfinite(sw).all() or sw.min() < 0 or sw.sum() <= 0:
        raise InvalidArgument(f"sample_weight must be ({n},), finite, ≥ 0 and not all zero")
    return sw


class Head(abc.ABC):
    """A trainable classifier on spot features.

    Args:
        n_classes: Number of output classes ``C`` (≥ 2).
        seed: Seed for initialisation, shuffling and view draws.
        **hyperparameters: Fields of the head's config class (see ``config_class``).

    Raises:
        InvalidArgument: Unknown hyper-parameter or out-of-range value.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type]
    """The head's hyper-parameter dataclass (set by every concrete head)."""
    input_keys: ClassVar[tuple[str, ...]] = ("features",)

    def __init__(self, *, n_classes: int, seed: int = 0, **hyperparameters: Any) -> None:
        if int(n_classes) < 2:
            raise InvalidArgument(f"n_classes must be ≥ 2, got {n_classes}")
        self.n_classes = int(n_classes)
        self.seed = int(seed)
        self.config = _make_config(self.config_class, hyperparameters, self.name)
        self.input_dims: dict[str, int] | None = None

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The resolved hyper-parameters (defaults filled in)."""
        return dataclasses.asdict(self.config)

    @property
    def fitted(self) -> bool:
        """True once trained or loaded."""
        return self.input_dims is not None

    # -- inputs

    def _parts(self, X: HeadInput, *, allow_views: bool) -> list[np.ndarray]:
        """Split an input into float32 arrays in ``input_keys`` order."""
        view_dims = (2, 3) if allow_views else (2,)
        if self.input_keys == ("features",):
            if isinstance(X, Mapping):
                raise InvalidArgument(f"head {self.name!r} takes an array, not a mapping")
            parts = [_as_array(X, "features", view_dims)]
        else:
            if not isinstance(X, Mapping) or set(X) != set(self.input_keys):
                raise InvalidArgument(
                    f"head {self.name!r} takes a mapping with keys {list(self.input_keys)}"
                )
            parts = [_as_array(X[self.input_keys[0]], self.input_keys[0], view_dims)]
            parts += [_as_array(X[key], key, (2,)) for key in self.input_keys[1:]]
        n = {p.shape[-2] for p in parts}
        if len(n) != 1:
            raise InvalidArgument(f"inputs disagree on the number of spots: {sorted(n)}")
        return parts

    def _clean(self, X: HeadInput) -> list[np.ndarray]:
        parts = self._parts(X, allow_views=True)
        if parts[0].ndim == 3:
            parts[0] = parts[0][0]
        if self.input_dims is not None:
            dims = {key: p.shape[-1] for key, p in zip(self.input_keys, parts, strict=True)}
            if dims != self.input_dims:
                raise InvalidArgument(f"input dimensions {dims} != trained {self.input_dims}")
        return parts

    def _dims(self, parts: list[np.ndarray]) -> dict[str, int]:
        return {key: int(p.shape[-1]) for key, p in zip(self.input_keys, parts, strict=True)}

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise InvalidArgument(f"head {self.name!r} is not trained")

    # -- interface

    @abc.abstractmethod
    def fit(
        self,
        X: HeadInput,
        y: np.ndarray,
        *,
        sample_weight: np.ndarray | None = None,
        X_val: HeadInput | None = None,
        y_val: np.ndarray | None = None,
        init_from: Head | None = None,
    ) -> FitReport:
        """Train on labelled spots.

        Args:
            X: Training inputs (see the module docstring for shapes and views).
            y: ``(n,)`` integer labels.
            sample_weight: ``(n,)`` non-negative sampling weights (adaptive
                resampling); rows are drawn with replacement in proportion to them.
            X_val: Validation inputs (clean view only is used).
            y_val: Validation labels; without them the last epoch is kept.
            init_from: A previous head to warm-start from when compatible (same kind,
                class count and input dimensions); otherwise ignored.

        Returns:
            A :class:`FitReport`.
        """

    @abc.abstractmethod
    def predict_proba(self, X: HeadInput) -> np.ndarray:
        """Class probabilities ``(n, C)`` float32 (clean view)."""

    @abc.abstractmethod
    def hidden(self, X: HeadInput) -> np.ndarray:
        """Hidden features ``(n, h)`` float32 for diversity strategies."""

    @abc.abstractmethod
    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every learned array, as CPU tensors."""

    @abc.abstractmethod
    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore from :meth:`_tensors` (``input_dims`` is already set)."""

    # -- artifacts

    def _meta(self) -> dict[str, Any]:
        return {
            "n_classes": self.n_classes,
            "seed": self.seed,
            "config": self.hyperparameters,
            "input_dims": self.input_dims,
        }

    def to_bytes(self) -> bytes:
        """Serialise the trained head (tensors + JSON metadata, no code).

        Returns:
            Bytes for :meth:`from_bytes`.
        """
        self._require_fitted()
        payload = {
            "format": _FORMAT,
            "head": self.name,
            "meta": json.dumps(self._meta()),
            "tensors": {k: v.detach().cpu().contiguous() for k, v in self._tensors().items()},
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Head:
        """Load a head written by :meth:`to_bytes` (safe: ``weights_only=True``).

        Args:
            data: The artifact bytes.

        Returns:
            The trained head, of the class recorded in the artifact.

        Raises:
            InvalidArgument: Not a head artifact, or not of the class called on.
        """
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if payload.get("format") != _FORMAT:
                raise ValueError(f"format {payload.get('format')!r}")
            meta = json.loads(payload["meta"])
            kind = HEADS[payload["head"]]
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
            raise InvalidArgument(f"not a histoloop head artifact: {exc}") from None
        if cls is not Head and not issubclass(kind, cls):
            raise InvalidArgument(f"artifact holds a {kind.name!r} head, not {cls.name!r}")
        head = kind(n_classes=meta["n_classes"], seed=meta["seed"], **meta["config"])
        head.input_dims = meta["input_dims"]
        head._load(payload["tensors"])
        return head


# --------------------------------------------------------------------------- registry

HEADS: dict[str, type[Head]] = {}
"""Registry: head name → class (``mlp``, ``multimodal``, ``logreg``, ``ensemble``)."""

_H = TypeVar("_H", bound=type[Head])


def register_head(cls: _H) -> _H:
    """Class decorator: register a head class in :data:`HEADS` under its ``name``."""
    HEADS[cls.name] = cls
    return cls


def make_head(name: str, *, n_classes: int, seed: int = 0, **hyperparameters: Any) -> Head:
    """Build an untrained head by registry name.

    Args:
        name: ``"mlp"``, ``"multimodal"``, ``"logreg"`` or ``"ensemble"``.
        n_classes: Number of classes.
        seed: Seed.
        **hyperparameters: Fields of the head's config class.

    Returns:
        The head.

    Raises:
        UnknownHead: ``name`` is not registered (the message lists the choices).
        InvalidArgument: Unknown or out-of-range hyper-parameter.
    """
    try:
        cls = HEADS[name]
    except (KeyError, TypeError):
        raise UnknownHead(
            f"unknown head {name!r}; choose from {', '.join(sorted(HEADS))}"
        ) from None
    return cls(n_classes=n_classes, seed=seed, **hyperparameters)
