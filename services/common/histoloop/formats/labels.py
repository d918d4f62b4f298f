"""Consensus label snapshots: ``labels/<project>/v<label_version>.json``.

The annotation store writes one per committed label batch; training and acquisition read
it (:class:`LabelSnapshot`, :func:`read_snapshot`, defined in :mod:`histoloop.labelsets`).
Beside the consensus it carries each annotator's own label of every spot (``votes``).
"""

from __future__ import annotations

from histoloop.labelsets import LabelSnapshot, read_snapshot

__all__ = ["LABELS_ROOT", "LabelSnapshot", "read_snapshot", "snapshot_key"]

LABELS_ROOT = "labels"


def snapshot_key(project_id: str, label_version: int) -> str:
    """Artifact key of the consensus label snapshot of a project at a label version."""
    return f"{LABELS_ROOT}/{project_id}/v{label_version}.json"
