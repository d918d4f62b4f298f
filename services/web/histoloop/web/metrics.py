"""Prometheus metrics of the browser workspace, served on its own ``/metrics``.

``histoloop run web`` has no gRPC server and so no metrics port; the workspace exposes the
default registry on its HTTP port instead (in ``histoloop serve`` the same registry is
also on the services' metrics port).
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "EVENT_STREAMS",
    "IN_FLIGHT",
    "REQUESTS",
    "REQUEST_SECONDS",
    "TILES",
    "RequestMetrics",
    "metrics_endpoint",
]

REQUESTS = Counter(
    "histoloop_web_requests_total",
    "Workspace HTTP requests, by route and status.",
    ["route", "status"],
)
REQUEST_SECONDS = Histogram(
    "histoloop_web_request_seconds",
    "Workspace HTTP request time, by route.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TILES = Counter(
    "histoloop_web_tiles_total", "Deep Zoom tiles served, by where they came from.", ["source"]
)
EVENT_STREAMS = Gauge(
    "histoloop_web_event_streams", "Open live-update (server-sent event) streams."
)
IN_FLIGHT = Gauge(
    "histoloop_web_requests_in_flight",
    "Workspace HTTP requests being handled (not counting live-update streams and /metrics).",
)


class RequestMetrics:
    """Counts and times every HTTP request by its route template (pure ASGI)."""

    def __init__(self, app: ASGIApp) -> None:
        """Wrap ``app``."""
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one request, recording its route, status and duration."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        counted = not scope["path"].endswith("/events") and scope["path"] != "/metrics"
        if counted:
            IN_FLIGHT.inc()

        async def recorded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        finally:
            if counted:
                IN_FLIGHT.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(route, str(status)).inc()
            if not route.endswith("/events"):
                REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics`` in the Prometheus text format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
