"""The artifact store interface: immutable, checksummed objects addressed by key.

Artifacts (slides, patches, embeddings, models, predictions, query sets) are written
once and never changed. Keys are relative POSIX paths (``models/p1/v3/model.pt``); the
store records a SHA-256 of every object when it is written and verifies it on read.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from histoloop.errors import AlreadyExists, HistoloopError, InvalidArgument, NotFound

__all__ = [
    "ArtifactExists",
    "ArtifactInfo",
    "ArtifactNotFound",
    "ArtifactStore",
    "ChecksumMismatch",
    "InvalidKey",
    "validate_key",
]

_KEY = re.compile(r"^[A-Za-z0-9_.=+@-]+(/[A-Za-z0-9_.=+@-]+)*$")


class ArtifactNotFound(NotFound):
    """No object under this key."""


class ArtifactExists(AlreadyExists):
    """An object exists under this key already; artifacts are immutable."""


class ChecksumMismatch(HistoloopError):
    """The bytes read back do not match the checksum recorded at write time."""

    code = "DATA_LOSS"


class InvalidKey(InvalidArgument):
    """A key that is empty, absolute, has ``..`` parts or characters outside the safe set."""


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise :class:`InvalidKey`."""
    if not isinstance(key, str) or not key or len(key) > 900 or not _KEY.match(key):
        raise InvalidKey(
            f"invalid artifact key {key!r}: use relative paths of [A-Za-z0-9_.=+@-] parts"
        )
    if any(part in (".", "..") for part in key.split("/")):
        raise InvalidKey(f"invalid artifact key {key!r}: '.' and '..' parts are not allowed")
    return key


@dataclass(frozen=True)
class ArtifactInfo:
    """What the store knows about one object."""

    key: str
    size: int
    sha256: str
    created: datetime
    content_type: str = "application/octet-stream"
    metadata: Mapping[str, str] = field(default_factory=dict)


class ArtifactStore(ABC):
    """Immutable object storage with checksums; two backends: local directory and MinIO/S3."""

    @abstractmethod
    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> ArtifactInfo:
        """Write a new object (bytes or a readable binary stream, streamed in chunks).

        Raises:
            ArtifactExists: the key is taken (objects are immutable).
            InvalidKey: the key is not a safe relative path.
        """

    def put_file(self, key: str, path: str | Path, **kwargs: object) -> ArtifactInfo:
        """Stream a local file into a new object."""
        with open(path, "rb") as fh:
            return self.put(key, fh, **kwargs)  # type: ignore[arg-type]

    @abstractmethod
    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        """Stream an object; the checksum is verified when the stream is read to its end.

        Raises:
            ArtifactNotFound: no such key.
            ChecksumMismatch: (when fully read) the bytes differ from what was written.
        """

    def get(self, key: str) -> bytes:
        """Read a whole object into memory, checksum verified."""
        with self.open(key) as fh:
            return fh.read()

    def get_file(self, key: str, path: str | Path) -> Path:
        """Stream an object into a local file (checksum verified) and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.open(key) as src, open(path, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        return path

    @abstractmethod
    def stat(self, key: str) -> ArtifactInfo:
        """Metadata of one object. Raises :class:`ArtifactNotFound`."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ArtifactInfo]:
        """Objects whose key starts with ``prefix``, in key order."""

    @abstractmethod
    def uri(self, key: str) -> str:
        """A URI naming the object (``file:///…`` or ``s3://bucket/key``) for events."""

    @abstractmethod
    def key_from_uri(self, uri: str) -> str:
        """The key of a URI this store produced. Raises :class:`InvalidKey` for others."""

    @abstractmethod
    def ping(self) -> None:
        """Raise :class:`histoloop.errors.Unavailable` if the store cannot be reached."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; safe to call twice."""
