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
