"""Artifact store backend on a local directory (the embedded default).

Each object is a file under ``root``; its checksum, size and metadata live in a JSON
sidecar under ``root/.meta``. Writes go to a temporary file that is renamed into place
only when complete, so a crash never leaves a half-written object under a real key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from histoloop.artifacts.base import (
    ArtifactExists,
    ArtifactInfo,
    ArtifactNotFound,
    ArtifactStore,
    InvalidKey,
    validate_key,
)
from histoloop.artifacts.verify import VerifyingReader
from histoloop.errors import Unavailable
from histoloop.metrics import ARTIFACT_BYTES

__all__ = ["LocalArtifactStore"]

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


class LocalArtifactStore(ArtifactStore):
    """Immutable objects as files in a directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self._meta = self.root / ".meta"
        self._tmp = self.root / ".tmp"
        for folder in (self.root, self._meta, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _meta_path(self, key: str) -> Path:
        return self._meta / (validate_key(key) + ".json")

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> ArtifactInfo:
        path, meta_path = self._path(key), self._meta_path(key)
        if meta_path.exists():
            raise ArtifactExists(f"artifact {key!r} exists already; artifacts are immutable")
        digest, size = hashlib.sha256(), 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    out.write(data)
                    digest.update(data)
                    size = len(data)
                else:
                    while chunk := data.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            info = ArtifactInfo(
                key=key,
                size=size,
                sha256=digest.hexdigest(),
                created=datetime.now(UTC),
                content_type=content_type,
                metadata=dict(metadata or {}),
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            meta_path.parent.mkdir(parents=True, exist_ok=True)
            # the object first, then its sidecar: an object without a sidecar does not exist
            os.replace(tmp_name, path)
            _write_json_atomically(meta_path, _info_to_json(info), self._tmp)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        ARTIFACT_BYTES.labels(direction="out").inc(size)
        return info

    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        info = self.stat(key)
        with open(self._path(key), "rb") as fh:
            reader = VerifyingReader(
                fh, key=key, expected_sha256=info.sha256, expected_size=info.size
            )
            yield reader  # type: ignore[misc]

    def stat(self, key: str) -> ArtifactInfo:
        try:
            raw = json.loads(self._meta_path(key).read_text())
        except FileNotFoundError:
            raise ArtifactNotFound(f"artifact {key!r} not found") from None
        return _info_from_json(raw)

    def exists(self, key: str) -> bool:
        return self._meta_path(key).exists()

    def list(self, prefix: str = "") -> Iterator[ArtifactInfo]:
        # walk only the folder the prefix names (not the whole store: ledgers grow per event)
        folder = self._meta.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self._meta
        if ".." in prefix.split("/") or not folder.is_dir():
            return
        keys = sorted(
            p.relative_to(self._meta).as_posix()[: -len(".json")] for p in folder.rglob("*.json")
        )
        for key in keys:
            if key.startswith(prefix):
                yield self.stat(key)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def key_from_uri(self, uri: str) -> str:
        prefix = self.root.as_uri() + "/"
        if not uri.startswith(prefix):
            raise InvalidKey(f"URI {uri!r} is not in this store ({prefix})")
        return validate_key(uri[len(prefix) :])

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise Unavailable(f"artifact directory {self.root} is not writable")


def _info_to_json(info: ArtifactInfo) -> dict[str, object]:
    return {
        "key": info.key,
        "size": info.size,
        "sha256": info.sha256,
        "created": info.created.isoformat(),
        "content_type": info.content_type,
        "metadata": dict(info.metadata),
    }


def _info_from_json(raw: dict[str, object]) -> ArtifactInfo:
    return ArtifactInfo(
        key=str(raw["key"]),
        size=int(raw["size"]),  # type: ignore[call-overload]
        sha256=str(raw["sha256"]),
        created=datetime.fromisoformat(str(raw["created"])),
        content_type=str(raw["content_type"]),
        metadata=dict(raw.get("metadata") or {}),  # type: ignore[call-overload]
    )


def _write_json_atomically(path: Path, obj: object, tmp_dir: Path) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir)
    with os.fdopen(fd, "w") as out:
        json.dump(obj, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp_name, path)
