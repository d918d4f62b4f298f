"""Annotator tokens for the server's auth interceptor.

:class:`AnnotatorTokenResolver` is a :data:`histoloop.auth.TokenResolver`: it maps a bearer
token to the annotator's identity (role and project memberships) by the token's SHA-256,
with a short cache so that each RPC does not cost a database round trip. Registering an
annotator clears the cache, so new memberships apply at once in this process (within
``ttl`` seconds on other replicas).
"""

from __future__ import annotations

import threading
import time

from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.auth import Identity, hash_token

__all__ = ["AnnotatorTokenResolver"]


class AnnotatorTokenResolver:
    """Token → identity from the annotation store's table of hashed tokens."""

    def __init__(
        self, repo: AnnotationRepository, *, ttl: float = 5.0, max_entries: int = 10_000
    ) -> None:
        self._repo = repo
        self._ttl = ttl
        self._max = max_entries
        self._cache: dict[str, tuple[float, Identity | None]] = {}
        self._lock = threading.Lock()

    def __call__(self, token: str) -> Identity | None:
        """The annotator a token belongs to, or None if it is not an annotator token.

        Raises:
            Unavailable: the database cannot be reached.
        """
        key = hash_token(token)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        identity = self._repo.resolve_token(token)
        with self._lock:
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[key] = (now + self._ttl, identity)
        return identity

    def clear(self) -> None:
        """Forget cached identities (after RegisterAnnotator)."""
        with self._lock:
            self._cache.clear()
