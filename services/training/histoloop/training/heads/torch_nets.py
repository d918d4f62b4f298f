"""The torch heads: the ActiveVisium MLP and the multimodal net, and their training loop.

:func:`_fit_module` is the one loop both train with (class-weighted cross-entropy,
views, adaptive resampling, best-validation checkpoint, patience, learning-rate drops).
"""

from __future__ import annotations

import abc
import contextlib
import copy
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import WeightedRandomSampler

from histoloop.errors import InvalidArgument
from histoloop.training.heads.base import (
    _PREDICT_CHUNK,
    FitReport,
    Head,
    HeadInput,
    _check_labels,
    _check_sample_weight,
    _macro_f1,
    inverse_frequency_weights,
    register_head,
)
from histoloop.training.resampling import RESAMPLING_MODES, adaptive_resampling_weights

__all__ = [
    "MLPConfig",
    "MLPHead",
    "MLPNet",
    "MultimodalConfig",
    "MultimodalHead",
    "MultimodalNet",
]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block (process-wide, restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
            raise InvalidArgument(
                f"resampling must be one of {RESAMPLING_MODES}, got {self.resampling!r}"
            )
        if self.resampling_every < 1 or self.resampling_clusters < 1:
            raise InvalidArgument("resampling_every and resampling_clusters must be ≥ 1")
        if self.lr <= 0:
            raise InvalidArgument(f"lr must be > 0, got {self.lr}")
        if self.lr_drops < 0:
            raise InvalidArgument(f"lr_drops must be ≥ 0, got {self.lr_drops}")
        if self.weight_decay < 0 or self.negative_slope < 0 or self.weight_decay_per_label < 0:
            raise InvalidArgument(
                "weight_decay, weight_decay_per_label and negative_slope must be ≥ 0"
            )

    def decay(self, n_labels: int) -> float:
        """The weight decay used for ``n_labels`` training labels."""
        return self.weight_decay + self.weight_decay_per_label / max(
            int(n_labels), _DECAY_MIN_LABELS
        )


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
                    if (
                        drops < cfg.lr_drops and best_state is not None
                    ):  # anneal: best weights, lr / 10
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

    config_class: ClassVar[type] = MLPConfig

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


@register_head
class MLPHead(_TorchHead):
    """The ActiveVisium MLP head (see :class:`MLPNet` and :class:`MLPConfig`).

    ``hidden(X)`` returns the 128-d LeakyReLU activations.
    """

    name = "mlp"
    config_class = MLPConfig

    def _build(self, dims: Mapping[str, int]) -> nn.Module:
        c = self.config
        return MLPNet(dims["features"], self.n_classes, c.hidden, c.negative_slope, c.dropout)


@register_head
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
