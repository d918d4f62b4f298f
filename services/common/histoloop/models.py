"""The model artifact contract between training (writes) and prediction (reads).

A model is an immutable pair of artifacts under ``models/<project>/<version>/``:
``model.pt`` — a TorchScript module whose ``forward(x)`` returns
``(probabilities (n, C), hidden (n, h), member_probabilities (M, n, C))`` — and
``card.json`` — what it is: classes, head, features, seed, hyper-parameters, the label
batches and embeddings it was trained on, validation metrics and training time. TorchScript
loads without the training code and without pickle, so prediction never imports training.

When the labels came from two or more annotators the model also has a per-annotator module
``raters.pt`` whose ``forward(x, rater)`` returns the probabilities ``(n, C)`` that rater
``rater[i]`` (an index into ``card.raters``) would give spot ``x[i]``; the card's ``raters``
lists the annotators it knows (empty: no such module).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from histoloop.artifacts.base import ArtifactStore
from histoloop.errors import FailedPrecondition, InvalidArgument, NotFound
from histoloop.formats.models import (
    CARD_FILE,
    MODULE_FILE,
    RATERS_FILE,
    card_key,
    models_prefix,
    module_key,
    rater_index,
    raters_key,
    sibling_key,
)

__all__ = ["LoadedModel", "ModelCard", "latest_card", "list_cards", "load_model", "save_model"]


@dataclass(frozen=True)
class ModelCard:
    """Registry entry of one trained model."""

    project: str
    version: str
    head: str
    classes: Sequence[str]
    input_dim: int
    features: int
    """``common_pb2.FeatureSet`` value the inputs were built with."""
    spatial_neighbours: int
    seed: int
    label_version: int
    label_batch_ids: Sequence[str]
    embeddings_uris: Sequence[str]
    hyperparameters: Mapping[str, str]
    metrics: Mapping[str, object]
    train_seconds: float
    created_ms: int
    parent_event_id: str = ""
    extra: Mapping[str, object] = field(default_factory=dict)
    raters: Sequence[str] = ()
    """Annotators the per-annotator module knows, by its rater index (empty: no such module)."""


@dataclass
class LoadedModel:
    """A model ready to predict."""

    card: ModelCard
    module: torch.jit.ScriptModule
    raters_module: torch.jit.ScriptModule | None = None
    """The per-annotator module (``raters.pt``) when the card lists raters."""

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.card.input_dim:
            raise InvalidArgument(
                f"model {self.card.version} expects (n, {self.card.input_dim}) features, got {x.shape}"
            )
        return x

    def predict_as(self, x: np.ndarray, annotator: str) -> np.ndarray:
        """``(n, C)`` probabilities as ``annotator`` would label the rows of ``x``.

        Raises:
            FailedPrecondition: the model has no per-annotator module.
            NotFound: the model knows no such annotator (the message names ``annotator_id``).
            InvalidArgument: ``x`` has the wrong number of columns.
        """
        index = rater_index(
            self.card.raters if self.raters_module is not None else (), annotator, self.card.version
        )
        assert self.raters_module is not None
        return self._rater(self.raters_module, self._check(x), index)

    def predict_raters(self, x: np.ndarray) -> np.ndarray:
        """``(R, n, C)`` probabilities of every annotator in ``card.raters`` for the rows of ``x``.

        Raises:
            FailedPrecondition: the model has no per-annotator module.
        """
        if self.raters_module is None:
            raise FailedPrecondition(f"model {self.card.version} has no per-annotator model")
        x = self._check(x)
        return np.stack(
            [self._rater(self.raters_module, x, r) for r in range(len(self.card.raters))]
        )

    @staticmethod
    def _rater(
        module: torch.jit.ScriptModule, x: np.ndarray, rater: int, batch: int = 65536
    ) -> np.ndarray:
        parts = []
        with torch.inference_mode():
            for start in range(0, max(len(x), 1), batch):
                chunk = torch.from_numpy(x[start : start + batch])
                parts.append(
                    module(chunk, torch.full((len(chunk),), rater, dtype=torch.int64)).numpy()
                )
        return np.concatenate(parts)

    def predict(
        self, x: np.ndarray, batch: int = 65536
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(probabilities, hidden, member_probabilities)`` for rows of ``x``.

        Raises:
            InvalidArgument: ``x`` has the wrong number of columns.
        """
        x = self._check(x)
        outs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        with torch.inference_mode():
            for start in range(0, max(len(x), 1), batch):
                probs, hidden, members = self.module(torch.from_numpy(x[start : start + batch]))
                outs.append((probs.numpy(), hidden.numpy(), members.numpy()))
        return (
            np.concatenate([o[0] for o in outs]),
            np.concatenate([o[1] for o in outs]),
            np.concatenate([o[2] for o in outs], axis=1),
        )


