"""Artifact store: immutable checksummed objects, in a local directory or MinIO/S3."""

from __future__ import annotations

from histoloop.artifacts.base import (
    ArtifactExists,
    ArtifactInfo,
    ArtifactNotFound,
    ArtifactStore,
    ChecksumMismatch,
    InvalidKey,
    validate_key,
)
from histoloop.config import Settings

__all__ = [
    "ArtifactExists",
    "ArtifactInfo",
    "ArtifactNotFound",
    "ArtifactStore",
    "ChecksumMismatch",
    "InvalidKey",
    "make_store",
    "validate_key",
]


def make_store(settings: Settings) -> ArtifactStore:
    """The artifact store backend the settings choose (MinIO buckets are created on start)."""
    if settings.artifact_backend == "minio":
        from histoloop.artifacts.s3 import MinioArtifactStore

        assert settings.minio_endpoint and settings.minio_access_key and settings.minio_secret_key
        return MinioArtifactStore(
            settings.minio_endpoint,
            access_key=settings.minio_access_key.get_secret_value(),
            secret_key=settings.minio_secret_key.get_secret_value(),
            bucket=settings.minio_bucket,
            secure=settings.minio_secure,
            region=settings.minio_region,
        )
    from histoloop.artifacts.local import LocalArtifactStore

    return LocalArtifactStore(settings.data_dir / "artifacts")
