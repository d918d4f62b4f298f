"""The browser workspace as its own process (``histoloop run web``) over the distributed stack.

It reaches the annotation store and the training service over mutual TLS, reads the slide
from S3, and acts with an annotator's token: sign in, the overlay and Deep Zoom tiles of a
real slide, labels sent from the page's endpoint, the next query set on its event stream.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx

from histoloop.v1 import annotation_store_pb2 as pb
from tests.e2e.loop import ProjectLoop
from tests.e2e.stack import HISTOLOOP, Stack
from tests.fixtures.s3 import free_port


def test_workspace_process_over_the_distributed_stack(
    stack: Stack, visium: Path, slide: Path, tmp_path: Path
) -> None:
    loop = ProjectLoop(stack, visium, slide, project_id="e2e-web", query_size=8)
    query_set = loop.start()
    token = (
        stack.store_stub()
        .RegisterAnnotator(
            pb.RegisterAnnotatorRequest(
                annotator_id="e2e-web-annotator",
                role=pb.ANNOTATOR_ROLE_ANNOTATOR,
                projects=[loop.project_id],
            ),
            timeout=30,
        )
        .token
    )
    port = free_port()
    store = stack.services["annotation_store"]
    env = {k: v for k, v in store.env.items() if k != "HISTOLOOP_DATABASE_URL"}
    env.update(
        HISTOLOOP_WEB_PORT=str(port),
        HISTOLOOP_WEB_STORE_ADDRESS=store.address,
        HISTOLOOP_WEB_TRAINING_ADDRESS=stack.services["training"].address,
        HISTOLOOP_DATA_DIR=str(tmp_path / "web"),
    )
    log = open(tmp_path / "web.log", "wb")
    proc = subprocess.Popen(
        [str(HISTOLOOP), "run", "web"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=3).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "web.log"
            ).read_text()
            time.sleep(0.5)
        with httpx.Client(base_url=base, timeout=60) as client:
            assert client.get(f"/api/projects/{loop.project_id}").status_code == 401
            assert client.post(
                "/api/session", json={"token": token, "project": loop.project_id}
            ).json() == {"subject": "e2e-web-annotator", "read_only": False}
            layer = client.get(f"/api/projects/{loop.project_id}/datasets/cmu/layer")
            assert layer.status_code == 200 and int(layer.headers["x-units"]) == len(loop.truth)
            described = client.get(
                f"/api/projects/{loop.project_id}/datasets/cmu/slide.json"
            ).json()
            assert (described["width"], described["height"]) == (2220, 2967)
            tile = client.get(
                f"/api/projects/{loop.project_id}/datasets/cmu/slide_files/12/1_1.jpeg"
            )
            assert tile.status_code == 200 and tile.content[:2] == b"\xff\xd8"
            labels = [{"unit": s.barcode, "label": loop.truth[s.barcode]} for s in query_set.spots]
            with client.stream(
                "GET", f"/api/projects/{loop.project_id}/events", timeout=180
            ) as events:
                sent = client.post(
                    f"/api/projects/{loop.project_id}/datasets/cmu/labels",
                    json={"labels": labels, "queryset_id": query_set.queryset_id},
                )
                assert sent.status_code == 200 and sent.json()["n_labels"] == len(labels)
                arrived = False
                for line in events.iter_lines():
                    if line.startswith("data:") and '"round": 1' in line:
                        arrived = True
                        break
            assert arrived
            status = client.get(f"/api/projects/{loop.project_id}/status").json()
            assert int(status["label_version"]) == 1  # uint64: a JSON string
            assert client.get(f"/api/projects/{loop.project_id}/models").json()["models"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        loop.close()
