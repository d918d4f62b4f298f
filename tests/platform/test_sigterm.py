"""SIGTERM to a real ``histoloop run training`` process mid-work: clean exit, no event lost.

The test and the process share the embedded backends (the event log and artifacts in one
data folder). Label snapshots and embeddings are written as the other services would; then
several ``labels.committed`` events are published, and SIGTERM arrives while the service is
training on them. After a restart every event has produced exactly one model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from histoloop import events
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.embedded import EmbeddedBus
from histoloop.datasets import write_anndata
from histoloop.models import list_cards
from histoloop.v1 import common_pb2, events_pb2

PROJECTS = [f"sig-{i}" for i in range(4)]
CLASSES = ["a", "b", "c"]


def _prepare(data: Path) -> None:
    store = LocalArtifactStore(data / "artifacts")
    bus = EmbeddedBus(data / "events.sqlite")
    rng = np.random.default_rng(0)
    n = 3000
    rows, cols = np.divmod(np.arange(n), 60)
    centers = rng.normal(size=(3, 64)) * 3
    y = rng.integers(0, 3, n)
    obs = pd.DataFrame(
        {"array_row": rows, "array_col": cols * 2 + rows % 2}, index=[f"s{i}" for i in range(n)]
    )
    adata = ad.AnnData(
        obs=obs, obsm={"X_expr": (centers[y] + rng.normal(size=(n, 64))).astype(np.float32)}
    )
    for project in PROJECTS:
        uri = write_anndata(store, f"embeddings/{project}/d1/e.h5ad", adata)
        labelled = rng.choice(n, 600, replace=False)
        doc = (
            '{"classes":['
            + ",".join(f'{{"color":"","name":"{c}"}}' for c in CLASSES)
            + '],"consensus":"majority","datasets":{"d1":{"disagreement":{},"labels":{'
            + ",".join(f'"s{i}":"{CLASSES[y[i]]}"' for i in labelled)
            + '}}},"label_version":1,"n_labelled_spots":600,"project":"'
            + project
            + '"}'
        )
        store.put(f"labels/{project}/v1.json", doc.encode())
        events.publish(
            bus,
            events_pb2.LabelsCommitted(
                meta=events.new_meta(project=project, producer="test"),
                batch_id="b1",
                label_version=1,
                labels_uri=store.uri(f"labels/{project}/v1.json"),
                embeddings_uris=[uri],
                classes=CLASSES,
                config=common_pb2.LoopConfig(
                    head="mlp", features=common_pb2.FEATURE_SET_EXPRESSION
                ),
            ),
        )
    bus.close()


def _start(data: Path, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "HISTOLOOP_DATA_DIR": str(data),
        "HISTOLOOP_GRPC_PORT": "0",
        "HISTOLOOP_METRICS_PORT": "0",
        "HISTOLOOP_GRACE_SECONDS": "30",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "histoloop.cli", "run", "training"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
    )


def _models(data: Path) -> dict[str, int]:
    store = LocalArtifactStore(data / "artifacts")
    return {p: len(list_cards(store, p)) for p in PROJECTS}


@pytest.mark.timeout(300)
def test_sigterm_mid_training_exits_cleanly_and_loses_nothing(tmp_path: Path) -> None:
    _prepare(tmp_path)
    log = tmp_path / "training.log"
    proc = _start(tmp_path, log)
    deadline = time.monotonic() + 120
    while sum(_models(tmp_path).values()) == 0:  # wait until it is busy with the events
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert "shutting down" in log.read_text()
    done_before_restart = _models(tmp_path)
    assert all(v <= 1 for v in done_before_restart.values())

    proc = _start(tmp_path, log)
    try:
        deadline = time.monotonic() + 120
        while min(_models(tmp_path).values()) == 0:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"not every event handled: {_models(tmp_path)}"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    assert _models(tmp_path) == dict.fromkeys(PROJECTS, 1), "an event was lost or handled twice"
    bus = EmbeddedBus(tmp_path / "events.sqlite")
    assert bus.consumer("training", [events.LABELS_COMMITTED]).lag() == {events.LABELS_COMMITTED: 0}
    produced = bus.consumer("check", [events.MODEL_TRAINED]).poll(1.0)
    ids = {(r.key, r.event_id) for r in produced}  # a redelivered run republishes the same event id
    assert sorted(key for key, _ in ids) == PROJECTS, "one model.trained event per project"
