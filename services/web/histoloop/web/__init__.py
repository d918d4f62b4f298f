"""The browser workspace (``histoloop.web``): slide, overlay, labelling and live updates.

An ASGI app (:func:`create_app`) that is a client of the other services over gRPC, and the
HTTP server that runs it (:class:`WebServer`). See ``services/web/README.md``.
"""

from histoloop.web.app import create_app
from histoloop.web.server import WebServer, WorkspaceCompanion

__all__ = ["WebServer", "WorkspaceCompanion", "create_app"]
