"""Label snapshots: the consensus training labels of a project at one label version.

The annotation store writes one per committed batch (``labels.committed`` names its URI;
the writer is :mod:`histoloop.annotation_store.snapshot`); training and acquisition read
it with :func:`read_snapshot`. The document (canonical JSON)::

    {"project": …, "label_version": N, "consensus": rule, "n_labelled_spots": n,
     "classes": [{"name": …, "color": …}, …],
     "datasets": {dataset: {"labels": {barcode: class}, "disagreement": {barcode: 0..1},
                            "votes": {barcode: {annotator: class}}}},
     "batches": [{"batch_id": …, "label_version": v}, …]}

``votes`` holds each annotator's latest label of every labelled spot (what the
per-annotator models train on); snapshots written before it was recorded load with no votes.
A snapshot holds exactly the labels with a version ≤ ``label_version``, so replaying a
round reads the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from histoloop.artifacts.base import ArtifactStore
from histoloop.errors import InvalidArgument

__all__ = ["MIN_TRAINING_CLASSES", "LabelSnapshot", "read_snapshot", "trainable_classes"]

MIN_TRAINING_CLASSES = 2
"""A model needs labels of at least this many classes. Until the labels have them, training
waits and acquisition asks for more spots instead of waiting for a model."""


@dataclass(frozen=True)
class LabelSnapshot:
    """Consensus labels per dataset and barcode, with per-spot annotator disagreement and votes."""

    project: str
    label_version: int
    classes: Sequence[str]
    labels: Mapping[str, Mapping[str, str]]
    """dataset → barcode → class name (the training label by the project's consensus rule)."""
    disagreement: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """dataset → barcode → disagreement in [0, 1] (0: the raters agree or only one rated)."""
    consensus: str = ""
    batches: tuple[tuple[int, str], ...] = ()
    """``(label_version, batch_id)`` of every label batch up to ``label_version``, in commit
    order (empty in snapshots written before batches were recorded)."""
    votes: Mapping[str, Mapping[str, Mapping[str, str]]] = field(default_factory=dict)
    """dataset → barcode → annotator → that annotator's latest class (empty in snapshots
    written before votes were recorded)."""

    @classmethod
    def from_json(cls, data: bytes) -> LabelSnapshot:
        """Parse a snapshot document.

        Raises:
            InvalidArgument: not a snapshot, or a label outside its classes.
        """
        try:
            raw = json.loads(data)
            classes = [str(c["name"]) for c in raw["classes"]]
            datasets = raw["datasets"]
            project, version = str(raw["project"]), int(raw["label_version"])
            batches = tuple(
                (int(b["label_version"]), str(b["batch_id"])) for b in raw.get("batches", [])
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidArgument(f"not a label snapshot: {exc}") from exc
        known = set(classes)
        labels = {d: dict(v.get("labels", {})) for d, v in datasets.items()}
        votes = {
            d: {b: dict(by) for b, by in v.get("votes", {}).items()} for d, v in datasets.items()
        }
        for dataset, given in labels.items():
            used = set(given.values()) | {c for by in votes[dataset].values() for c in by.values()}
            bad = sorted(used - known)
            if bad:
                raise InvalidArgument(
                    f"snapshot labels of dataset {dataset!r} use unknown classes {bad}"
                )
        return cls(
            project=project,
            label_version=version,
            classes=classes,
            labels=labels,
            disagreement={d: dict(v.get("disagreement", {})) for d, v in datasets.items()},
            consensus=str(raw.get("consensus", "")),
            batches=batches,
            votes={d: v for d, v in votes.items() if v},
        )

    @property
    def annotators(self) -> tuple[str, ...]:
        """Every annotator with a vote in the snapshot, sorted."""
        return tuple(
            sorted({a for by_spot in self.votes.values() for by in by_spot.values() for a in by})
        )

    @property
    def n_labelled(self) -> int:
        """Spots with a training label, over all datasets."""
        return sum(len(m) for m in self.labels.values())

    def labelled_classes(self, datasets: Iterable[str] | None = None) -> set[str]:
        """The classes with at least one label (in ``datasets`` only, when given)."""
        return trainable_classes({d: given.values() for d, given in self.labels.items()}, datasets)


def trainable_classes(
    labels: Mapping[str, Iterable[str]], datasets: Iterable[str] | None = None
) -> set[str]:
    """The classes with at least one training label (in ``datasets`` only, when given).

    With the datasets that have embeddings this is what a model can be trained on, and its
    size is ``LabelsCommitted.n_trainable_classes``: the annotation store counts it from its
    consensus when it publishes the event, readers of the snapshot through
    :meth:`LabelSnapshot.labelled_classes`, so the two agree.

    Args:
        labels: dataset → the classes of its labelled spots (repeats allowed).
        datasets: the datasets to count in; all of them when None.
    """
    wanted = None if datasets is None else set(datasets)
    return {c for d, given in labels.items() if wanted is None or d in wanted for c in given}


def read_snapshot(store: ArtifactStore, uri: str) -> LabelSnapshot:
    """Load a snapshot by URI (checksum verified)."""
    return LabelSnapshot.from_json(store.get(store.key_from_uri(uri)))
