"""Classifier heads on top of spot embeddings, behind one :class:`Head` interface.

Registered by name in :data:`HEADS` (see :func:`make_head`):

* ``"mlp"`` — the ActiveVisium architecture: ``Linear(d→128) → LeakyReLU(0.02) →
  Linear(128→C)``, cross-entropy with inverse-class-frequency weights that sum to 1,
  best-validation checkpoint (lowest validation loss), early stopping after ``patience``
  epochs without improvement. Trained by default with Adam at lr 1e-3 for up to 200
  epochs (patience 20) and a weight decay that shrinks with the number of labels
  (``weight_decay_per_label / n``), chosen on DLPFC 151510 so that the head is at least
  as good as logistic regression from 30 labels to the whole pool (benchmarks/README.md);
  the paper's settings (Adam 1e-4, ≤ 50 epochs, patience 10, no decay) are the
  ``activevisium`` preset (:mod:`histoloop.presets`).
* ``"multimodal"`` — image and gene-expression branches fused by LayerNorm + MLP.
* ``"logreg"`` — standardised scikit-learn logistic regression, a fast baseline.
* ``"ensemble"`` — ``members`` MLPs with different seeds; ``member_proba`` for BALD.

Inputs. Single-input heads (``mlp``, ``logreg``, ``ensemble`` of ``mlp``) take a
float array ``(n, d)``, or ``(n_views, n, d)`` where ``views[0]`` is the clean
embedding and the others are augmented views: each epoch draws one view per spot at
random; validation and prediction use the clean view. The multimodal head takes a
mapping ``{"image": (n, d) or (n_views, n, d), "genes": (n, g)}``.

Labels are integer class indices in ``[0, n_classes)``.

Artifacts. :meth:`Head.to_bytes` writes a ``torch.save`` archive holding only tensors,
strings and numbers; :meth:`Head.from_bytes` reads it with ``weights_only=True`` so a
model file can never run code when loaded.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import io
import json
import logging
import pickle
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import WeightedRandomSampler

from histoloop.errors import InvalidArgument
from histoloop.training.resampling import RESAMPLING_MODES, adaptive_resampling_weights

__all__ = [
    "HEADS",
    "EnsembleConfig",
    "EnsembleHead",
    "FitReport",
    "Head",
    "HeadInput",
    "LogRegConfig",
    "LogRegHead",
    "MLPConfig",
    "MLPHead",
    "MLPNet",
    "MultimodalConfig",
    "MultimodalHead",
    "MultimodalNet",
    "UnknownHead",
    "inverse_frequency_weights",
    "make_head",
    "stratified_split",
]

log = logging.getLogger(__name__)

HeadInput = np.ndarray | Mapping[str, np.ndarray]
"""An array ``(n, d)`` / ``(n_views, n, d)``, or ``{"image": …, "genes": …}``."""

_FORMAT = "histoloop.head.v1"
_PREDICT_CHUNK = 65536


class UnknownHead(InvalidArgument):
    """The requested head name is not registered."""


# --------------------------------------------------------------------------- helpers


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


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block (process-wide, restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


# --------------------------------------------------------------------------- configs


_DECAY_MIN_LABELS = 60  # weight_decay_per_label / max(n, this): caps the decay on tiny sets


@dataclass(frozen=True)
class MLPConfig:
    """Hyper-parameters of the MLP head (architecture = ActiveVisium's).

    The training defaults were chosen on evidence (see the module docstring); the
    paper's are the ``activevisium`` preset (:mod:`histoloop.presets`).

    Attributes:
        hidden: Hidden width.
        negative_slope: LeakyReLU slope.
        lr: Adam learning rate.
        batch_size: Mini-batch size.
        max_epochs: Epoch cap.
        patience: Stop after this many epochs without a better validation loss.
        weight_decay: Adam weight decay (constant part).
        weight_decay_per_label: Adds ``weight_decay_per_label / max(n, 60)`` to the
            weight decay for ``n`` training labels: strong regularisation on a handful of
            labels, almost none on the whole pool (an L2 prior of fixed strength).
        lr_drops: When patience runs out, go back to the best weights, divide the
            learning rate by 10 and continue, this many times (0 = stop at once); used to
            train a reference to convergence.
        threads: Torch intra-op threads during fit and predict.
        dropout: Dropout on the hidden layer before the classifier (0 = none, the paper).
        mc_samples: MC-dropout passes whose probabilities become the member
            probabilities for BALD (0 = off; needs ``dropout > 0``).
        resampling: Adaptive resampling during the fit (see
            :mod:`histoloop.training.resampling`): ``off``; ``offline`` (clusters of the
            input features, fixed); ``online`` (clusters of the current hidden layer of
            the labelled spots, recomputed every ``resampling_every`` epochs).
        resampling_every: Epochs between two re-clusterings (``online``).
        resampling_clusters: k-means clusters of the resampling.
        class_weighting: Inverse-class-frequency loss weights (ActiveVisium); False
            trains an unweighted loss, as the AR paper does, letting the resampling
            alone rebalance (classes without labels keep weight 0).
    """

    hidden: int = 128
    negative_slope: float = 0.02
    lr: float = 1e-3
    batch_size: int = 16
    max_epochs: int = 200
    patience: int = 20
    weight_decay: float = 0.0
    weight_decay_per_label: float = 3.0
    lr_drops: int = 0
    threads: int = 1
    dropout: float = 0.0
    mc_samples: int = 0
    resampling: str = "off"
    resampling_every: int = 5
    resampling_clusters: int = 10
    class_weighting: bool = True

    def validate(self) -> None:
        """Raise :class:`InvalidArgument` on an out-of-range value."""
        for key in ("hidden", "batch_size", "max_epochs", "patience", "threads"):
            if getattr(self, key) < 1:
                raise InvalidArgument(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidArgument(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.mc_samples <= 1000:
            raise InvalidArgument(f"mc_samples must be in 0..1000, got {self.mc_samples}")
        if self.mc_samples and self.dropout == 0.0:
            raise InvalidArgument("mc_samples > 0 needs dropout > 0 (MC-dropout samples it)")
        if self.resampling not in RESAMPLING_MODES:
            raise InvalidArgument(f"resampling must be one of {RESAMPLING_MODES}, got {self.resampling!r}")
        if self.resampling_every < 1 or self.resampling_clusters < 1:
            raise InvalidArgument("resampling_every and resampling_clusters must be ≥ 1")
        if self.lr <= 0:
            raise InvalidArgument(f"lr must be > 0, got {self.lr}")
        if self.lr_drops < 0:
            raise InvalidArgument(f"lr_drops must be ≥ 0, got {self.lr_drops}")
        if self.weight_decay < 0 or self.negative_slope < 0 or self.weight_decay_per_label < 0:
            raise InvalidArgument("weight_decay, weight_decay_per_label and negative_slope must be ≥ 0")

    def decay(self, n_labels: int) -> float:
        """The weight decay used for ``n_labels`` training labels."""
        return self.weight_decay + self.weight_decay_per_label / max(int(n_labels), _DECAY_MIN_LABELS)


@dataclass(frozen=True)
class MultimodalConfig(MLPConfig):
    """MLP hyper-parameters plus the fusion dropout.

    Attributes:
        dropout: Dropout before the classifier.
    """

    dropout: float = 0.25

    def validate(self) -> None:
        """Raise :class:`InvalidArgument` on an out-of-range value."""
        super().validate()
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidArgument(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class LogRegConfig:
    """Hyper-parameters of the logistic-regression baseline.

    Attributes:
        C: Inverse L2 regularisation strength.
        max_iter: L-BFGS iterations.
        tol: L-BFGS tolerance.
    """

    C: float = 1.0
    max_iter: int = 300
    tol: float = 1e-4

    def validate(self) -> None:
        """Raise :class:`InvalidArgument` on an out-of-range value."""
        if self.C <= 0 or self.max_iter < 1 or self.tol <= 0:
            raise InvalidArgument("C and tol must be > 0 and max_iter ≥ 1")


@dataclass(frozen=True)
class EnsembleConfig(MultimodalConfig):
    """An ensemble of ``members`` heads of kind ``member`` (seeds ``seed + i``).

    Attributes:
        members: Ensemble size.
        member: ``"mlp"`` or ``"multimodal"``.
    """

    members: int = 5
    member: str = "mlp"

    def validate(self) -> None:
        """Raise :class:`InvalidArgument` on an out-of-range value."""
        super().validate()
        if self.members < 1:
            raise InvalidArgument(f"members must be ≥ 1, got {self.members}")
        if self.member not in ("mlp", "multimodal"):
            raise InvalidArgument(f"member must be 'mlp' or 'multimodal', got {self.member!r}")


# --------------------------------------------------------------------------- networks


class MLPNet(nn.Module):
    """ActiveVisium head: ``Linear(d→h) → LeakyReLU(slope) → Linear(h→C)``.

    Args:
        in_dim: Input dimension ``d``.
        n_classes: Number of classes ``C``.
        hidden: Hidden width ``h`` (128).
        negative_slope: LeakyReLU slope (0.02).
        dropout: Dropout on the hidden layer before the classifier (0 = none).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 128,
        negative_slope: float = 0.02,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.LeakyReLU(negative_slope))
        self.dropout_rate = float(dropout)  # functional: layers and state dicts are unchanged
        self.classifier = nn.Linear(hidden, n_classes)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden features ``(n, h)`` after the LeakyReLU."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, C)``."""
        h = self.encoder(x)
        if self.dropout_rate > 0:
            h = nn.functional.dropout(h, self.dropout_rate, self.training)
        return self.classifier(h)


