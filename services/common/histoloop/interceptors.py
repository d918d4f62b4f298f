"""One server interceptor: caller identity, domain errors → status codes, RPC metrics.

Domain code raises :mod:`histoloop.errors`; this maps each to its gRPC status with the
error's message (which names the bad field or row). Anything else is INTERNAL with the
cause logged — never leaked to the caller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc

from histoloop.auth import LOCAL_ADMIN, Identity, TokenResolver, use_identity
from histoloop.errors import HistoloopError, Unauthenticated
from histoloop.metrics import RPC_LATENCY, RPC_REQUESTS

__all__ = ["ServerInterceptor"]

log = logging.getLogger(__name__)

# probes must work without a token
_OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class ServerInterceptor(grpc.ServerInterceptor):
    """Wraps every RPC handler of the server."""

    def __init__(self, *, auth_required: bool, resolvers: Sequence[TokenResolver]) -> None:
        self._auth_required = auth_required
        self._resolvers = list(resolvers)

    def add_resolver(self, resolver: TokenResolver) -> None:
        """Add a token resolver (the annotation store adds its annotator tokens)."""
        self._resolvers.append(resolver)

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_OPEN_SERVICES):
            return handler
        service, _, name = method.rpartition("/")
        service = service.lstrip("/").rsplit(".", 1)[-1]
        metadata = dict(handler_call_details.invocation_metadata or ())
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, service, name, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, service, name, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client-streaming RPCs: none in histoloop's API

    def _identify(self, metadata: dict[str, Any]) -> Identity:
        if not self._auth_required:
            return LOCAL_ADMIN
        header = str(metadata.get("authorization", ""))
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        for resolve in self._resolvers:
            identity = resolve(token.strip())
            if identity is not None:
                return identity
        raise Unauthenticated("unknown or revoked token")

    @contextmanager
    def _guard(
        self, service: str, name: str, metadata: dict[str, Any], context: grpc.ServicerContext
    ) -> Iterator[None]:
        start = time.perf_counter()
        code = "OK"
        try:
            use_identity(self._identify(metadata))
            yield
        except HistoloopError as exc:
            code = exc.code
            context.abort(_status(exc.code), str(exc))
        except Exception as exc:
            code = _code_of(context, exc)
            if code == "INTERNAL":
                log.exception("%s/%s failed", service, name)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}; see server log")
            # the servicer set a status itself (abort, or the generated UNIMPLEMENTED stubs)
            context.abort(_status(code), _details(context) or f"{name}: {type(exc).__name__}")
        finally:
            RPC_REQUESTS.labels(service=service, method=name, code=code).inc()
            RPC_LATENCY.labels(service=service, method=name).observe(time.perf_counter() - start)

    def _wrap_unary(
        self, behavior: Callable[..., Any], service: str, name: str, metadata: dict[str, Any]
    ) -> Callable[..., Any]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            with self._guard(service, name, metadata, context):
                return behavior(request, context)

        return wrapper

    def _wrap_stream(
        self, behavior: Callable[..., Any], service: str, name: str, metadata: dict[str, Any]
    ) -> Callable[..., Any]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with self._guard(service, name, metadata, context):
                yield from behavior(request, context)

        return wrapper


def _status(code: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL)


def _code_of(context: grpc.ServicerContext, exc: Exception) -> str:
    """The code of an abort the servicer raised itself, else INTERNAL."""
    code = context.code() if hasattr(context, "code") else None
    if code is not None and code != grpc.StatusCode.OK:
        return code.name
    return "INTERNAL"


def _details(context: grpc.ServicerContext) -> str:
    details = context.details() if hasattr(context, "details") else None
    return details.decode() if isinstance(details, bytes) else (details or "")
