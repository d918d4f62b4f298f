"""Embeddings artifacts: their keys and the names inside the AnnData.

One ``.h5ad`` per dataset and embedding run, under
``embeddings/<project>/<dataset>/<id>.h5ad``; ``obs`` is indexed by barcode (with
``array_row``/``array_col`` and pixel positions), and ``obsm`` holds the vectors:

- :data:`OBSM_MORPH` (``X_morph``): image vectors ``(n, d)``;
- :data:`OBSM_MORPH_VIEWS` (``X_morph_aug``): augmented image views ``(n, views, d)``;
- :data:`OBSM_EXPR` (``X_expr``): gene-expression features ``(n, g)``;
- :data:`OBSM_SPATIAL` (``spatial``): full-resolution pixel ``(x, y)``.

Reading and writing the AnnData itself is :mod:`histoloop.datasets`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from histoloop.artifacts import validate_key
from histoloop.errors import InvalidArgument

__all__ = [
    "EMBEDDINGS_ROOT",
    "OBSM_EXPR",
    "OBSM_FEATURES",
    "OBSM_MORPH",
    "OBSM_MORPH_VIEWS",
    "OBSM_SPATIAL",
    "EmbeddingsKey",
    "embedding_dim",
    "embeddings_key",
    "embeddings_prefix",
    "parse_embeddings_key",
]

EMBEDDINGS_ROOT = "embeddings"
OBSM_MORPH = "X_morph"
OBSM_MORPH_VIEWS = "X_morph_aug"
OBSM_EXPR = "X_expr"
OBSM_SPATIAL = "spatial"
OBSM_FEATURES = (OBSM_MORPH, OBSM_EXPR)
"""The feature matrices a model can train on, image first."""
_SUFFIX = ".h5ad"


def embeddings_prefix(project: str, dataset: str | None = None) -> str:
    """``embeddings/<project>/`` or ``embeddings/<project>/<dataset>/`` (with the slash)."""
    if dataset is None:
        return f"{EMBEDDINGS_ROOT}/{project}/"
    return f"{EMBEDDINGS_ROOT}/{project}/{dataset}/"


def embeddings_key(project: str, dataset: str, artifact_id: str) -> str:
    """Key of one embeddings artifact, ``embeddings/<project>/<dataset>/<id>.h5ad``."""
    return validate_key(f"{embeddings_prefix(project, dataset)}{artifact_id}{_SUFFIX}")


class EmbeddingsKey(tuple[str, str, str]):
    """``(project, dataset, artifact_id)`` of an embeddings key."""

    __slots__ = ()

    @property
    def project(self) -> str:
        """The project id."""
        return self[0]

    @property
    def dataset(self) -> str:
        """The dataset id."""
        return self[1]

    @property
    def artifact_id(self) -> str:
        """The artifact's id (the file name without ``.h5ad``)."""
        return self[2]


def parse_embeddings_key(key_or_uri: str) -> EmbeddingsKey:
    """Split an embeddings key (or a URI ending in one) into its parts.

    Raises:
        InvalidArgument: not ``…embeddings/<project>/<dataset>/<id>.h5ad``.
    """
    parts = key_or_uri.split("/")
    if (
        len(parts) < 4
        or parts[-4].rsplit(":", 1)[-1] != EMBEDDINGS_ROOT
        or not parts[-1].endswith(_SUFFIX)
    ):
        raise InvalidArgument(
            f"{key_or_uri!r} is not an embeddings key ({EMBEDDINGS_ROOT}/<project>/<dataset>/<id>{_SUFFIX})"
        )
    return EmbeddingsKey((parts[-3], parts[-2], parts[-1].removesuffix(_SUFFIX)))


def embedding_dim(obsm: Any) -> int:
    """Width of the feature matrices an AnnData's ``obsm`` holds (image + expression)."""
    return sum(int(np.shape(obsm[k])[1]) for k in OBSM_FEATURES if k in obsm)
