"""Artifact store backend on MinIO or any S3 server (the minio client).

Objects live in one bucket, under their key. Every object carries its SHA-256 and size
as user metadata (``x-amz-meta-sha256``, ``x-amz-meta-size``) and the caller's metadata
as one URL-quoted JSON value (``x-amz-meta-histoloop-metadata``), so keys keep their case
and values may be any text.

Writing never exposes a half-written object under a real key:

* ``bytes``: the checksum is computed first and the object is written in one PUT (a
  multipart upload above ``part_size``), which S3 makes visible only once complete.
* streams: the bytes are streamed (multipart, ``part_size`` chunks, never the whole
  object in memory) to a temporary key ``!tmp/<uuid>`` while being hashed; then a
  server-side copy (REPLACE directive) writes the final key with the checksum in its
  metadata, atomically; the temporary object is deleted. ``!`` cannot occur in a valid
  artifact key, so temporary objects never collide with or show up as artifacts.
  Buckets this store creates get a lifecycle rule that expires stray ``!tmp/`` objects
  and incomplete multipart uploads after a day (a crash mid-upload).

Immutability is enforced by checking that the key is free before writing (and, for
streams, again right before the copy). Two writers racing for the same new key can
both pass that check and the last one wins; readers still never see a mix, because data
and checksum are written together. S3 conditional writes (``If-None-Match: *``) would
close that window, but the minio client exposes them on no public call, and the copy we
need for streams honours them on no server we test against (moto ignores it), so we do
not claim them. Artifact keys in histoloop are versioned per producer, so two writers of
one key do not occur by design.

Reads stream through :class:`~histoloop.artifacts.verify.VerifyingReader`, which raises
:class:`~histoloop.artifacts.base.ChecksumMismatch` at the end of a corrupt object.
Connection problems raise :class:`~histoloop.errors.Unavailable` after a few quick
retries (seconds, not minutes). Credentials are never logged or shown in messages.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote, unquote, urlsplit

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, REPLACE, CopySource, Filter
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import check_bucket_name
from minio.lifecycleconfig import AbortIncompleteMultipartUpload, Expiration, LifecycleConfig, Rule

from histoloop.artifacts.base import (
    ArtifactExists,
    ArtifactInfo,
    ArtifactNotFound,
    ArtifactStore,
    ChecksumMismatch,
    InvalidKey,
    validate_key,
)
from histoloop.artifacts.verify import VerifyingReader
from histoloop.errors import InvalidArgument, Unavailable
from histoloop.metrics import ARTIFACT_BYTES

__all__ = ["MinioArtifactStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

TMP_PREFIX = "!tmp/"
"""Where streamed uploads wait for their checksum; ``!`` is outside the key alphabet."""
_SHA = "x-amz-meta-sha256"
_SIZE = "x-amz-meta-size"
_USER = "x-amz-meta-histoloop-metadata"
_MAX_USER_METADATA = 1_800  # S3 allows 2 KB of user metadata in all
_NOT_FOUND = {"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"}
_ALREADY_HAVE_BUCKET = {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}
_MIN_PART = 5 * 1024 * 1024


class MinioArtifactStore(ArtifactStore):
    """Immutable checksummed objects in a MinIO/S3 bucket.

    The bucket is created at construction if it is missing. If the server cannot be
    reached then, construction still succeeds (a warning is logged) and the bucket is
    created by the first operation that reaches it; :meth:`ping` raises
    :class:`~histoloop.errors.Unavailable` until then, so a start-up step can wait on it.

    Args:
        endpoint: ``host:port`` of the server (an ``http://``/``https://`` prefix is
            accepted and then decides ``secure``).
        access_key: the access key (never logged).
        secret_key: the secret key (never logged).
        bucket: the bucket holding every artifact.
        secure: use HTTPS.
        region: the bucket's region; ``None`` lets the client look it up.
        part_size: multipart chunk size (>= 5 MiB; objects up to 10,000 parts). Memory
            per streamed upload peaks at a few parts (about ``part_size *
            (parallel_uploads + 3)``), whatever the object size.
        parallel_uploads: parts uploaded at once.
        connect_timeout: seconds to open a connection.
        read_timeout: seconds to wait for data on an open connection.
        retries: quick retries of a failed request (connection errors, 5xx).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        access_key: str,
        secret_key: str,
        bucket: str = "histoloop",
        secure: bool = False,
        region: str | None = None,
        part_size: int = 8 * 1024 * 1024,
        parallel_uploads: int = 2,
        connect_timeout: float = 3.0,
        read_timeout: float = 60.0,
        retries: int = 2,
    ) -> None:
        if "://" in endpoint:
            parts = urlsplit(endpoint)
            secure = parts.scheme == "https"
            endpoint = parts.netloc
        endpoint = endpoint.strip().rstrip("/")
        if not endpoint:
            raise InvalidArgument("MinIO endpoint must not be empty (host:port)")
        try:
            check_bucket_name(bucket, strict=True)
        except ValueError as exc:
            raise InvalidArgument(f"invalid MinIO bucket name {bucket!r}: {exc}") from None
        if part_size < _MIN_PART:
            raise InvalidArgument(f"part_size must be at least {_MIN_PART} bytes")
        self.endpoint = endpoint
        self.bucket = bucket
        self.secure = secure
        self._part_size = part_size
        self._parallel = max(1, parallel_uploads)
        self._pools = [
            _http_client(connect_timeout, read_timeout, retries),
            # pings must answer fast even if the server accepts connections but hangs
            _http_client(min(connect_timeout, 2.0), 3.0, 0),
        ]
        try:
            self._client, self._probe = (
                Minio(
                    endpoint,
                    access_key=access_key,
                    secret_key=secret_key,
                    secure=secure,
                    region=region,
                    http_client=pool,
                )
                for pool in self._pools
            )
        except ValueError as exc:  # bad endpoint or bucket name; no secrets in these
            raise InvalidArgument(f"invalid MinIO settings for {endpoint}: {exc}") from exc
        self._bucket_ready = False
        try:
            self._ensure_bucket()
        except Unavailable as exc:
            log.warning("artifact store not reachable yet, bucket check postponed: %s", exc)

    def __repr__(self) -> str:
        return f"MinioArtifactStore(endpoint={self.endpoint!r}, bucket={self.bucket!r}, secure={self.secure})"

    # plumbing -------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one client call, mapping its failures onto the histoloop error hierarchy."""
        try:
            return fn(*args, **kwargs)
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._translate(what, exc) from exc

    def _translate(self, what: str, exc: BaseException) -> Exception:
        if isinstance(exc, S3Error):
            if exc.code in _NOT_FOUND:
                return ArtifactNotFound(f"artifact {exc.object_name or what!r} not found")
            if exc.code == "NoSuchBucket":
                self._bucket_ready = False
            return Unavailable(
                f"S3 at {self.endpoint} (bucket {self.bucket}) refused {what}: {exc.code}: {exc.message}"
            )
        if isinstance(exc, (ServerError, InvalidResponseError)):
            return Unavailable(f"S3 at {self.endpoint} failed {what}: {exc}")
        if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):
            return Unavailable(
                f"S3 at {self.endpoint} unreachable ({what}): {type(exc).__name__}: {exc}"
            )
        return Unavailable(f"S3 at {self.endpoint} failed {what}: {exc}")

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        if not self._call("bucket check", self._probe.bucket_exists, self.bucket):
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in _ALREADY_HAVE_BUCKET:  # else: another replica was faster
                    raise self._translate("bucket creation", exc) from exc
            except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise self._translate("bucket creation", exc) from exc
            else:
                log.info("created bucket %s on %s", self.bucket, self.endpoint)
                self._set_tmp_lifecycle()
        self._bucket_ready = True

    def _set_tmp_lifecycle(self) -> None:
        config = LifecycleConfig(
            [
                Rule(
                    ENABLED,
                    rule_filter=Filter(prefix=TMP_PREFIX),
                    rule_id="histoloop-expire-tmp",
                    expiration=Expiration(days=1),
                ),
                Rule(
                    ENABLED,
                    rule_filter=Filter(prefix=""),
                    rule_id="histoloop-abort-incomplete-uploads",
                    abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(
                        days_after_initiation=1
                    ),
                ),
            ]
        )
        try:
            self._call("lifecycle setup", self._client.set_bucket_lifecycle, self.bucket, config)
        except Unavailable as exc:  # optional housekeeping; the store works without it
            log.warning(
                "cannot set the temporary-object lifecycle on bucket %s: %s", self.bucket, exc
            )

    def _head(self, key: str) -> Any:
        return self._call(f"stat of {key!r}", self._client.stat_object, self.bucket, key)

    # ArtifactStore ----------------------------------------------------------------------
    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> ArtifactInfo:
        validate_key(key)
        user_meta = _encode_user_metadata(metadata)
        self._ensure_bucket()
        if self.exists(key):
            raise ArtifactExists(f"artifact {key!r} exists already; artifacts are immutable")
        if isinstance(data, (bytes, bytearray, memoryview)):
            payload = bytes(data)
            sha, size = hashlib.sha256(payload).hexdigest(), len(payload)
            self._call(
                f"upload of {key!r}",
                self._client.put_object,
                self.bucket,
                key,
                io.BytesIO(payload),
                size,
                content_type=content_type,
                metadata=_object_metadata(sha, size, user_meta),
                part_size=self._part_size,
                num_parallel_uploads=self._parallel,
            )
        else:
            sha, size = self._put_stream(key, data, content_type, user_meta)
        ARTIFACT_BYTES.labels(direction="out").inc(size)
        return self.stat(key)

    def _put_stream(
        self, key: str, data: BinaryIO, content_type: str, user_meta: str
    ) -> tuple[str, int]:
        tmp = f"{TMP_PREFIX}{uuid.uuid4().hex}"
        reader = _HashingReader(data)
        try:
            self._call(
                f"upload of {key!r}",
                self._client.put_object,
                self.bucket,
                tmp,
                reader,
                -1,
                content_type=content_type,
                part_size=self._part_size,
                num_parallel_uploads=self._parallel,
            )
            sha, size = reader.hexdigest(), reader.size
            if self.exists(key):  # again: narrows the race window to the copy itself
                raise ArtifactExists(f"artifact {key!r} exists already; artifacts are immutable")
            headers = _object_metadata(sha, size, user_meta)
            headers["Content-Type"] = content_type
            self._call(
                f"finalising {key!r}",
                self._client.copy_object,
                self.bucket,
                key,
                CopySource(self.bucket, tmp),
                metadata=headers,
                metadata_directive=REPLACE,
            )
        finally:
            try:
                self._call(f"removal of {tmp}", self._client.remove_object, self.bucket, tmp)
            except (Unavailable, ArtifactNotFound) as exc:
                log.warning(
                    "temporary object %s left behind (the lifecycle rule expires it): %s", tmp, exc
                )
        return sha, size

    @contextmanager
    def open(self, key: str) -> Iterator[BinaryIO]:
        validate_key(key)
        self._ensure_bucket()
        response = self._call(f"read of {key!r}", self._client.get_object, self.bucket, key)
        try:
            headers = response.headers
            sha = headers.get(_SHA)
            if not sha:
                raise ChecksumMismatch(
                    f"artifact {key!r} has no recorded checksum; it was not written by histoloop"
                )
            size = int(headers.get(_SIZE) or headers.get("Content-Length") or -1)
            raw = _ResponseReader(response, self.endpoint, key)
            yield VerifyingReader(raw, key=key, expected_sha256=sha, expected_size=size)  # type: ignore[misc]
        finally:
            response.close()
            response.release_conn()

    def stat(self, key: str) -> ArtifactInfo:
        validate_key(key)
        self._ensure_bucket()
        return _info(key, self._head(key))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ArtifactNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ArtifactInfo]:
        """Objects whose key starts with ``prefix``, in key order (S3 lists in UTF-8 byte order).

        One listing request per 1000 keys plus one HEAD per object (S3 listings carry no
        user metadata), so prefer narrow prefixes.
        """
        self._ensure_bucket()
        what = f"listing of {prefix!r}"
        objects = self._call(
            what, self._client.list_objects, self.bucket, prefix=prefix or None, recursive=True
        )
        while (obj := self._call(what, next, objects, None)) is not None:
            name = obj.object_name
            if not name or name.startswith(TMP_PREFIX) or _invalid_key(name):
                continue
            try:
                yield self.stat(name)
            except ArtifactNotFound:
                continue  # removed behind our back between listing and stat

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{validate_key(key)}"

    def key_from_uri(self, uri: str) -> str:
        prefix = f"s3://{self.bucket}/"
        if not isinstance(uri, str) or not uri.startswith(prefix):
            raise InvalidKey(f"URI {uri!r} is not in this store ({prefix})")
        return validate_key(uri[len(prefix) :])

    def ping(self) -> None:
        if not self._call("bucket check", self._probe.bucket_exists, self.bucket):
            self._bucket_ready = False
        self._ensure_bucket()

    def close(self) -> None:
        for pool in self._pools:
            pool.clear()