class MultimodalNet(nn.Module):
    """Image + gene-expression head.

    ``image: Linear(d→h)+LeakyReLU``, ``genes: Linear(g→h)+LeakyReLU``, concatenated
    → ``LayerNorm(2h) → Linear(2h→h) → LeakyReLU`` (the hidden features) →
    ``Dropout → Linear(h→C)``.

    Args:
        image_dim: Image-embedding dimension.
        gene_dim: Number of genes.
        n_classes: Number of classes.
        hidden: Branch and fusion width (128).
        negative_slope: LeakyReLU slope.
        dropout: Dropout before the classifier (0.25).
    """

    def __init__(
        self,
        image_dim: int,
        gene_dim: int,
        n_classes: int,
        hidden: int = 128,
        negative_slope: float = 0.02,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(image_dim, hidden), nn.LeakyReLU(negative_slope))
        self.genes = nn.Sequential(nn.Linear(gene_dim, hidden), nn.LeakyReLU(negative_slope))
        self.fusion = nn.Sequential(
            nn.LayerNorm(2 * hidden), nn.Linear(2 * hidden, hidden), nn.LeakyReLU(negative_slope)
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def hidden(self, image: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        """Fused hidden features ``(n, h)``."""
        return self.fusion(torch.cat([self.image(image), self.genes(genes)], dim=1))

    def forward(self, image: torch.Tensor, genes: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, C)``."""
        return self.classifier(self.dropout(self.hidden(image, genes)))


# --------------------------------------------------------------------------- base


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
    config_class: ClassVar[type] = MLPConfig
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


# --------------------------------------------------------------------------- torch heads


def _fit_module(
    module: nn.Module,
    parts: list[np.ndarray],
    y: np.ndarray,
    *,
    class_weights: np.ndarray,
    sample_weight: np.ndarray | None,
    val_parts: list[np.ndarray] | None,
    y_val: np.ndarray | None,
    cfg: MLPConfig,
    seed: int,
) -> tuple[int, int, float, float | None, float | None, bool]:
    """The shared training loop; returns (epochs, best_epoch, train_loss, val_loss,
    val_f1, early_stopped)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(y)
    views = torch.from_numpy(parts[0]) if parts[0].ndim == 3 else None
    first = views[0] if views is not None else torch.from_numpy(parts[0])
    rest = [torch.from_numpy(p) for p in parts[1:]]
    yt = torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss(weight=torch.from_numpy(class_weights))
    decay = cfg.decay(n)
    try:  # the fused CPU kernel is ~25 % faster on these tiny networks
        opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=decay)
    sw = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float64)
    clean = [views[0] if views is not None else first, *rest]
    if cfg.resampling == "offline":  # clusters of the input features, fixed for the fit
        sw = _density_weights(clean[0].numpy(), cfg, seed)
    has_val = val_parts is not None and y_val is not None and len(y_val) > 0
    vt = [torch.from_numpy(p) for p in val_parts] if has_val else []  # type: ignore[union-attr]
    yv = torch.from_numpy(y_val) if has_val else None  # type: ignore[arg-type]

    def val_loss() -> float:
        module.eval()
        with torch.no_grad():
            return float(loss_fn(module(*vt), yv).item())

    # a warm start is where training starts, not a candidate: the previous model has seen
    # most of this round's validation spots, so its validation loss would be biased low and
    # keep it unchanged, the new labels unlearnt
    best_loss, best_epoch, best_state, bad, drops = float("inf"), 0, None, 0, 0
    epoch, train_loss, early = 0, float("nan"), False
    arange = torch.arange(n)
    for epoch in range(1, cfg.max_epochs + 1):
        if cfg.resampling == "online" and (epoch - 1) % cfg.resampling_every == 0:
            module.eval()  # the current latent of every labelled spot, re-clustered
            with torch.no_grad():
                latent = module.hidden(*clean)  # type: ignore[operator]
            sw = _density_weights(latent.numpy(), cfg, seed + epoch)
        module.train()
        if views is not None and views.shape[0] > 1:
            pick = torch.from_numpy(rng.integers(0, views.shape[0], size=n))
            first = views[pick, arange]
        if sw is not None:  # adaptive resampling: draw n spots with replacement
            sampler = WeightedRandomSampler(sw, n, replacement=True, generator=gen)  # type: ignore[arg-type]
            order = torch.as_tensor(list(sampler), dtype=torch.int64)
        else:
            order = torch.randperm(n, generator=gen)
        total = torch.zeros(())
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            logits = module(first[idx], *(r[idx] for r in rest))
            loss = loss_fn(logits, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        train_loss = float(total) / max(n, 1)
        if has_val:
            vl = val_loss()
            if vl < best_loss - 1e-7:
                best_loss, best_epoch, bad = vl, epoch, 0
                best_state = copy.deepcopy(module.state_dict())
            else:
                bad += 1
                if bad >= cfg.patience:
                    if drops < cfg.lr_drops and best_state is not None:  # anneal: best weights, lr / 10
                        drops, bad = drops + 1, 0
                        module.load_state_dict(best_state)
                        for group in opt.param_groups:
                            group["lr"] *= 0.1
                        continue
                    early = epoch < cfg.max_epochs
                    break
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    if not has_val:
        return epoch, epoch, train_loss, None, None, False
    with torch.no_grad():
        logits = module(*vt)
    vf1 = _macro_f1(y_val, logits.argmax(dim=1).numpy())  # type: ignore[arg-type]
    return epoch, best_epoch, train_loss, best_loss, vf1, early


def _density_weights(latent: np.ndarray, cfg: MLPConfig, seed: int) -> torch.Tensor:
    """Sampler weights inverse to the density of each spot's cluster in ``latent``."""
    w = adaptive_resampling_weights(latent, n_clusters=cfg.resampling_clusters, seed=seed)
    return torch.as_tensor(w, dtype=torch.float64)


class _TorchHead(Head):
    """A head backed by one torch module with ``forward`` and ``hidden``."""

    def __init__(self, *, n_classes: int, seed: int = 0, **hyperparameters: Any) -> None:
        super().__init__(n_classes=n_classes, seed=seed, **hyperparameters)
        self.module: nn.Module | None = None

    @abc.abstractmethod
    def _build(self, dims: Mapping[str, int]) -> nn.Module:
        """A freshly initialised module for these input dimensions."""

    def _compatible(self, other: Head | None, dims: Mapping[str, int]) -> bool:
        return (
            isinstance(other, type(self))
            and other.fitted
            and other.n_classes == self.n_classes
            and other.input_dims == dict(dims)
            and other.config.hidden == self.config.hidden
        )

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
        """See :meth:`Head.fit`."""
        t0 = time.perf_counter()
        parts = self._parts(X, allow_views=True)
        n = parts[0].shape[-2]
        y = _check_labels(y, n, self.n_classes)
        dims = self._dims(parts)
        sw = _check_sample_weight(sample_weight, n)
        val_parts = yv = None
        if X_val is not None and y_val is not None:
            val_parts = self._parts(X_val, allow_views=True)
            if val_parts[0].ndim == 3:
                val_parts[0] = val_parts[0][0]
            yv = np.asarray(y_val, dtype=np.int64)
            if self._dims(val_parts) != dims or len(yv) != val_parts[0].shape[0]:
                raise InvalidArgument("validation inputs do not match the training inputs")
        weights = inverse_frequency_weights(y, self.n_classes)
        if not self.config.class_weighting:  # unweighted loss over the classes with labels
            weights = (weights > 0).astype(np.float32) / np.float32((weights > 0).sum())
        with _torch_threads(self.config.threads):
            torch.manual_seed(self.seed)
            module = self._build(dims)
            warm = self._compatible(init_from, dims)
            if warm:
                module.load_state_dict(init_from.module.state_dict())  # type: ignore[union-attr]
            elif init_from is not None:
                log.info("warm start skipped: previous %s head is not compatible", self.name)
            epochs, best, tl, vl, vf1, early = _fit_module(
                module,
                parts,
                y,
                class_weights=weights,
                sample_weight=sw,
                val_parts=val_parts,
                y_val=yv,
                cfg=self.config,
                seed=self.seed,
            )
        self.module, self.input_dims = module, dims
        return FitReport(
            epochs=epochs,
            best_epoch=best,
            train_loss=tl,
            val_loss=vl,
            val_macro_f1=vf1,
            seconds=time.perf_counter() - t0,
            warm_started=warm,
            early_stopped=early,
            checkpoint_metric="val_loss" if vl is not None else "last_epoch",
        )

    def _run(self, X: HeadInput, fn: str) -> np.ndarray:
        self._require_fitted()
        parts = self._clean(X)
        n = parts[0].shape[0]
        out: list[np.ndarray] = []
        module = self.module
        assert module is not None
        module.eval()
        with _torch_threads(self.config.threads), torch.no_grad():
            for start in range(0, n, _PREDICT_CHUNK):
                chunk = [torch.from_numpy(p[start : start + _PREDICT_CHUNK]) for p in parts]
                if fn == "proba":
                    out.append(torch.softmax(module(*chunk), dim=1).numpy())
                else:
                    out.append(module.hidden(*chunk).numpy())  # type: ignore[operator]
        width = self.n_classes if fn == "proba" else self.config.hidden
        if not out:
            return np.empty((0, width), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def predict_proba(self, X: HeadInput) -> np.ndarray:
        """Class probabilities ``(n, C)`` float32 (clean view, eval mode)."""
        return self._run(X, "proba")

    def hidden(self, X: HeadInput) -> np.ndarray:
        """Hidden features ``(n, hidden)`` float32."""
        return self._run(X, "hidden")

    def _tensors(self) -> dict[str, torch.Tensor]:
        assert self.module is not None
        return dict(self.module.state_dict())

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        assert self.input_dims is not None
        module = self._build(self.input_dims)
        module.load_state_dict(dict(tensors))
        self.module = module.eval()


def _check_sample_weight(sample_weight: np.ndarray | None, n: int) -> np.ndarray | None:
    if sample_weight is None:
        return None
    sw = np.asarray(sample_weight, dtype=np.float64)
    if sw.shape != (n,) or not np.isfinite(sw).all() or sw.min() < 0 or sw.sum() <= 0:
        raise InvalidArgument(f"sample_weight must be ({n},), finite, ≥ 0 and not all zero")
    return sw


class MLPHead(_TorchHead):
    """The ActiveVisium MLP head (see :class:`MLPNet` and :class:`MLPConfig`).

    ``hidden(X)`` returns the 128-d LeakyReLU activations.
    """

    name = "mlp"
    config_class = MLPConfig

    def _build(self, dims: Mapping[str, int]) -> nn.Module:
        c = self.config
        return MLPNet(dims["features"], self.n_classes, c.hidden, c.negative_slope, c.dropout)


class MultimodalHead(_TorchHead):
    """Image + gene-expression head (see :class:`MultimodalNet`).

    Input: ``{"image": (n, d) or (n_views, n, d), "genes": (n, g)}``. ``hidden(X)``
    returns the 128-d fused features (before dropout).
    """

    name = "multimodal"
    config_class = MultimodalConfig
    input_keys = ("image", "genes")

    def _build(self, dims: Mapping[str, int]) -> nn.Module:
        c = self.config
        return MultimodalNet(
            dims["image"], dims["genes"], self.n_classes, c.hidden, c.negative_slope, c.dropout
        )


# --------------------------------------------------------------------------- logreg


class LogRegHead(Head):
    """Standardised multinomial logistic regression (``class_weight="balanced"``).

    Trained with scikit-learn's L-BFGS; predicts with its own softmax so the artifact is
    plain arrays. ``hidden(X)`` returns the standardised input ``(n, d)``. Augmented
    views are ignored (the clean view is used); ``sample_weight`` multiplies the
    balanced class weights.
    """

    name = "logreg"
    config_class = LogRegConfig

    def __init__(self, *, n_classes: int, seed: int = 0, **hyperparameters: Any) -> None:
        super().__init__(n_classes=n_classes, seed=seed, **hyperparameters)
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.coef: np.ndarray | None = None
        self.intercept: np.ndarray | None = None
        self.seen: np.ndarray | None = None

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        assert self.mean is not None and self.scale is not None
        return ((X - self.mean) / self.scale).astype(np.float32, copy=False)

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
        """See :meth:`Head.fit`."""
        from sklearn.linear_model import LogisticRegression

        t0 = time.perf_counter()
        self.input_dims = None
        (Xc,) = self._clean(X)
        y = _check_labels(y, Xc.shape[0], self.n_classes)
        sw = _check_sample_weight(sample_weight, len(y))
        mean = Xc.mean(axis=0)
        scale = Xc.std(axis=0)
        scale[scale < 1e-8] = 1.0
        self.mean, self.scale = mean, scale
        Z = self._standardise(Xc)
        seen = np.unique(y)
        c = self.config
        clf = LogisticRegression(
            C=c.C, max_iter=c.max_iter, tol=c.tol, class_weight="balanced", random_state=self.seed
        )
        warm = (
            isinstance(init_from, LogRegHead)
            and init_from.fitted
            and init_from.input_dims == {"features": Xc.shape[1]}
            and init_from.seen is not None
            and np.array_equal(init_from.seen, seen)
        )
        if warm:
            assert isinstance(init_from, LogRegHead)
            clf.set_params(warm_start=True)
            clf.coef_ = init_from.coef.astype(np.float64).copy()  # type: ignore[union-attr]
            clf.intercept_ = init_from.intercept.astype(np.float64).copy()  # type: ignore[union-attr]
        if sw is not None:
            sw = sw * (len(sw) / sw.sum())
        clf.fit(Z, y, sample_weight=sw)
        self.coef = clf.coef_.astype(np.float32)
        self.intercept = clf.intercept_.astype(np.float32)
        self.seen = clf.classes_.astype(np.int64)
        self.input_dims = {"features": int(Xc.shape[1])}
        vl = vf1 = None
        if X_val is not None and y_val is not None and len(y_val):
            yv = np.asarray(y_val, dtype=np.int64)
            P = self.predict_proba(X_val)
            vl = _weighted_ce(P, yv, inverse_frequency_weights(y, self.n_classes))
            vf1 = _macro_f1(yv, P.argmax(axis=1))
        return FitReport(
            epochs=1,
            best_epoch=1,
            train_loss=_weighted_ce(
                self.predict_proba(Xc), y, inverse_frequency_weights(y, self.n_classes)
            ),
            val_loss=vl,
            val_macro_f1=vf1,
            seconds=time.perf_counter() - t0,
            warm_started=bool(warm),
            early_stopped=False,
            checkpoint_metric="val_loss" if vl is not None else "last_epoch",
        )

    def predict_proba(self, X: HeadInput) -> np.ndarray:
        """Class probabilities ``(n, C)`` float32; unseen classes get 0."""
        self._require_fitted()
        Z = self._standardise(self._clean(X)[0])
        assert self.coef is not None and self.intercept is not None and self.seen is not None
        logits = Z @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:  # binary: sklearn keeps one row for the second class
            p1 = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            seen_p = np.stack([1.0 - p1, p1], axis=1)
        else:
            logits -= logits.max(axis=1, keepdims=True)
            seen_p = np.exp(logits)
            seen_p /= seen_p.sum(axis=1, keepdims=True)
        P = np.zeros((Z.shape[0], self.n_classes), dtype=np.float32)
        P[:, self.seen] = seen_p
        return P

    def hidden(self, X: HeadInput) -> np.ndarray:
        """The standardised input ``(n, d)`` float32."""
        self._require_fitted()
        return self._standardise(self._clean(X)[0])

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "mean": torch.from_numpy(np.asarray(self.mean, dtype=np.float32)),
            "scale": torch.from_numpy(np.asarray(self.scale, dtype=np.float32)),
            "coef": torch.from_numpy(np.asarray(self.coef, dtype=np.float32)),
            "intercept": torch.from_numpy(np.asarray(self.intercept, dtype=np.float32)),
            "seen": torch.from_numpy(np.asarray(self.seen, dtype=np.int64)),
        }

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.mean = tensors["mean"].numpy()
        self.scale = tensors["scale"].numpy()
        self.coef = tensors["coef"].numpy()
        self.intercept = tensors["intercept"].numpy()
        self.seen = tensors["seen"].numpy()


# --------------------------------------------------------------------------- ensemble


class EnsembleHead(Head):
    """``members`` MLP (or multimodal) heads with seeds ``seed, seed+1, …``.

    ``predict_proba`` is the members' mean; :meth:`member_proba` gives every member's
    probabilities for BALD; ``hidden`` is the first member's hidden features.
    """

    name = "ensemble"
    config_class = EnsembleConfig

    def __init__(self, *, n_classes: int, seed: int = 0, **hyperparameters: Any) -> None:
        super().__init__(n_classes=n_classes, seed=seed, **hyperparameters)
        self.members: list[_TorchHead] = []

    @property
    def input_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return MultimodalHead.input_keys if self.config.member == "multimodal" else ("features",)

    def _member(self, i: int) -> _TorchHead:
        params = self.hyperparameters
        params.pop("members")
        kind = params.pop("member")
        if kind == "mlp":
            params.pop("dropout")
        return HEADS[kind](n_classes=self.n_classes, seed=self.seed + i, **params)  # type: ignore[return-value]

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
        """See :meth:`Head.fit`; each member warm-starts from the matching old member."""
        t0 = time.perf_counter()
        previous = init_from.members if isinstance(init_from, EnsembleHead) else []
        members, reports = [], []
        for i in range(self.config.members):
            member = self._member(i)
            reports.append(
                member.fit(
                    X,
                    y,
                    sample_weight=sample_weight,
                    X_val=X_val,
                    y_val=y_val,
                    init_from=previous[i] if i < len(previous) else None,
                )
            )
            members.append(member)
        self.members = members
        self.input_dims = members[0].input_dims
        vl = vf1 = None
        if X_val is not None and y_val is not None and len(y_val):
            yv = np.asarray(y_val, dtype=np.int64)
            P = self.predict_proba(X_val)
            vl = _weighted_ce(P, yv, inverse_frequency_weights(np.asarray(y), self.n_classes))
            vf1 = _macro_f1(yv, P.argmax(axis=1))
        return FitReport(
            epochs=max(r.epochs for r in reports),
            best_epoch=reports[0].best_epoch,
            train_loss=float(np.mean([r.train_loss for r in reports])),
            val_loss=vl,
            val_macro_f1=vf1,
            seconds=time.perf_counter() - t0,
            warm_started=all(r.warm_started for r in reports),
            early_stopped=all(r.early_stopped for r in reports),
            checkpoint_metric=reports[0].checkpoint_metric,
        )

    def member_proba(self, X: HeadInput) -> np.ndarray:
        """Every member's probabilities ``(M, n, C)`` float32."""
        self._require_fitted()
        return np.stack([m.predict_proba(X) for m in self.members])

    def predict_proba(self, X: HeadInput) -> np.ndarray:
        """Mean of the members' probabilities ``(n, C)`` float32."""
        return self.member_proba(X).mean(axis=0)

    def hidden(self, X: HeadInput) -> np.ndarray:
        """The first member's hidden features ``(n, hidden)``."""
        self._require_fitted()
        return self.members[0].hidden(X)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"m{i}.{key}": value
            for i, member in enumerate(self.members)
            for key, value in member._tensors().items()
        }

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.members = []
        for i in range(self.config.members):
            prefix = f"m{i}."
            member = self._member(i)
            member.input_dims = self.input_dims
            member._load({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            self.members.append(member)


# --------------------------------------------------------------------------- registry

HEADS: dict[str, type[Head]] = {
    "mlp": MLPHead,
    "multimodal": MultimodalHead,
    "logreg": LogRegHead,
    "ensemble": EnsembleHead,
}
"""Registry: head name → class."""


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
