"""A switchable TCP proxy: a test tool that makes a dependency unreachable on demand.

moto and the mock Kafka broker keep their state in memory, so stopping them loses it. A
proxy in front of a dependency lets a test cut one service off from it (every open
connection reset, new connections reset as soon as they are accepted) and reconnect it
later, while the dependency and its state stay up on the same address.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading

__all__ = ["TcpProxy"]

log = logging.getLogger(__name__)
_CHUNK = 256 * 1024


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), so the peer sees a failure at once, not an orderly EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream`` until switched off.

    Args:
        upstream: ``host:port`` to forward to.
        name: for logs and repr.
    """

    def __init__(self, upstream: str, *, name: str = "proxy") -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.name = name
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._enabled = threading.Event()
        self._enabled.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self.refused = 0
        """Connections reset while switched off (how often the cut-off service tried)."""
        self._thread = threading.Thread(target=self._accept_loop, name=f"proxy-{name}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``: what the proxied service is configured with."""
        return f"127.0.0.1:{self.port}"

    @property
    def enabled(self) -> bool:
        """Whether traffic flows."""
        return self._enabled.is_set()

    def __repr__(self) -> str:
        state = "on" if self.enabled else "off"
        return f"TcpProxy({self.name}: {self.address} -> {self.upstream[0]}:{self.upstream[1]}, {state})"

    def disable(self) -> None:
        """Cut the line: reset every open connection and each new one until :meth:`enable`."""
        self._enabled.clear()
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            _reset(conn)
        log.info("%r switched off (%d connections reset)", self, len(conns))

    def enable(self) -> None:
        """Let traffic flow again."""
        self._enabled.set()
        log.info("%r switched on", self)

    def close(self) -> None:
        """Stop listening and reset everything; safe to call twice."""
        self._closed.set()
        self.disable()
        with contextlib.suppress(OSError):
            self._listener.close()

    # plumbing ------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        self._listener.settimeout(0.2)
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._enabled.is_set():
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(src, dst), daemon=True, name=f"proxy-{self.name}-pump"
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                closing = src in self._open and dst not in self._open
                self._open.discard(src)
            if closing:  # both directions are done
                src.close()
                dst.close()
