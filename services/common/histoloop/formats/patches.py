"""Patch sets in the artifact store: chunked uint8 arrays, an index table, a manifest.

Tiling writes them; embedding (and anyone else) reads them with :class:`PatchSet`.

Layout under a key prefix ``P``::

    P/patches/chunk-00000.npy   uint8 (n, H, W, 3), n ≤ chunk_size, one .npy per chunk
    P/patches/chunk-00001.npy
    P/index.csv                  one row per patch, in storage order
    P/overlay.png                debug overlay: spots or tiles drawn on the thumbnail
    P/manifest.json              written last; its presence marks the set complete

The index has at least ``id`` (barcode or tile id), ``chunk``, ``offset`` (row within
the chunk), ``level``, ``x``, ``y`` (level-0 top-left of the region read), ``size``
(region side in level pixels) and ``size0`` (region side in level-0 pixels).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from histoloop.artifacts import ArtifactStore, validate_key
from histoloop.errors import InvalidArgument

__all__ = [
    "MANIFEST_FORMAT",
    "PatchChunk",
    "PatchSet",
    "array_to_npy",
    "chunk_key",
    "index_key",
    "manifest_key",
    "npy_to_array",
    "overlay_key",
]

MANIFEST_FORMAT = "histoloop.patches/v1"


def chunk_key(prefix: str, chunk: int) -> str:
    """Key of chunk number ``chunk``."""
    return validate_key(f"{prefix}/patches/chunk-{chunk:05d}.npy")


def index_key(prefix: str) -> str:
    """Key of the index CSV."""
    return validate_key(f"{prefix}/index.csv")


def overlay_key(prefix: str) -> str:
    """Key of the debug overlay PNG."""
    return validate_key(f"{prefix}/overlay.png")


def manifest_key(prefix: str) -> str:
    """Key of the manifest JSON."""
    return validate_key(f"{prefix}/manifest.json")


def array_to_npy(array: np.ndarray) -> bytes:
    """Serialise an array as .npy bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_to_array(data: bytes) -> np.ndarray:
    """Parse .npy bytes (no pickle)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass(frozen=True)
class PatchChunk:
    """One stored chunk: its patches and their index rows (same order)."""

    chunk: int
    index: pd.DataFrame
    patches: np.ndarray


class PatchSet:
    """Read access to a stored patch set, chunk by chunk.

    Use :meth:`open`; iterate with :meth:`iter_chunks` to stream without holding every
    patch in memory.
    """

    def __init__(
        self, store: ArtifactStore, prefix: str, manifest: dict[str, Any], index: pd.DataFrame
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.manifest = manifest
        self.index = index

    @classmethod
    def open(cls, store: ArtifactStore, prefix: str) -> PatchSet:
        """Open the patch set written under ``prefix``.

        ``prefix`` may also be the manifest's key (``<prefix>/manifest.json``).

        Raises:
            ArtifactNotFound: no manifest (the set does not exist or is incomplete).
            InvalidArgument: the manifest is not a histoloop patch set.
        """
        prefix = prefix.rstrip("/").removesuffix("/manifest.json")
        manifest = json.loads(store.get(manifest_key(prefix)))
        if manifest.get("format") != MANIFEST_FORMAT:
            raise InvalidArgument(
                f"{manifest_key(prefix)}: format {manifest.get('format')!r} is not "
                f"{MANIFEST_FORMAT!r}"
            )
        index = pd.read_csv(
            io.BytesIO(store.get(manifest["index"])), dtype={"id": str}, keep_default_na=False
        )
        return cls(store, prefix, manifest, index)

    @property
    def n(self) -> int:
        """Number of patches."""
        return int(self.manifest["n"])

    def __len__(self) -> int:
        return self.n

    @property
    def patch_size(self) -> int:
        """Side of every patch in pixels."""
        return int(self.manifest["patch_size"])

    @property
    def chunk_keys(self) -> list[str]:
        """Artifact keys of the chunks, in order."""
        return list(self.manifest["chunks"])

    def read_chunk(self, chunk: int) -> np.ndarray:
        """Patches of one chunk, uint8 (n, H, W, 3)."""
        return npy_to_array(self.store.get(self.chunk_keys[chunk]))

    def iter_chunks(self) -> Iterator[PatchChunk]:
        """Yield every chunk in order with its index rows."""
        for chunk in range(len(self.chunk_keys)):
            rows = self.index[self.index["chunk"] == chunk].sort_values("offset")
            patches = self.read_chunk(chunk)
            if len(rows) != len(patches):
                raise InvalidArgument(
                    f"{self.chunk_keys[chunk]} holds {len(patches)} patches but the index "
                    f"lists {len(rows)}"
                )
            yield PatchChunk(chunk=chunk, index=rows, patches=patches)

    def read_all(self) -> np.ndarray:
        """Every patch in storage order (small sets only)."""
        chunks = [c.patches for c in self.iter_chunks()]
        if not chunks:
            return np.zeros((0, self.patch_size, self.patch_size, 3), np.uint8)
        return np.concatenate(chunks)
