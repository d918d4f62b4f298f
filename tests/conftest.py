"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public data set folder (``../shared/data`` beside the checkout)."""
    path = Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (path / "SOURCES.md").exists():
        pytest.fail(f"shared data not found at {path}; set HISTOLOOP_SHARED_DATA")
    return path


# -- tiers -------------------------------------------------------------------------------
# Every test is exactly one of unit (in-process, no server or outside dependency; `make
# test-unit`), integration (real PostgreSQL, Kafka protocol, S3, Triton, a gRPC server, a
# child process, deployment tools) or e2e (the services as processes). A module may mark
# itself; otherwise its folder, its name below, or its database backend decide.
TIERS = ("unit", "integration", "e2e")
_FOLDER_TIER = {"e2e": "e2e", "deploy": "integration", "loop": "integration"}
_INTEGRATION_MODULES = frozenset(
    {
        "annotation_store/test_grpc.py",
        "annotation_store/test_migrations.py",
        "annotation_store/test_outbox.py",
        "embedding/test_triton.py",
        "platform/test_artifact_contract.py",
        "platform/test_bus_contract.py",
        "platform/test_cli.py",
        "platform/test_server.py",
        "platform/test_sigterm.py",
        "simulation/test_rpc_cli.py",
    }
)


def _tier(item: pytest.Item) -> str:
    relative = Path(str(item.fspath)).resolve().relative_to(REPO / "tests")
    tier = _FOLDER_TIER.get(relative.parts[0], "unit")
    if relative.as_posix() in _INTEGRATION_MODULES:
        tier = "integration"
    callspec = getattr(item, "callspec", None)
    if tier == "unit" and callspec is not None and callspec.params.get("backend") == "postgres":
        tier = "integration"
    return tier


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its tier (unless its module marked it already)."""
    for item in items:
        if not any(item.get_closest_marker(name) for name in TIERS):
            item.add_marker(getattr(pytest.mark, _tier(item)))
