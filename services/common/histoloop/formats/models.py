"""The model registry's layout in the artifact store.

Every model of a project lives under ``models/<project>/<version>/``:

- ``model.pt`` (:data:`MODULE_FILE`): the TorchScript module prediction runs;
- ``trained.bin`` (:data:`STATE_FILE`): training's own state, for a warm start;
- ``raters.pt`` (:data:`RATERS_FILE`): the per-annotator TorchScript module, only when the
  labels came from two or more annotators (the card lists them in ``raters``);
- ``card.json`` (:data:`CARD_FILE`): what the model is, written last, so a card always
  points at a complete model; its URI names the model in events.
"""

from __future__ import annotations

from collections.abc import Sequence

from histoloop.artifacts import validate_key
from histoloop.errors import FailedPrecondition, InvalidArgument, NotFound

__all__ = [
    "CARD_FILE",
    "MODELS_ROOT",
    "MODULE_FILE",
    "RATERS_FILE",
    "STATE_FILE",
    "card_key",
    "model_prefix",
    "models_prefix",
    "module_key",
    "rater_index",
    "raters_key",
    "sibling_key",
    "state_key",
]

MODELS_ROOT = "models"
CARD_FILE = "card.json"
MODULE_FILE = "model.pt"
STATE_FILE = "trained.bin"
RATERS_FILE = "raters.pt"


def models_prefix(project: str) -> str:
    """``models/<project>/``: every model of a project."""
    return f"{MODELS_ROOT}/{project}/"


def model_prefix(project: str, version: str) -> str:
    """``models/<project>/<version>``: one model's folder."""
    return validate_key(f"{MODELS_ROOT}/{project}/{version}")


def card_key(project: str, version: str) -> str:
    """Key of a model's card."""
    return f"{model_prefix(project, version)}/{CARD_FILE}"


def module_key(project: str, version: str) -> str:
    """Key of a model's TorchScript module."""
    return f"{model_prefix(project, version)}/{MODULE_FILE}"


def raters_key(project: str, version: str) -> str:
    """Key of a model's per-annotator TorchScript module."""
    return f"{model_prefix(project, version)}/{RATERS_FILE}"


def state_key(project: str, version: str) -> str:
    """Key of a model's training state (warm start)."""
    return f"{model_prefix(project, version)}/{STATE_FILE}"


def sibling_key(card: str, name: str) -> str:
    """The key of file ``name`` (:data:`MODULE_FILE`, :data:`STATE_FILE`, …) beside a card key.

    Raises:
        InvalidArgument: ``card`` is not a card key.
    """
    folder, _, file = card.rpartition("/")
    if file != CARD_FILE or not folder:
        raise InvalidArgument(f"{card!r} is not a model card key (…/{CARD_FILE})")
    return f"{folder}/{name}"


def rater_index(raters: Sequence[str], annotator: str, version: str) -> int:
    """Index of ``annotator`` in a model's ``raters`` (its per-annotator module's rater index).

    Raises:
        FailedPrecondition: the model has no per-annotator module (``raters`` is empty).
        NotFound: the model knows no such annotator (the message names ``annotator_id``).
    """
    if not raters:
        raise FailedPrecondition(
            f"model {version} has no per-annotator model: it was trained on labels of fewer than "
            "two annotators; ask without annotator_id for the consensus model"
        )
    if annotator not in raters:
        raise NotFound(
            f"annotator_id: model {version} knows no annotator {annotator!r}; it knows {list(raters)}"
        )
    return list(raters).index(annotator)
