"""gRPC client channels to histoloop services: plaintext or TLS, with the bearer token.

Every client (the CLI, a service calling another, tests, scripts) opens its channel with
:func:`make_channel`, so one set of settings decides how to reach a server:

* TLS when ``tls_ca`` or ``tls_cert`` is set: the server's certificate is verified against
  ``tls_ca`` (default: the system's roots) and, for mutual TLS, the client presents
  ``tls_cert``/``tls_key``;
* plaintext otherwise;
* every call carries ``authorization: Bearer <token>`` (the ``service_token`` unless a
  token is given). On TLS channels the token travels as call credentials; gRPC sends call
  credentials only over secure channels, so plaintext channels add the same header with a
  client interceptor, unless a call brings its own ``authorization`` metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from histoloop.config import Settings
from histoloop.errors import ConfigError

__all__ = ["channel_credentials", "make_channel"]

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """TLS channel credentials from the settings, or None for a plaintext channel.

    Raises:
        ConfigError: a file cannot be read, or only one of ``tls_cert``/``tls_key`` is set.
    """
    if settings.tls_ca is None and settings.tls_cert is None:
        return None
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError(
            "a TLS client certificate needs both HISTOLOOP_TLS_CERT and HISTOLOOP_TLS_KEY"
        )
    return grpc.ssl_channel_credentials(
        root_certificates=_read("HISTOLOOP_TLS_CA", settings.tls_ca),
        private_key=_read("HISTOLOOP_TLS_KEY", settings.tls_key),
        certificate_chain=_read("HISTOLOOP_TLS_CERT", settings.tls_cert),
    )


def make_channel(
    address: str,
    settings: Settings,
    *,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to ``address`` (``host:port``) as the settings say (TLS or plaintext).

    Args:
        address: the server, ``host:port``.
        settings: TLS files (``tls_ca``, ``tls_cert``, ``tls_key``) and ``service_token``.
        token: the bearer token for every call; default ``settings.service_token``; ``""``
            sends none.
        options: extra gRPC channel options.

    Raises:
        ConfigError: unreadable TLS files.
    """
    if token is None:
        token = settings.service_token.get_secret_value() if settings.service_token else ""
    opts = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        *options,
    ]
    credentials = channel_credentials(settings)
    if credentials is not None:
        if token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token)
            )
        return grpc.secure_channel(address, credentials, options=opts)
    channel = grpc.insecure_channel(address, options=opts)
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel


def _read(variable: str, path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None


class _Details(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _CallDetails(_Details, grpc.ClientCallDetails):
    """Call details with the token header added."""


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to calls on a plaintext channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or ())
        if any(key == "authorization" for key, _ in metadata):
            return details  # the caller chose a token for this call
        return _CallDetails(
            details.method,
            details.timeout,
            [*metadata, self._header],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return continuation(self._details(details), requests)
