"""What a service is given at start (:class:`Runtime`) and what it hands back (:class:`ServiceParts`).

Every ``services/<name>/service.py`` exposes ``build(runtime) -> ServiceParts``. The
server scaffold (:mod:`histoloop.server`) registers the servicer on the one gRPC server,
runs the event handlers in a consumer group named after the service, probes ``checks``
for the health service and starts/stops the background loops — the same for
``histoloop serve`` (all six in one process) and ``histoloop run <service>``.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from google.protobuf.message import Message

from histoloop.artifacts.base import ArtifactStore
from histoloop.bus.base import EventBus, Record
from histoloop.config import Settings

__all__ = [
    "EDGE_SERVICE_NAMES",
    "SERVICE_NAMES",
    "Background",
    "Handler",
    "Runtime",
    "ServiceParts",
    "settle_heap",
]

SERVICE_NAMES = ("annotation_store", "tiling", "embedding", "training", "prediction", "acquisition")
EDGE_SERVICE_NAMES = ("simulation",)
"""Deployables at the edge: clients of the six, served by ``histoloop serve`` too."""

Handler = Callable[[Message, Record], None]
"""An event handler: the decoded event and its record. Raising means "retry later"."""


class Background(Protocol):
    """A loop a service runs beside its servicer (an outbox relay, a training queue)."""

    def start(self) -> None:
        """Start the loop in its own thread."""

    def stop(self, timeout: float) -> None:
        """Ask the loop to finish its current step and join it; safe to call twice."""


@dataclass
class Runtime:
    """Shared, already-connected dependencies handed to every service."""

    settings: Settings
    bus: EventBus
    store: ArtifactStore
    stopping: threading.Event = field(default_factory=threading.Event)
    """Set when shutdown begins; long loops check it between steps."""


@dataclass
class ServiceParts:
    """One service as the scaffold runs it."""

    name: str
    """Short name (``training``); also the consumer group and the metrics label."""
    grpc_service: str
    """Full gRPC service name (``histoloop.v1.TrainingService``), for health and reflection."""
    register: Callable[[grpc.Server], None]
    handlers: Mapping[str, Handler] = field(default_factory=dict)
    """Topic → handler, run by one event worker in consumer group ``name``."""
    coalesce: Sequence[str] = ()
    """Topics where, of several events for one project in a poll batch, only the newest is handled."""
    checks: Sequence[Callable[[], None]] = ()
    """Dependency probes; each raises :class:`histoloop.errors.Unavailable` when down."""
    background: Sequence[Background] = ()
    close: Callable[[], None] = lambda: None


def settle_heap() -> None:
    """Take what a serving process holds after start-up out of the garbage collector's sight.

    Modules, functions and classes of the loaded libraries (about 180,000 tracked objects with
    torch and scikit-learn) live as long as the process, yet every full collection scans them:
    0.16 s during which nothing is served (a warm Deep Zoom tile takes about 1 ms). After
    :func:`gc.freeze` a full collection scans only what was allocated since
    (benchmarks/README.md, "Warm tiles"). For processes that serve until stopped, called once
    they are started; never in a library call (frozen garbage cycles would never be freed).
    """
    gc.collect()
    gc.freeze()
