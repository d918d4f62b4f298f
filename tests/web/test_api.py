"""Every endpoint of the workspace over real HTTP, against the real stack, good and bad input."""

from __future__ import annotations

import struct
import time

import httpx
import pytest

from histoloop.v1 import annotation_store_pb2 as pb
from tests.web.conftest import DATASET, LAYERS, OTHER, PROJECT, WSI_PROJECT, Stack


def _client(
    stack: Stack, who: str | None = "ann-a", project: str = PROJECT, **extra: object
) -> httpx.Client:
    client = httpx.Client(base_url=stack.url, timeout=60)
    if who is not None:
        reply = client.post(
            "/api/session", json={"token": stack.tokens[who], "project": project, **extra}
        )
        assert reply.status_code == 200, reply.text
    return client


def _layer(content: bytes) -> dict:
    import json

    assert content[:4] == b"HLU1"
    (length,) = struct.unpack("<I", content[4:8])
    return json.loads(content[8 : 8 + length])


@pytest.fixture(scope="module")
def ann_a(stack: Stack) -> httpx.Client:
    return _client(stack)


def _label_version(stack: Stack, project: str = PROJECT) -> int:
    return stack.store.GetProject(
        pb.GetProjectRequest(project_id=project), metadata=stack.admin
    ).label_version


def test_health_page_and_static(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}
        page = client.get("/")
        assert page.status_code == 200 and "openseadragon.min.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        osd = client.get("/static/vendor/openseadragon/openseadragon.min.js")
        assert osd.status_code == 200 and b"OpenSeadragon" in osd.content[:2000]
        assert client.get("/static/app.js").status_code == 200
        metrics = client.get("/metrics").text
        assert 'histoloop_web_requests_total{route="/healthz",status="200"}' in metrics
        # every request above has ended: none stays counted (other tests' pages may still be finishing theirs)
        deadline = time.monotonic() + 60
        while "histoloop_web_requests_in_flight 0.0" not in metrics and time.monotonic() < deadline:
            time.sleep(0.2)
            metrics = client.get("/metrics").text
        assert "histoloop_web_requests_in_flight 0.0" in metrics


def test_sign_in_checks_the_token_with_the_store(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url) as client:
        assert client.get("/api/me").json() == {"auth": True, "signed_in": False}
        assert client.get(f"/api/projects/{PROJECT}").status_code == 401
        bad = client.post("/api/session", json={"token": "forged-token", "project": PROJECT})
        assert bad.status_code == 401 and "error" in bad.json()
        assert client.post("/api/session", json={"project": PROJECT}).status_code == 400
        assert client.post("/api/session", content=b"token=x").status_code == 415
        assert (
            client.post(
                "/api/session", json={"token": stack.tokens["other"], "project": PROJECT}
            ).status_code
            == 403
        )
        ok = client.post("/api/session", json={"token": stack.tokens["ann-b"], "project": PROJECT})
        assert ok.json() == {"subject": "ann-b", "read_only": False}
        assert (
            "httponly" in ok.headers["set-cookie"].lower()
            and "samesite=strict" in ok.headers["set-cookie"].lower()
        )
        assert client.get("/api/me").json()["subject"] == "ann-b"
        # a member of PROJECT only: another project is refused by the store
        assert client.get(f"/api/projects/{OTHER}").status_code == 403
        client.delete("/api/session")
        assert client.get(f"/api/projects/{PROJECT}").status_code == 401


def test_forged_and_expired_sessions_are_refused(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, cookies={"histoloop_session": "forged"}) as client:
        reply = client.get(f"/api/projects/{PROJECT}/status")
        assert reply.status_code == 401 and "unknown session" in reply.json()["error"]
    client = _client(stack, "ann-b")
    sid = client.cookies["histoloop_session"]
    stack.web.app.state.web.sessions.expire(sid)
    reply = client.get(f"/api/projects/{PROJECT}/status")
    assert reply.status_code == 401 and "expired" in reply.json()["error"]


