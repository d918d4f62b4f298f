"""Fixtures of the end-to-end tier: one distributed stack (six service processes) per session.

The stack (``tests/e2e/stack.py``) runs with mutual TLS and bearer tokens, exactly as a
core facility would configure it. Tests that break something (kill a service, cut it off
from S3 or Triton, pause the broker) restore it before they end, so the tests share one
stack. When a test fails, the tail of every service's log is attached to its report.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import Stack, start_stack
from tests.tiling.visium_fake import make_visium

_STACKS: list[Stack] = []


@pytest.fixture(scope="session")
def slide(shared_data: Path) -> Path:
    """The real slide the Visium-like grid lies on."""
    return shared_data / "wsi" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def visium(tmp_path_factory: pytest.TempPathFactory, slide: Path) -> Path:
    """A Space Ranger ``spatial/`` folder: a 100 µm spot grid on the CMU slide (71 in tissue)."""
    return make_visium(slide, tmp_path_factory.mktemp("visium"))


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Kafka (mock), S3 (moto), PostgreSQL, Triton and the six services as processes."""
    with start_stack(tmp_path_factory.mktemp("stack")) as running:
        _STACKS.append(running)
        try:
            yield running
        finally:
            _STACKS.remove(running)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and _STACKS:
        for name, text in _STACKS[-1].logs().items():
            tail = "\n".join(text.splitlines()[-80:])
            report.sections.append((f"service log: {name} (last 80 lines)", tail))