# helpers ------------------------------------------------------------------------------
def _http_client(connect: float, read: float, retries: int) -> urllib3.PoolManager:
    """Short timeouts and few retries, so a down endpoint fails in seconds, not minutes."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect, read=read),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=retries,
            connect=retries,
            read=retries,
            backoff_factor=0.2,
            backoff_max=2.0,
            status_forcelist=[500, 502, 503, 504],
        ),
    )


def _encode_user_metadata(metadata: Mapping[str, str] | None) -> str:
    if not metadata:
        return ""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InvalidArgument("artifact metadata must map strings to strings")
    encoded = quote(json.dumps(dict(metadata), sort_keys=True, separators=(",", ":")), safe="")
    if len(encoded) > _MAX_USER_METADATA:
        raise InvalidArgument(
            f"artifact metadata too large for S3 ({len(encoded)} > {_MAX_USER_METADATA} bytes encoded)"
        )
    return encoded


def _object_metadata(sha: str, size: int, user_meta: str) -> dict[str, str]:
    headers = {_SHA: sha, _SIZE: str(size)}
    if user_meta:
        headers[_USER] = user_meta
    return headers


def _info(key: str, obj: Any) -> ArtifactInfo:
    meta = obj.metadata or {}
    raw_user = meta.get(_USER)
    try:
        user = json.loads(unquote(raw_user)) if raw_user else {}
    except ValueError:
        user = {}
    return ArtifactInfo(
        key=key,
        size=int(obj.size or 0),
        sha256=meta.get(_SHA) or "",
        created=obj.last_modified or datetime.now(UTC),
        content_type=obj.content_type or "application/octet-stream",
        metadata=user,
    )


def _invalid_key(name: str) -> bool:
    try:
        validate_key(name)
    except InvalidKey:
        return True
    return False


class _HashingReader(io.RawIOBase):
    """Pass a stream through, hashing it; ``read(n)`` returns exactly n bytes until EOF.

    Filling whole reads matters: the minio client appends to a part buffer read by read,
    which is quadratic for sources that return small chunks (sockets, pipes).
    """

    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        self._source = source
        self._digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            chunk = bytes(self._source.read())
        else:
            chunk = bytes(self._source.read(size))  # files return it all at once: no copy
            if chunk and len(chunk) < size:
                buf = bytearray(chunk)
                while len(buf) < size:
                    piece = self._source.read(size - len(buf))
                    if not piece:
                        break
                    buf += piece
                chunk = bytes(buf)
        self._digest.update(chunk)
        self.size += len(chunk)
        return chunk

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class _ResponseReader:
    """An HTTP response body as a stream; connection failures become Unavailable."""

    def __init__(self, response: Any, endpoint: str, key: str) -> None:
        self._response = response
        self._endpoint = endpoint
        self._key = key

    def read(self, size: int = -1) -> bytes:
        try:
            if size is None or size < 0:
                return bytes(self._response.read())
            return bytes(self._response.read(size))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(
                f"S3 at {self._endpoint}: reading {self._key!r} failed: {exc}"
            ) from exc
