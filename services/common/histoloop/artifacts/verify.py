"""A stream wrapper that checks size and SHA-256 as the bytes go by."""

from __future__ import annotations

import hashlib
from typing import Protocol

from histoloop.artifacts.base import ChecksumMismatch
from histoloop.metrics import ARTIFACT_BYTES

__all__ = ["VerifyingReader"]


class Readable(Protocol):
    """What the reader needs of the stream below it: ``read``."""

    def read(self, size: int = -1, /) -> bytes: ...


class VerifyingReader:
    """Read-only stream over an artifact; raises :class:`ChecksumMismatch` at its end if corrupt."""

    def __init__(
        self, raw: Readable, *, key: str, expected_sha256: str, expected_size: int
    ) -> None:
        self._raw = raw
        self._key = key
        self._expected = expected_sha256
        self._expected_size = expected_size
        self._digest = hashlib.sha256()
        self._read = 0
        self._checked = False

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size) if size is not None and size >= 0 else self._raw.read()
        if chunk:
            self._digest.update(chunk)
            self._read += len(chunk)
            ARTIFACT_BYTES.labels(direction="in").inc(len(chunk))
        if (not chunk or size is None or size < 0) and not self._checked:
            self._verify()
        return chunk

    def readable(self) -> bool:
        return True

    def _verify(self) -> None:
        self._checked = True
        if self._read != self._expected_size or self._digest.hexdigest() != self._expected:
            raise ChecksumMismatch(
                f"artifact {self._key!r} is corrupt: read {self._read} bytes with sha256 "
                f"{self._digest.hexdigest()}, expected {self._expected_size} bytes with {self._expected}"
            )
