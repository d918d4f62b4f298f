"""Sign-in sessions of the browser workspace.

An annotator signs in with the bearer token the annotation store issued them
(``RegisterAnnotator``); the workspace checks it by calling the store with it, then keeps
it server-side under a random session id that travels only as an ``HttpOnly``,
``SameSite=Strict`` cookie. Every later request acts with that token, so the store decides
what each annotator may read and write. A forged id is unknown; an expired one is refused.
Sessions live in this process: replicas behind a load balancer need sticky sessions.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

from histoloop.errors import Unauthenticated

__all__ = ["COOKIE", "Session", "SessionStore"]

COOKIE = "histoloop_session"


@dataclass
class Session:
    """One signed-in browser."""

    token: str
    """The annotator's bearer token ("" in embedded mode: the local admin)."""
    subject: str
    read_only: bool
    expires: float
    projects: set[str] = field(default_factory=set)
    """Projects the store has confirmed this token may open."""


class SessionStore:
    """Session id → :class:`Session`, with expiry."""

    def __init__(self, lifetime_seconds: float) -> None:
        """Sessions last ``lifetime_seconds`` from sign-in."""
        self.lifetime = lifetime_seconds
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(
        self, token: str, subject: str, *, read_only: bool, projects: set[str]
    ) -> tuple[str, Session]:
        """A new session id and its session."""
        sid = secrets.token_urlsafe(32)
        session = Session(
            token=token,
            subject=subject,
            read_only=read_only,
            expires=time.time() + self.lifetime,
            projects=set(projects),
        )
        with self._lock:
            now = time.time()
            for old in [k for k, v in self._sessions.items() if v.expires < now]:
                del self._sessions[old]
            self._sessions[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session:
        """The live session of ``sid``.

        Raises:
            Unauthenticated: no cookie, an unknown (forged) id, or an expired session.
        """
        if not sid:
            raise Unauthenticated("not signed in: sign in with your annotator token")
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                raise Unauthenticated("unknown session: sign in again")
            if session.expires < time.time():
                del self._sessions[sid]
                raise Unauthenticated("session expired: sign in again")
            return session

    def expire(self, sid: str) -> None:
        """Make a session's time run out now (sign-out, tests)."""
        with self._lock:
            if sid in self._sessions:
                self._sessions[sid].expires = 0.0

    def drop(self, sid: str | None) -> None:
        """Forget a session (sign-out)."""
        with self._lock:
            self._sessions.pop(sid or "", None)
