"""One error hierarchy for histoloop.

Every error a public entry point raises derives from :class:`HistoloopError`. Each
subclass names the gRPC status code the server interceptor maps it to, so domain code
never imports gRPC and servicers never translate errors by hand.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "ConfigError",
    "FailedPrecondition",
    "HistoloopError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
]


class HistoloopError(Exception):
    """Base of every histoloop error; ``code`` is the gRPC status name it maps to."""

    code = "INTERNAL"


class InvalidArgument(HistoloopError, ValueError):
    """The caller sent something malformed; the message names the field or row."""

    code = "INVALID_ARGUMENT"


class NotFound(HistoloopError, LookupError):
    """A named project, dataset, artifact, model or strategy does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(HistoloopError):
    """Creating something that exists already (immutable artifacts, project ids)."""

    code = "ALREADY_EXISTS"


class PermissionDenied(HistoloopError):
    """The caller is known but may not do this (e.g. another project's labels)."""

    code = "PERMISSION_DENIED"


class Unauthenticated(HistoloopError):
    """No or an unknown bearer token."""

    code = "UNAUTHENTICATED"


class FailedPrecondition(HistoloopError):
    """The system is not in a state that allows this yet (e.g. no model trained)."""

    code = "FAILED_PRECONDITION"


class Unavailable(HistoloopError):
    """A dependency (broker, artifact store, database, Triton) cannot be reached."""

    code = "UNAVAILABLE"


class ConfigError(HistoloopError):
    """Settings are missing or invalid; raised at start, naming the variable."""

    code = "FAILED_PRECONDITION"
