"""Label snapshots: the consensus training labels of a project at one label version.

The annotation store writes one per committed batch (``labels.committed`` names its URI);
training and acquisition read it. A snapshot is reproducible: it holds exactly the labels
with a version ≤ ``label_version``, so replaying a round reads the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from histoloop.artifacts.base import ArtifactStore
from histoloop.errors import InvalidArgument

__all__ = ["LabelSnapshot", "read_snapshot", "snapshot_key"]

_FORMAT = "histoloop.labels/1"


def snapshot_key(project: str, label_version: int) -> str:
    """The artifact key of a project's snapshot at ``label_version``."""
    return f"labels/{project}/v{label_version:09d}.json"


@dataclass(frozen=True)
class LabelSnapshot:
    """Consensus labels per dataset and barcode, with per-spot annotator disagreement."""

    project: str
    label_version: int
    classes: Sequence[str]
    labels: Mapping[str, Mapping[str, str]]
    """dataset → barcode → class name (the training label by the project's consensus rule)."""
    disagreement: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """dataset → barcode → disagreement in [0, 1] (only spots with more than one rater)."""
    batch_ids: Sequence[str] = ()
    """Every label batch included, oldest first."""

    def to_json(self) -> bytes:
        """Canonical bytes (sorted keys) so equal snapshots are byte-equal."""
        return json.dumps({
            "format": _FORMAT,
            "project": self.project,
            "label_version": self.label_version,
            "classes": list(self.classes),
            "labels": {d: dict(sorted(m.items())) for d, m in sorted(self.labels.items())},
            "disagreement": {d: dict(sorted(m.items())) for d, m in sorted(self.disagreement.items())},
            "batch_ids": list(self.batch_ids),
        }, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LabelSnapshot:
        """Parse :meth:`to_json` output.

        Raises:
            InvalidArgument: not a label snapshot, or a label outside ``classes``.
        """
        raw = json.loads(data)
        if raw.get("format") != _FORMAT:
            raise InvalidArgument(f"not a label snapshot (format {raw.get('format')!r})")
        classes = list(raw["classes"])
        known = set(classes)
        for dataset, labels in raw["labels"].items():
            bad = sorted({v for v in labels.values() if v not in known})
            if bad:
                raise InvalidArgument(f"snapshot labels of dataset {dataset!r} use unknown classes {bad}")
        return cls(project=raw["project"], label_version=int(raw["label_version"]), classes=classes,
                   labels=raw["labels"], disagreement=raw.get("disagreement", {}),
                   batch_ids=list(raw.get("batch_ids", [])))

    @property
    def n_labelled(self) -> int:
        """Spots with a training label, over all datasets."""
        return sum(len(m) for m in self.labels.values())


def read_snapshot(store: ArtifactStore, uri: str) -> LabelSnapshot:
    """Load a snapshot by URI (checksum verified)."""
    return LabelSnapshot.from_json(store.get(store.key_from_uri(uri)))
