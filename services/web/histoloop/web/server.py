"""The workspace's HTTP server: uvicorn in a thread, started and stopped like a service loop.

``histoloop serve`` attaches one beside the gRPC server (same process, embedded backends);
``histoloop run web`` runs it alone as a client of the services named by
``HISTOLOOP_WEB_STORE_ADDRESS``/``HISTOLOOP_WEB_TRAINING_ADDRESS``/``HISTOLOOP_WEB_PREDICTION_ADDRESS``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import uvicorn

from histoloop.artifacts import make_store
from histoloop.config import Settings
from histoloop.errors import HistoloopError
from histoloop.runtime import settle_heap
from histoloop.web.app import create_app
from histoloop.web.backends import Backends

if TYPE_CHECKING:
    from histoloop.server import Server

__all__ = ["WebServer", "WorkspaceCompanion"]

log = logging.getLogger(__name__)
_START_TIMEOUT = 20.0


class WebServer:
    """The browser workspace on ``web_host:web_port``; :meth:`stop` is safe to call twice."""

    def __init__(
        self,
        settings: Settings,
        *,
        store_address: str | None = None,
        on_ready: Callable[[str], None] = lambda url: None,
    ) -> None:
        """Prepare the server (nothing is bound yet).

        Args:
            settings: ``web_*`` settings, TLS and token settings, the artifact store.
            store_address: the annotation store's gRPC address (default from settings).
            on_ready: called with the workspace URL once the port is bound.
        """
        self.settings = settings
        self.store = make_store(settings)
        self.backends = Backends(settings, store_address=store_address)
        self.app = create_app(settings, self.store, self.backends)
        self._on_ready = on_ready
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.port = 0

    @property
    def url(self) -> str:
        """The workspace's address."""
        host = (
            self.settings.web_host
            if self.settings.web_host not in ("0.0.0.0", "::")
            else "127.0.0.1"
        )
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        """Bind the port and serve in a thread; returns once it accepts connections.

        Raises:
            HistoloopError: the port cannot be bound.
        """
        config = uvicorn.Config(
            self.app,
            host=self.settings.web_host,
            port=self.settings.web_port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=2,
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise HistoloopError(
                    f"the workspace could not bind {self.settings.web_host}:{self.settings.web_port}"
                )
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        log.info(
            "browser workspace on %s (annotation store at %s)",
            self.url,
            self.backends.store_address,
        )
        self._on_ready(self.url)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving (open event streams end) and close the channels."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.backends.close()
        self.store.close()

    def serve_until_signal(self) -> None:
        """Run alone (``histoloop run web``) until SIGTERM or SIGINT."""
        import signal

        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        self.start()
        settle_heap()
        stop.wait()
        self.stop(self.settings.grace_seconds)


class WorkspaceCompanion:
    """The workspace beside a :class:`histoloop.server.Server` in the same process.

    Appended to ``server.companions``: started once the gRPC port is bound (so it knows
    the port), stopped before the gRPC server.
    """

    def __init__(
        self,
        server: Server,
        settings: Settings,
        *,
        on_ready: Callable[[str], None] = lambda url: None,
    ) -> None:
        """Serve the workspace for ``server``'s services with ``settings``."""
        self._server = server
        self._settings = settings
        self._on_ready = on_ready
        self.web: WebServer | None = None

    def start(self) -> None:
        """Start the HTTP server against the gRPC server's port."""
        self.web = WebServer(
            self._settings, store_address=f"127.0.0.1:{self._server.port}", on_ready=self._on_ready
        )
        self.web.start()

    def stop(self, timeout: float) -> None:
        """Stop the HTTP server; safe to call twice."""
        if self.web is not None:
            self.web.stop(timeout)