def test_project_status_queryset_models_agreement(stack: Stack, ann_a: httpx.Client) -> None:
    project = ann_a.get(f"/api/projects/{PROJECT}").json()
    assert project["datasets"] == [DATASET] and project["classes"][0]["name"] == "Layer1"
    status = ann_a.get(f"/api/projects/{PROJECT}/status").json()
    assert status["round"] >= 0 and status["n_spots"] == 4634
    query_set = ann_a.get(f"/api/projects/{PROJECT}/queryset").json()
    assert len(query_set["spots"]) == 10
    models = ann_a.get(f"/api/projects/{PROJECT}/models").json()["models"]
    assert all({"model_version", "n_train", "n_val", "macro_f1"} <= m.keys() for m in models)
    assert (
        _client(stack, "other", project=OTHER).get(f"/api/projects/{PROJECT}/models").status_code
        == 403
    )
    assert (
        "fleiss_kappa" in ann_a.get(f"/api/projects/{PROJECT}/agreement?dataset={DATASET}").json()
    )
    assert ann_a.get(f"/api/projects/{PROJECT}/agreement?dataset=bad%20id").status_code == 400
    # an unknown project is one the annotator is no member of: the store answers 403, naming them
    reply = ann_a.get("/api/projects/nope/status")
    assert reply.status_code == 403 and "ann-a" in reply.json()["error"]


def test_layer_is_columnar_binary(stack: Stack, ann_a: httpx.Client) -> None:
    reply = ann_a.get(f"/api/projects/{PROJECT}/datasets/{DATASET}/layer")
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/octet-stream"
    header = _layer(reply.content)
    assert header["n"] == 4992 and header["classes"][:2] == ["Layer1", "Layer2"]
    assert header["coordinates"] == "fullres" and header["caller"] == "ann-a"
    assert 90 < header["size"] < 100  # spot_diameter_fullres 96.89
    assert {c["name"] for c in header["columns"]} >= {
        "ids",
        "x",
        "y",
        "consensus",
        "mine",
        "predicted",
        "uncertainty",
        "flags",
        "query_rank",
    }
    assert len(reply.content) < 200_000
    assert ann_a.get(f"/api/projects/{PROJECT}/datasets/nope/layer").status_code == 404


def test_deep_zoom_of_a_visium_image_and_a_wsi(stack: Stack, ann_a: httpx.Client) -> None:
    ds = f"/api/projects/{PROJECT}/datasets/{DATASET}"
    slide = ann_a.get(f"{ds}/slide.json").json()
    assert (slide["width"], slide["height"]) == (600, 600)
    assert slide["unit_scale"] == pytest.approx(0.045004502)
    assert slide["Image"]["Url"].endswith(f"{ds}/slide_files/")
    assert "<Image" in ann_a.get(f"{ds}/slide.dzi").text
    tile = ann_a.get(f"{ds}/slide_files/9/0_0.jpeg")
    assert tile.status_code == 200 and tile.content[:2] == b"\xff\xd8"
    etag = tile.headers["etag"]
    assert (
        ann_a.get(f"{ds}/slide_files/9/0_0.jpeg", headers={"If-None-Match": etag}).status_code
        == 304
    )
    assert ann_a.get(f"{ds}/slide_files/9/0_0.jpeg").content == tile.content  # from the cache
    metrics = ann_a.get("/metrics").text
    for source in ("rendered", "cache", "not_modified"):
        assert f'histoloop_web_tiles_total{{source="{source}"}}' in metrics
    for bad, code in (
        ("99/0_0.jpeg", 404),
        ("9/7_0.jpeg", 404),
        ("x/0_0.jpeg", 400),
        ("9/0_0.png", 404),
        ("9/../../etc_passwd.jpeg", 404),
    ):
        assert ann_a.get(f"{ds}/slide_files/{bad}").status_code == code, bad
    wsi = _client(stack, "ann-a", project=WSI_PROJECT)
    wds = f"/api/projects/{WSI_PROJECT}/datasets/cmu1"
    slide = wsi.get(f"{wds}/slide.json").json()
    assert (slide["width"], slide["height"]) == (2220, 2967) and slide["levels"] == 13
    tile = wsi.get(f"{wds}/slide_files/12/3_4.jpeg")
    assert tile.status_code == 200 and tile.content[:2] == b"\xff\xd8"
    # ann-b is no member of the WSI project: the store refuses, so does every tile
    assert _client(stack, "ann-b").get(f"{wds}/slide_files/12/3_4.jpeg").status_code == 403


