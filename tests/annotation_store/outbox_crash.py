"""A store process for the outbox crash test (run as a script by test_outbox.py).

``commit``: commit one label batch (relay running with a kill hook), i.e. the store
process dies by SIGKILL at ``--kill-at`` (after the snapshot, before publishing; or after
publishing, before marking the row). ``relay``: a restarted store process that only runs
the relay once. Prints the batch result as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from histoloop.annotation_store.db import Database
from histoloop.annotation_store.domain import SpotLabelInput
from histoloop.annotation_store.outbox import OutboxRelay
from histoloop.annotation_store.repository import AnnotationRepository, OutboxRow
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.embedded import EmbeddedBus


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["commit", "relay"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--project", default="")
    parser.add_argument("--dataset", default="")
    parser.add_argument("--barcodes", default="")
    parser.add_argument("--kill-at", choices=["snapshot", "publish"], default=None)
    args = parser.parse_args()

    data = Path(args.data_dir)
    db = Database(args.url, pool_size=2)
    artifacts = LocalArtifactStore(data / "artifacts")
    bus = EmbeddedBus(data / "events.sqlite")
    repo = AnnotationRepository(db, artifacts)

    def die(row: OutboxRow) -> None:
        if row.topic == "labels.committed":
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # the store process is killed right here

    relay = OutboxRelay(
        repo,
        bus,
        artifacts,
        after_snapshot=die if args.kill_at == "snapshot" else None,
        after_publish=die if args.kill_at == "publish" else None,
    )
    if args.mode == "commit":
        batch = [
            SpotLabelInput(barcode=b, label="Layer1", row=f"labels[{i}]")
            for i, b in enumerate(args.barcodes.split(","))
        ]
        result = repo.submit_labels(
            args.project, args.dataset, "crash-batch", batch, annotator="alice"
        )
        print(
            json.dumps({"event_id": result.event_id, "label_version": result.label_version}),
            flush=True,
        )
    ok = relay.run_once()
    print(json.dumps({"relayed": relay.published, "ok": ok}), flush=True)
    bus.close()
    db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