def _put_module(store: ArtifactStore, key: str, module: torch.jit.ScriptModule) -> None:
    if not store.exists(key):
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        store.put(key, buffer.getvalue())


def save_model(
    store: ArtifactStore,
    card: ModelCard,
    module: torch.jit.ScriptModule,
    raters_module: torch.jit.ScriptModule | None = None,
) -> str:
    """Store a model (modules first, card last: a card always points at a complete model).

    ``raters_module`` is the per-annotator module, required when ``card.raters`` is set.
    Returns the URI of the card, which names the model in events.

    Raises:
        InvalidArgument: ``card.raters`` and ``raters_module`` do not come together.
    """
    if bool(card.raters) != (raters_module is not None):
        raise InvalidArgument(
            "raters: a card lists raters exactly when a per-annotator module is saved with it"
        )
    card_at = card_key(card.project, card.version)
    _put_module(store, module_key(card.project, card.version), module)
    if raters_module is not None:
        _put_module(store, raters_key(card.project, card.version), raters_module)
    if not store.exists(card_at):
        store.put(
            card_at,
            json.dumps(asdict(card), sort_keys=True).encode(),
            content_type="application/json",
        )
    return store.uri(card_at)


def _card(raw: bytes) -> ModelCard:
    return ModelCard(**json.loads(raw))


def load_model(store: ArtifactStore, card_uri: str) -> LoadedModel:
    """Load a model by its card URI."""
    key = store.key_from_uri(card_uri)
    card = _card(store.get(key))
    module = torch.jit.load(
        io.BytesIO(store.get(sibling_key(key, MODULE_FILE))), map_location="cpu"
    )
    module.eval()
    raters = None
    if card.raters:
        raters = torch.jit.load(
            io.BytesIO(store.get(sibling_key(key, RATERS_FILE))), map_location="cpu"
        )
        raters.eval()
    return LoadedModel(card=card, module=module, raters_module=raters)


def list_cards(store: ArtifactStore, project: str) -> list[tuple[str, ModelCard]]:
    """``(card URI, card)`` of every model of a project, oldest first."""
    cards = [
        (store.uri(i.key), _card(store.get(i.key)))
        for i in store.list(models_prefix(project))
        if i.key.endswith(f"/{CARD_FILE}")
    ]
    return sorted(cards, key=lambda c: (c[1].created_ms, c[1].version))


def latest_card(store: ArtifactStore, project: str, version: str = "") -> tuple[str, ModelCard]:
    """A project's model by version, or its newest.

    Raises:
        NotFound: no such model.
    """
    if version:  # a known key: no listing of the registry
        key = card_key(project, version)
        if not store.exists(key):
            raise NotFound(f"project {project!r} has no model {version!r}")
        return store.uri(key), _card(store.get(key))
    cards = list_cards(store, project)
    if not cards:
        raise NotFound(f"project {project!r} has no trained model yet")
    return cards[-1]


def check_classes(card: ModelCard, classes: Sequence[str]) -> None:
    """A warm start needs the same classes in the same order."""
    if list(card.classes) != list(classes):
        raise FailedPrecondition(
            f"model {card.version} has classes {list(card.classes)}, not {list(classes)}"
        )
