"""Export a :class:`~.pipeline.TrainedModel` as one self-contained TorchScript module.

This is the contract of :mod:`histoloop.models` (what the prediction service loads
without importing training code and without pickle)::

    probabilities (n, C), hidden (n, h), member_probabilities (M, n, C) = module(x)

``x`` is ``(n, D)`` float32 with the raw feature blocks side by side in the order of
:func:`input_layout` (``features``; or ``image`` then ``genes`` for the multimodal head).
The stored source-dataset scaling (library-size normalisation + log1p where recorded,
then standardisation) is baked into the module. ``M`` is the ensemble size, the number of
MC-dropout passes for an MLP head trained with ``mc_samples > 0``, 1 for every other head
(``member_probabilities[0] == probabilities``).

Genes missing from a transfer target cannot be neutralised inside the module; use
:func:`histoloop.prediction.predict` with ``missing_genes`` for that case.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from histoloop.errors import InvalidArgument

from .heads import EnsembleHead, Head, LogRegHead, MLPHead, MLPNet, MultimodalHead, MultimodalNet
from .mc_dropout import mc_masks_for
from .pipeline import TrainedModel

if TYPE_CHECKING:
    from .raters import RaterModel

__all__ = ["export_raters_torchscript", "export_torchscript", "input_layout", "scaled_inputs"]


def input_layout(model: TrainedModel) -> list[tuple[str, int]]:
    """Feature blocks of the exported module's input, in column order.

    Args:
        model: A trained model.

    Returns:
        ``[(key, dim), …]``; the module takes ``sum(dim)`` columns.
    """
    return [(key, int(dim)) for key, dim in model.feature_dims.items()]


class _Scaler(nn.Module):
    if TYPE_CHECKING:  # buffers; hidden from TorchScript, which rejects string annotations
        mean: torch.Tensor
        scale: torch.Tensor

    def __init__(self, model: TrainedModel) -> None:
        super().__init__()
        layout = input_layout(model)
        means, scales, log1p = [], [], []
        for key, dim in layout:
            s = model.scaling.get(key)
            means.append(torch.zeros(dim) if s is None else torch.from_numpy(s.mean.copy()))
            scales.append(torch.ones(dim) if s is None else torch.from_numpy(s.scale.copy()))
            log1p.append(float(s.log1p_target_sum) if s is not None and s.log1p_target_sum else 0.0)
        self.splits: list[int] = [dim for _, dim in layout]
        self.log1p: list[float] = log1p
        self.register_buffer("mean", torch.cat(means).float())
        self.register_buffer("scale", torch.cat(scales).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, dim=1)
        out: list[torch.Tensor] = []
        for i, part in enumerate(parts):
            target = self.log1p[i]
            if target > 0.0:
                totals = part.sum(dim=1, keepdim=True).clamp_min(1.0)
                part = torch.log1p(part * (target / totals))
            out.append(part)
        return (torch.cat(out, dim=1) - self.mean) / self.scale


def _members(
    weight: torch.Tensor, bias: torch.Tensor, h: torch.Tensor, p: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """MC-dropout passes ``(T, n, C)`` with the stored masks, or ``p`` alone without masks."""
    if masks.shape[0] == 0:
        return p.unsqueeze(0)
    logits = torch.nn.functional.linear(h.unsqueeze(0) * masks.unsqueeze(1), weight, bias)
    return torch.softmax(logits, dim=2)


def _mask_buffer(head: Head) -> torch.Tensor:
    masks = mc_masks_for(head)
    return torch.zeros(0, 1) if masks is None else torch.from_numpy(masks)


class _MLPCore(nn.Module):
    if TYPE_CHECKING:
        masks: torch.Tensor

    def __init__(self, net: MLPNet, masks: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("masks", masks)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.net.encoder(z)
        p = torch.softmax(self.net.classifier(h), dim=1)
        return (
            p,
            h,
            _members(self.net.classifier.weight, self.net.classifier.bias, h, p, self.masks),
        )


class _MultimodalCore(nn.Module):
    if TYPE_CHECKING:
        masks: torch.Tensor

    def __init__(
        self, net: MultimodalNet, image_dim: int, gene_dim: int, masks: torch.Tensor
    ) -> None:
        super().__init__()
        self.net = net
        self.dims: list[int] = [image_dim, gene_dim]
        self.register_buffer("masks", masks)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, genes = torch.split(z, self.dims, dim=1)
        h = self.net.fusion(torch.cat([self.net.image(image), self.net.genes(genes)], dim=1))
        p = torch.softmax(self.net.classifier(h), dim=1)
        return (
            p,
            h,
            _members(self.net.classifier.weight, self.net.classifier.bias, h, p, self.masks),
        )


class _LogRegCore(nn.Module):
    if TYPE_CHECKING:
        mean: torch.Tensor
        scale: torch.Tensor
        coef: torch.Tensor
        intercept: torch.Tensor
        seen: torch.Tensor

    def __init__(self, head: LogRegHead) -> None:
        super().__init__()
        tensors = head._tensors()
        for name in ("mean", "scale", "coef", "intercept", "seen"):
            self.register_buffer(name, tensors[name].clone())
        self.n_classes = head.n_classes

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = (z - self.mean) / self.scale
        logits = h @ self.coef.t() + self.intercept
        if self.coef.shape[0] == 1:
            p1 = torch.sigmoid(logits[:, 0])
            seen_p = torch.stack([1.0 - p1, p1], dim=1)
        else:
            seen_p = torch.softmax(logits, dim=1)
        p = torch.zeros(z.shape[0], self.n_classes, dtype=z.dtype)
        p = p.index_copy(1, self.seen, seen_p)
        return p, h, p.unsqueeze(0)


class _EnsembleCore(nn.Module):
    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs: list[torch.Tensor] = []
        hiddens: list[torch.Tensor] = []
        for member in self.members:
            p, h, _ = member(z)
            probs.append(p)
            hiddens.append(h)
        stacked = torch.stack(probs)
        return stacked.mean(dim=0), hiddens[0], stacked


def scaled_inputs(model: TrainedModel, x: np.ndarray) -> np.ndarray:
    """``x`` (the exported module's raw input, :func:`input_layout`) after the model's stored scaling."""
    with torch.no_grad():
        return _Scaler(model)(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


class _RaterCore(nn.Module):
    if TYPE_CHECKING:
        mean: torch.Tensor
        scale: torch.Tensor

    def __init__(self, raters: RaterModel) -> None:
        super().__init__()
        self.net = copy.deepcopy(raters.net).eval()
        self.register_buffer(
            "mean", torch.from_numpy(np.asarray(raters.mean, dtype=np.float32).copy())
        )
        self.register_buffer(
            "scale", torch.from_numpy(np.asarray(raters.scale, dtype=np.float32).copy())
        )

    def forward(self, z: torch.Tensor, rater: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net((z - self.mean) / self.scale, rater), dim=1)


class _RatersExported(nn.Module):
    def __init__(self, scaler: _Scaler, core: _RaterCore) -> None:
        super().__init__()
        self.scaler = scaler
        self.core = core

    def forward(self, x: torch.Tensor, rater: torch.Tensor) -> torch.Tensor:
        return self.core(self.scaler(x), rater)


def export_raters_torchscript(model: TrainedModel, raters: RaterModel) -> torch.jit.ScriptModule:
    """Compile a per-annotator model into the ``raters.pt`` module of :mod:`histoloop.models`.

    Args:
        model: The consensus model it was fitted beside (its input layout and scaling).
        raters: The :class:`~.raters.RaterModel` (from :func:`~.raters.fit_round_raters`).

    Returns:
        A scripted module: ``(x (n, D), rater (n,) int64) → probabilities (n, C)``, ``rater``
        indexing ``raters.raters``.
    """
    return torch.jit.script(_RatersExported(_Scaler(model), _RaterCore(raters)).eval())


class _Exported(nn.Module):
    def __init__(self, scaler: _Scaler, core: nn.Module) -> None:
        super().__init__()
        self.scaler = scaler
        self.core = core

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.core(self.scaler(x))


def _core(head: Head) -> nn.Module:
    if isinstance(head, MLPHead):
        assert isinstance(head.module, MLPNet)
        return _MLPCore(head.module, _mask_buffer(head))
    if isinstance(head, MultimodalHead):
        assert isinstance(head.module, MultimodalNet) and head.input_dims is not None
        return _MultimodalCore(
            head.module, head.input_dims["image"], head.input_dims["genes"], _mask_buffer(head)
        )
    if isinstance(head, LogRegHead):
        return _LogRegCore(head)
    if isinstance(head, EnsembleHead):
        return _EnsembleCore([_core(m) for m in head.members])
    raise InvalidArgument(f"head {head.name!r} cannot be exported")


def export_torchscript(model: TrainedModel) -> torch.jit.ScriptModule:
    """Compile a trained model into one TorchScript module (eval mode).

    Args:
        model: A :class:`TrainedModel` (any registered head).

    Returns:
        A scripted module: ``x (n, D) → (probabilities, hidden, member_probabilities)``
        where ``D = sum(dim for _, dim in input_layout(model))``.

    Raises:
        InvalidArgument: The head kind cannot be exported.
    """
    head = Head.from_bytes(model.head_bytes)  # a private copy: scripting must not touch the cache
    exported = _Exported(_Scaler(model), _core(head)).eval()
    return torch.jit.script(exported)
