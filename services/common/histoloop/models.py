"""The model artifact contract between training (writes) and prediction (reads).

A model is an immutable pair of artifacts under ``models/<project>/<version>/``:
``model.pt`` — a TorchScript module whose ``forward(x)`` returns
``(probabilities (n, C), hidden (n, h), member_probabilities (M, n, C))`` — and
``card.json`` — what it is: classes, head, features, seed, hyper-parameters, the label
batches and embeddings it was trained on, validation metrics and training time. TorchScript
loads without the training code and without pickle, so prediction never imports training.
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
    card_key,
    models_prefix,
    module_key,
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


@dataclass
class LoadedModel:
    """A model ready to predict."""

    card: ModelCard
    module: torch.jit.ScriptModule

    def predict(self, x: np.ndarray, batch: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(probabilities, hidden, member_probabilities)`` for rows of ``x``.

        Raises:
            InvalidArgument: ``x`` has the wrong number of columns.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.card.input_dim:
            raise InvalidArgument(
                f"model {self.card.version} expects (n, {self.card.input_dim}) features, got {x.shape}"
            )
        outs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        with torch.inference_mode():
            for start in range(0, max(len(x), 1), batch):
                probs, hidden, members = self.module(torch.from_numpy(x[start:start + batch]))
                outs.append((probs.numpy(), hidden.numpy(), members.numpy()))
        return (np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]),
                np.concatenate([o[2] for o in outs], axis=1))


def save_model(store: ArtifactStore, card: ModelCard, module: torch.jit.ScriptModule) -> str:
    """Store a model (module first, card last: a card always points at a complete model).

    Returns the URI of the card, which names the model in events.
    """
    module_at, card_at = module_key(card.project, card.version), card_key(card.project, card.version)
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    if not store.exists(module_at):
        store.put(module_at, buffer.getvalue())
    if not store.exists(card_at):
        store.put(card_at, json.dumps(asdict(card), sort_keys=True).encode(),
                  content_type="application/json")
    return store.uri(card_at)


def _card(raw: bytes) -> ModelCard:
    return ModelCard(**json.loads(raw))


def load_model(store: ArtifactStore, card_uri: str) -> LoadedModel:
    """Load a model by its card URI."""
    key = store.key_from_uri(card_uri)
    card = _card(store.get(key))
    module = torch.jit.load(io.BytesIO(store.get(sibling_key(key, MODULE_FILE))), map_location="cpu")
    module.eval()
    return LoadedModel(card=card, module=module)


def list_cards(store: ArtifactStore, project: str) -> list[tuple[str, ModelCard]]:
    """``(card URI, card)`` of every model of a project, oldest first."""
    cards = [(store.uri(i.key), _card(store.get(i.key)))
             for i in store.list(models_prefix(project)) if i.key.endswith(f"/{CARD_FILE}")]
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
        raise FailedPrecondition(f"model {card.version} has classes {list(card.classes)}, not {list(classes)}")
