"""The workspace's gRPC clients: the annotation store, the training and the prediction service.

The workspace has no business logic: every read and write is one RPC, made with the
signed-in annotator's token (token mode) or as the single local admin (embedded). RPC
errors become :class:`WebError` with the HTTP status that matches the gRPC code.
"""

from __future__ import annotations

from typing import Any

import grpc

from histoloop.channels import make_channel
from histoloop.config import Settings
from histoloop.errors import HistoloopError
from histoloop.v1 import annotation_store_pb2_grpc, prediction_pb2_grpc, training_pb2_grpc

__all__ = ["HTTP_STATUS", "Backends", "WebError", "http_status"]

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
_TIMEOUT = 30.0


class WebError(HistoloopError):
    """An error answered to the browser: an HTTP status and a message in plain words."""

    def __init__(self, status: int, message: str) -> None:
        """Create the error."""
        super().__init__(message)
        self.status = status
        self.message = message


def http_status(code: str) -> int:
    """The HTTP status for a gRPC status name (502 for anything unexpected)."""
    return HTTP_STATUS.get(code, 502)


def _local_address(settings: Settings) -> str:
    host = settings.grpc_host if settings.grpc_host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return f"{host}:{settings.grpc_port}"


class Backends:
    """Channels and stubs to the services the workspace calls."""

    def __init__(
        self,
        settings: Settings,
        *,
        store_address: str | None = None,
        training_address: str | None = None,
        prediction_address: str | None = None,
    ) -> None:
        """Open the channels (lazily connected).

        Args:
            settings: TLS and token settings; ``web_store_address``/``web_training_address``/
                ``web_prediction_address``.
            store_address: overrides the store's address (``histoloop serve`` passes its own port).
            training_address: overrides the training service's address.
            prediction_address: overrides the prediction service's address.
        """
        self.auth = settings.auth_mode == "token"
        store = store_address or settings.web_store_address or _local_address(settings)
        training = training_address or settings.web_training_address or store
        prediction = prediction_address or settings.web_prediction_address or store
        token = "" if self.auth else None  # token mode: each call carries the annotator's token
        self._channels = [make_channel(store, settings, token=token)]
        self.store = annotation_store_pb2_grpc.AnnotationStoreServiceStub(self._channels[0])
        # The training service knows only service and admin tokens (annotator tokens live in
        # the store), so model cards are read with the service token, after the store has
        # confirmed the annotator's membership of the project.
        self._channels.append(make_channel(training, settings))
        self.training = training_pb2_grpc.TrainingServiceStub(self._channels[-1])
        self._channels.append(
            make_channel(prediction, settings)
        )  # service token too, like training
        self.prediction = prediction_pb2_grpc.PredictionServiceStub(self._channels[-1])
        self.store_channel = self._channels[0]
        self.store_address = store

    def metadata(self, token: str) -> list[tuple[str, str]]:
        """Call metadata carrying an annotator's token (none in embedded mode)."""
        return [("authorization", f"Bearer {token}")] if token else []

    def call(self, method: Any, request: Any, token: str, *, timeout: float = _TIMEOUT) -> Any:
        """One unary RPC with the caller's token; gRPC errors become :class:`WebError`."""
        try:
            return method(request, metadata=self.metadata(token), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() is not None else "UNKNOWN"
            raise WebError(http_status(code), exc.details() or code) from None

    def close(self) -> None:
        """Close the channels."""
        for channel in self._channels:
            channel.close()
