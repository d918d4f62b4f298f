"""The ``histoloop`` command: tile, health, and clear errors with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from histoloop.artifacts.local import LocalArtifactStore
from histoloop.cli import main
from histoloop.config import load_settings
from histoloop.server import Server


def test_tile_a_real_slide(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slide = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    assert main(["tile", str(slide), "--out", str(tmp_path), "--mpp", "1.0", "--workers", "1"]) == 0
    store = LocalArtifactStore(tmp_path)
    keys = {i.key for i in store.list("tiles/")}
    assert {"tiles/manifest.json", "tiles/index.csv", "tiles/overlay.png"} <= keys
    assert store.get("tiles/overlay.png").startswith(b"\x89PNG")
    assert "patches" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tile", str(tmp_path / "missing.svs"), "--out", str(tmp_path)]) == 2
    assert "missing.svs" in capsys.readouterr().err
    assert main(["run", "no-such-service"]) == 2
    assert "unknown service" in capsys.readouterr().err


def test_health_probe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = Server(load_settings(data_dir=tmp_path, grpc_port=0, metrics_port=0), ["acquisition"])
    server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        assert (
            main(["health", "--address", address, "--service", "histoloop.v1.AcquisitionService"])
            == 0
        )
        assert "SERVING" in capsys.readouterr().out
        assert (
            main(["health", "--address", address, "--service", "histoloop.v1.NoSuchService"]) == 1
        )
    finally:
        server.stop(1)
