"""A model card lists every label batch it was trained on, coalesced batches included."""

from __future__ import annotations

import json
from pathlib import Path

from histoloop import events
from histoloop.models import list_cards
from histoloop.v1 import events_pb2
from tests.learning.test_training_step import _setup


def _at_version(
    step, msg: events_pb2.LabelsCommitted, version: int, batches: list[str]
) -> events_pb2.LabelsCommitted:
    doc = json.loads(step.store.get("labels/p/v1.json"))
    doc["label_version"] = version
    doc["batches"] = [{"batch_id": b, "label_version": i} for i, b in enumerate(batches, start=1)]
    key = f"labels/p/v{version}.json"
    step.store.put(key, json.dumps(doc).encode())
    out = events_pb2.LabelsCommitted()
    out.CopyFrom(msg)
    out.meta.CopyFrom(events.new_meta(project="p", producer="test"))
    out.label_version, out.batch_id, out.labels_uri = version, batches[-1], step.store.uri(key)
    return out


def test_card_lists_coalesced_batches(tmp_path: Path) -> None:
    step, _bus, msg = _setup(tmp_path, ["neg", "pos"])
    # batches 1–3 arrived while training was busy: only the newest event is trained on
    step.on_labels(_at_version(step, msg, 3, ["a", "b", "c"]))
    ((_, card),) = list_cards(step.store, "p")
    assert list(card.label_batch_ids) == ["a", "b", "c"]
    assert card.extra["new_label_batch_ids"] == ["a", "b", "c"]
    step.on_labels(_at_version(step, msg, 4, ["a", "b", "c", "d"]))
    newest = max((c for _, c in list_cards(step.store, "p")), key=lambda c: c.label_version)
    assert list(newest.label_batch_ids) == ["a", "b", "c", "d"]
    assert newest.extra["new_label_batch_ids"] == ["d"]


def test_old_snapshots_without_batches_fall_back_to_the_event(tmp_path: Path) -> None:
    step, _bus, msg = _setup(tmp_path, ["neg", "pos"])
    step.on_labels(msg)
    ((_, card),) = list_cards(step.store, "p")
    assert list(card.label_batch_ids) == ["b1"] and card.extra["new_label_batch_ids"] == ["b1"]