def test_bad_label_batches_change_nothing(stack: Stack, ann_a: httpx.Client) -> None:
    url = f"/api/projects/{PROJECT}/datasets/{DATASET}/labels"
    before = _label_version(stack)
    other_unit = "AAAC-not-a-barcode-1"
    cases = [
        ({"labels": []}, 400, "labels"),
        ({"labels": [{"unit": "", "label": "Layer1"}]}, 400, "labels[0].unit"),
        ({"labels": [{"unit": "AAACAAGTATCTCCCA-1", "label": ""}]}, 400, "labels[0].label"),
        ({"labels": [{"unit": other_unit, "label": "Layer1"}]}, 400, other_unit),
        ({"labels": [{"unit": "AAACAAGTATCTCCCA-1", "label": "Layer9"}]}, 400, "Layer9"),
        (
            {"labels": [{"unit": f"u{i}", "label": "Layer1"} for i in range(501)]},
            413,
            "at most 500",
        ),
    ]
    for body, code, named in cases:
        reply = ann_a.post(url, json=body)
        assert reply.status_code == code, (body, reply.text)
        assert named in reply.json()["error"]
    assert (
        ann_a.post(
            url, content=b"not json", headers={"content-type": "application/json"}
        ).status_code
        == 400
    )
    # a unit of another project's dataset: that dataset is not in this project
    assert (
        ann_a.post(
            f"/api/projects/{OTHER}/datasets/{DATASET}/labels",
            json={"labels": [{"unit": "AAACAAGTATCTCCCA-1", "label": "Layer1"}]},
        ).status_code
        == 403
    )
    viewer = _client(stack, "viewer")
    assert viewer.get("/api/me").json()["read_only"] is True
    reply = viewer.post(url, json={"labels": [{"unit": "AAACAAGTATCTCCCA-1", "label": "Layer1"}]})
    assert reply.status_code == 403 and "read-only" in reply.json()["error"]
    assert _label_version(stack) == before


