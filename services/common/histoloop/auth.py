"""Caller identity for every RPC: bearer tokens in gRPC metadata.

The server interceptor reads ``authorization: Bearer <token>``, asks the resolvers in turn
(the service/admin tokens from settings; the annotation store adds one backed by its table
of hashed annotator tokens) and sets :func:`current_identity` for the servicer. With
``auth=off`` (the embedded default) every caller is the single local admin user.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from histoloop.errors import PermissionDenied, Unauthenticated

__all__ = [
    "LOCAL_ADMIN",
    "Identity",
    "Role",
    "TokenResolver",
    "current_identity",
    "hash_token",
    "require_project",
    "settings_resolver",
    "use_identity",
]

Role = Literal["annotator", "expert", "admin", "service"]


@dataclass(frozen=True)
class Identity:
    """Who is calling."""

    subject: str
    role: Role
    projects: frozenset[str] | None = None
    """Projects the caller is a member of; None means every project (admin, service)."""

    def may_access(self, project: str) -> bool:
        """Whether this caller may read or write ``project``."""
        return self.projects is None or project in self.projects


LOCAL_ADMIN = Identity(subject="local", role="admin")
TokenResolver = Callable[[str], Identity | None]
"""Maps a bearer token to an identity, or None if this resolver does not know it."""

_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "histoloop_identity", default=None
)


def hash_token(token: str) -> str:
    """The stored form of a token (SHA-256 hex; tokens are random, so no salt is needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def settings_resolver(service_token: str | None, admin_token: str | None) -> TokenResolver:
    """Resolver for the service-to-service and admin tokens from settings (constant-time compare)."""

    def resolve(token: str) -> Identity | None:
        if service_token and hmac.compare_digest(token, service_token):
            return Identity(subject="service", role="service")
        if admin_token and hmac.compare_digest(token, admin_token):
            return Identity(subject="admin", role="admin")
        return None

    return resolve


def use_identity(identity: Identity) -> contextvars.Token[Identity | None]:
    """Set the caller for the current context (the interceptor does this per RPC)."""
    return _current.set(identity)


def current_identity() -> Identity:
    """The caller of the RPC being served.

    Raises:
        Unauthenticated: no identity was established.
    """
    identity = _current.get()
    if identity is None:
        raise Unauthenticated("no caller identity: send 'authorization: Bearer <token>'")
    return identity


def require_project(project: str) -> Identity:
    """The caller, if they may access ``project``; else :class:`PermissionDenied`."""
    identity = current_identity()
    if not identity.may_access(project):
        raise PermissionDenied(f"{identity.subject} is not a member of project {project!r}")
    return identity
