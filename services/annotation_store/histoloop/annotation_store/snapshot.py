"""Consensus label snapshots: the training labels of a project as of one label version.

Beside each spot's consensus label a snapshot carries every annotator's own latest label of
it (``votes``), which the per-annotator models train on.

A snapshot is what ``labels.committed`` points training at (``labels_uri``): canonical
JSON (sorted keys, compact, UTF-8) that is a pure function of the label events up to its
version, so writing it again after a crash gives the same bytes.

:class:`SnapshotBuilder` keeps each project's consensus in memory, applies only the label
events since the previous version and re-renders only the spots they touched (the JSON
of every other spot is kept), so a relay working through a backlog spends time in
proportion to the new labels, not to every label ever given.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, cast

from histoloop.annotation_store.consensus import (
    ConsensusLabel,
    ConsensusResult,
    IncrementalConsensus,
    Item,
    Vote,
)
from histoloop.formats.labels import snapshot_key
from histoloop.labelsets import trainable_classes

__all__ = [
    "SnapshotBuilder",
    "SnapshotSource",
    "render_snapshot",
    "snapshot_bytes",
    "snapshot_document",
    "snapshot_key",
]


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def snapshot_bytes(snapshot: Mapping[str, Any]) -> bytes:
    """The canonical JSON encoding of a snapshot document."""
    return _dumps(snapshot).encode("utf-8")


def _disagreement(label: ConsensusLabel) -> float:
    return round(label.disagreement, 6)


def _batch_entries(batches: Sequence[tuple[int, str]]) -> list[dict[str, object]]:
    return [{"batch_id": batch_id, "label_version": version} for version, batch_id in batches]


def snapshot_document(
    project_id: str,
    label_version: int,
    rule: str,
    classes: Sequence[tuple[str, str]],
    result: ConsensusResult,
    batches: Sequence[tuple[int, str]] = (),
) -> dict[str, Any]:
    """The JSON document of a snapshot.

    Keys: ``project``, ``label_version``, ``consensus`` (the rule), ``classes`` (name and
    colour, in schema order), ``n_labelled_spots``, ``datasets``: per dataset
    ``labels`` (barcode → class), ``disagreement`` (barcode → 0..1, 6 decimals) and
    ``votes`` (barcode → annotator → that annotator's latest class), and ``batches``: every
    label batch up to the version (``batch_id``, ``label_version``), in commit order — what
    a model trained on the snapshot was trained on.
    """
    datasets: dict[str, dict[str, dict[str, object]]] = {}
    for (dataset, barcode), label in sorted(result.labels.items()):
        entry = datasets.setdefault(dataset, {"labels": {}, "disagreement": {}, "votes": {}})
        entry["labels"][barcode] = label.label
        entry["disagreement"][barcode] = _disagreement(label)
        entry["votes"][barcode] = dict(label.votes)
    return {
        "batches": _batch_entries(batches),
        "project": project_id,
        "label_version": label_version,
        "consensus": rule,
        "classes": [{"name": name, "color": color} for name, color in classes],
        "n_labelled_spots": len(result.labels),
        "datasets": datasets,
    }


def render_snapshot(
    project_id: str,
    label_version: int,
    rule: str,
    classes: Sequence[tuple[str, str]],
    datasets: Mapping[str, tuple[Sequence[str], Sequence[str], Sequence[str]]],
    n_labelled: int,
    batches: Sequence[tuple[int, str]] = (),
) -> bytes:
    """Canonical bytes of a snapshot from pre-rendered, barcode-sorted per-spot JSON members.

    ``datasets`` maps each dataset to its ``"barcode":label``, ``"barcode":disagreement``
    and ``"barcode":{annotator: label}`` members; the result equals :func:`snapshot_bytes`
    of :func:`snapshot_document`.
    """
    parts = []
    for dataset in sorted(datasets):
        labels, disagreement, votes = datasets[dataset]
        parts.append(
            f'{_dumps(dataset)}:{{"disagreement":{{{",".join(disagreement)}}},'
            f'"labels":{{{",".join(labels)}}},"votes":{{{",".join(votes)}}}}}'
        )
    text = (
        f'{{"batches":{_dumps(_batch_entries(batches))},'
        f'"classes":{_dumps([{"name": n, "color": c} for n, c in classes])},'
        f'"consensus":{_dumps(rule)},"datasets":{{{",".join(parts)}}},'
        f'"label_version":{label_version},"n_labelled_spots":{n_labelled},"project":{_dumps(project_id)}}}'
    )
    return text.encode("utf-8")


class SnapshotSource(Protocol):
    """What the builder reads (the repository)."""

    def consensus_rule(self, project_id: str) -> str:
        """The project's consensus rule."""

    def snapshot_inputs(
        self, project_id: str, after_version: int, up_to_version: int
    ) -> tuple[list[Vote], list[tuple[str, str]]]:
        """Label events with ``after_version < label_version <= up_to_version`` (commit order),
        and ``(name, colour)`` of the class schema at ``up_to_version`` (one transaction)."""

    def snapshot_batches(
        self, project_id: str, after_version: int, up_to_version: int
    ) -> list[tuple[int, str]]:
        """``(label_version, batch_id)`` of the batches in that version range, in commit order."""


class _Dataset:
    """Sorted barcodes with their rendered JSON members, and how many spots each class labels."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.labels: list[str] = []
        self.disagreement: list[str] = []
        self.votes: list[str] = []
        self.classes: list[str] = []
        self.counts: Counter[str] = Counter()
        """class → spots with that consensus label (classes with none are dropped)."""

    def put(self, barcode: str, label: ConsensusLabel) -> None:
        key = _dumps(barcode)
        members = (
            f"{key}:{_dumps(label.label)}",
            f"{key}:{_dumps(_disagreement(label))}",
            f"{key}:{_dumps(dict(label.votes))}",
        )
        i = bisect.bisect_left(self.order, barcode)
        if i < len(self.order) and self.order[i] == barcode:
            self.labels[i], self.disagreement[i], self.votes[i] = members
            old = self.classes[i]
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]
            self.classes[i] = label.label
        else:
            self.order.insert(i, barcode)
            self.labels.insert(i, members[0])
            self.disagreement.insert(i, members[1])
            self.votes.insert(i, members[2])
            self.classes.insert(i, label.label)
        self.counts[label.label] += 1


class _Project:
    def __init__(self, rule: str) -> None:
        self.version = 0
        self.consensus = IncrementalConsensus(rule)
        self.datasets: dict[str, _Dataset] = {}
        self.n_labelled = 0
        self.batches: list[tuple[int, str]] = []

    def apply(self, changed: Mapping[Item, ConsensusLabel]) -> None:
        for item, label in changed.items():
            dataset, barcode = cast(tuple[str, str], item)
            self.datasets.setdefault(dataset, _Dataset()).put(barcode, label)
        self.n_labelled = sum(len(d.order) for d in self.datasets.values())


class SnapshotBuilder:
    """Builds snapshots version by version, incrementally per project."""

    def __init__(self, source: SnapshotSource, *, max_projects: int = 64) -> None:
        self._source = source
        self._max = max_projects
        self._projects: dict[str, _Project] = {}
        self._lock = threading.Lock()

    def build(self, project_id: str, label_version: int) -> tuple[bytes, int]:
        """The snapshot bytes of ``project_id`` at ``label_version`` and its labelled-spot count."""
        with self._lock:
            state, classes = self._advance(project_id, label_version)
            datasets = {
                name: (d.labels, d.disagreement, d.votes) for name, d in state.datasets.items()
            }
            data = render_snapshot(
                project_id,
                label_version,
                state.consensus.rule,
                classes,
                datasets,
                state.n_labelled,
                [b for b in state.batches if b[0] <= label_version],
            )
            return data, state.n_labelled

    def trainable_classes(
        self, project_id: str, label_version: int, datasets: Iterable[str]
    ) -> set[str]:
        """The classes labelled in ``datasets`` at ``label_version`` (see
        :func:`histoloop.labelsets.trainable_classes`); after :meth:`build` of that version
        it reads nothing and takes time in proportion to the classes, not the labels."""
        with self._lock:
            state = self._projects.get(project_id)
            if state is None or state.version != label_version:
                state, _ = self._advance(project_id, label_version)
            return trainable_classes(
                {name: d.counts for name, d in state.datasets.items()}, datasets
            )

    def _advance(
        self, project_id: str, label_version: int
    ) -> tuple[_Project, list[tuple[str, str]]]:
        """The project's state at ``label_version`` (from its state in memory when not past it)
        and its class schema then; the caller holds the lock."""
        state = self._projects.get(project_id)
        if state is None or state.version > label_version:
            if len(self._projects) >= self._max:
                self._projects.clear()
            state = self._projects[project_id] = _Project(self._source.consensus_rule(project_id))
        votes, classes = self._source.snapshot_inputs(project_id, state.version, label_version)
        if label_version > state.version:
            state.batches += self._source.snapshot_batches(project_id, state.version, label_version)
            state.consensus.add(votes)
            state.apply(state.consensus.refresh())
            state.version = label_version
        return state, classes