def test_send_then_export(stack: Stack) -> None:
    client = _client(stack, "ann-b")
    query_set = stack.store.GetQuerySet(
        pb.GetQuerySetRequest(project_id=PROJECT), metadata=stack.admin
    )
    spot = next(s.barcode for s in query_set.spots if s.barcode in stack.truth.index)
    reply = client.post(
        f"/api/projects/{PROJECT}/datasets/{DATASET}/labels",
        json={
            "labels": [{"unit": spot, "label": stack.truth[spot]}],
            "queryset_id": query_set.queryset_id,
            "batch_id": "web-test-export",
        },
    )
    assert reply.status_code == 200 and reply.json()["n_labels"] == 1
    header = _layer(client.get(f"/api/projects/{PROJECT}/datasets/{DATASET}/layer").content)
    assert header["caller"] == "ann-b"
    csv = client.get(f"/api/projects/{PROJECT}/datasets/{DATASET}/export?kind=labels")
    assert csv.status_code == 200 and "attachment" in csv.headers["content-disposition"]
    assert f"{spot},{stack.truth[spot]}" in csv.text
    assert (
        client.get(f"/api/projects/{PROJECT}/datasets/{DATASET}/export?kind=queryset").status_code
        == 200
    )
    assert (
        client.get(f"/api/projects/{PROJECT}/datasets/{DATASET}/export?kind=bogus").status_code
        == 400
    )
    geojson = client.get(
        f"/api/projects/{PROJECT}/datasets/{DATASET}/export?kind=labels&format=geojson"
    )
    assert geojson.status_code == 200 and geojson.headers["content-type"].startswith(
        "application/geo+json"
    )
    [feature] = [
        f
        for f in geojson.json()["features"]
        if f["properties"].get("name") == spot or f.get("id") == spot
    ]
    assert feature["properties"]["classification"]["name"] == stack.truth[spot]
    png = client.get(f"/api/projects/{PROJECT}/datasets/{DATASET}/export?kind=queryset&format=png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    bad = client.get(f"/api/projects/{PROJECT}/datasets/{DATASET}/export?kind=labels&format=xlsx")
    assert bad.status_code == 400 and "format" in bad.text


def test_events_stream_sends_the_next_query_set(stack: Stack) -> None:
    client = _client(stack, "ann-a")
    query_set = stack.store.GetQuerySet(
        pb.GetQuerySetRequest(project_id=PROJECT), metadata=stack.admin
    )
    labels = [
        {"unit": s.barcode, "label": stack.truth[s.barcode]}
        for s in query_set.spots
        if s.barcode in stack.truth.index
    ]
    with client.stream("GET", f"/api/projects/{PROJECT}/events", timeout=120) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        reply = client.post(
            f"/api/projects/{PROJECT}/datasets/{DATASET}/labels",
            json={"labels": labels, "queryset_id": query_set.queryset_id},
        )
        assert reply.status_code == 200
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: queryset"):
                event = line
            elif event and line.startswith("data:"):
                assert f'"round": {query_set.round + 1}' in line or '"round"' in line
                break
    assert event is not None


def test_region_proposal_of_a_clicked_unit(stack: Stack) -> None:
    client = _client(stack, "ann-a")
    url = f"/api/projects/{PROJECT}/datasets/{DATASET}/region"
    query_set = stack.store.GetQuerySet(
        pb.GetQuerySetRequest(project_id=PROJECT), metadata=stack.admin
    )
    unit = query_set.spots[0].barcode
    reply = client.get(url, params={"unit": unit})
    if reply.status_code == 409:  # alone, this test runs before the project's first model
        assert "no predictions yet" in reply.json()["error"]
        labels = [
            {"unit": s.barcode, "label": stack.truth[s.barcode]}
            for s in query_set.spots
            if s.barcode in stack.truth.index
        ]
        assert (
            client.post(
                f"/api/projects/{PROJECT}/datasets/{DATASET}/labels",
                json={"labels": labels, "queryset_id": query_set.queryset_id},
            ).status_code
            == 200
        )
        stack.wait_round(PROJECT, query_set.round)
        reply = client.get(url, params={"unit": unit})
    assert reply.status_code == 200, reply.text
    region = reply.json()
    assert region["units"][0] == unit and len(set(region["units"])) == len(region["units"])
    assert region["class_name"] in LAYERS and region["model_version"]
    missing = client.get(url, params={"unit": "no-such-spot"})
    assert missing.status_code == 404 and "unit" in missing.json()["error"]
    stranger = client.get(
        url, params={"unit": unit, "as": "no-such-annotator"}
    )  # ?as=: that annotator's model
    expected = (
        "annotator_id" if stranger.status_code == 404 else "per-annotator"
    )  # 409: one annotator so far
    assert stranger.status_code in (404, 409) and expected in stranger.json()["error"], (
        stranger.text
    )
    assert client.get(url).status_code == 400
    assert (
        client.get(
            f"/api/projects/{PROJECT}/datasets/nope/region", params={"unit": unit}
        ).status_code
        == 404
    )
    assert _client(stack, "other", project=OTHER).get(url, params={"unit": unit}).status_code == 403
