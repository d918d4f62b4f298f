"""Reading the tiling service's patch sets (format ``histoloop.patches/v1``).

Services never import each other, so this is the embedding side of the artifact
contract written by the tiling service: ``<prefix>/manifest.json`` (format, n,
patch_size, chunk keys, index key), ``<prefix>/index.csv`` (one row per patch with
``chunk`` and ``offset``) and one ``.npy`` uint8 (n, H, W, 3) per chunk.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from histoloop.artifacts import ArtifactStore
from histoloop.errors import InvalidArgument

__all__ = ["PATCHES_FORMAT", "StoredPatches"]

PATCHES_FORMAT = "histoloop.patches/v1"


@dataclass
class StoredPatches:
    """A patch set in the artifact store, read chunk by chunk."""

    store: ArtifactStore
    prefix: str
    manifest: dict[str, Any]
    index: pd.DataFrame

    @classmethod
    def open(cls, store: ArtifactStore, prefix: str) -> StoredPatches:
        """Open ``<prefix>/manifest.json`` and the index (``prefix`` may be that key).

        Raises:
            ArtifactNotFound: no manifest under the prefix.
            InvalidArgument: not a ``histoloop.patches/v1`` manifest.
        """
        prefix = prefix.rstrip("/").removesuffix("/manifest.json")
        key = f"{prefix}/manifest.json"
        manifest = json.loads(store.get(key))
        if manifest.get("format") != PATCHES_FORMAT:
            raise InvalidArgument(f"{key}: format {manifest.get('format')!r} is not {PATCHES_FORMAT!r}")
        index = pd.read_csv(io.BytesIO(store.get(manifest["index"])), dtype={"id": str},
                            keep_default_na=False)
        return cls(store, prefix, manifest, index)

    @property
    def n(self) -> int:
        """Number of patches."""
        return int(self.manifest["n"])

    @property
    def patch_size(self) -> int:
        """Patch side, pixels."""
        return int(self.manifest["patch_size"])

    def iter_chunks(self) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
        """Yield (index rows, uint8 patches) per chunk, in storage order."""
        for chunk, key in enumerate(self.manifest["chunks"]):
            rows = self.index[self.index["chunk"] == chunk].sort_values("offset")
            patches = np.load(io.BytesIO(self.store.get(key)), allow_pickle=False)
            if len(rows) != len(patches):
                raise InvalidArgument(
                    f"{key} holds {len(patches)} patches but the index lists {len(rows)}"
                )
            yield rows, patches
