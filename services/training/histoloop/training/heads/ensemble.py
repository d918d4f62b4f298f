"""The ensemble head: several MLP (or multimodal) heads with consecutive seeds, for BALD."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from histoloop.errors import InvalidArgument
from histoloop.training.heads.base import (
    HEADS,
    FitReport,
    Head,
    HeadInput,
    _macro_f1,
    _weighted_ce,
    inverse_frequency_weights,
    register_head,
)
from histoloop.training.heads.torch_nets import MultimodalConfig, MultimodalHead, _TorchHead

__all__ = ["EnsembleConfig", "EnsembleHead"]


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


@register_head
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
