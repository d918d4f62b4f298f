"""The artifact store contract, run against both backends: a local directory and MinIO/S3.

The S3 side talks to a real HTTP server (moto's, in a helper process; see
``tests/fixtures``) through the same minio client production uses.
"""

from __future__ import annotations

import hashlib
import io
import random
import resource
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio import Minio
from prometheus_client import REGISTRY

from histoloop.artifacts.base import (
    ArtifactExists,
    ArtifactNotFound,
    ArtifactStore,
    ChecksumMismatch,
    InvalidKey,
)
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.artifacts.s3 import MinioArtifactStore
from histoloop.errors import InvalidArgument, Unavailable
from tests.fixtures.s3 import free_port, start_moto_s3

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024


@dataclass
class Backend:
    """One store under test and a way to corrupt an object behind its back."""

    kind: str
    store: ArtifactStore
    tamper: Callable[[str, bytes], None]


def _minio_store(s3, bucket: str, **kwargs) -> MinioArtifactStore:
    return MinioArtifactStore(
        s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        bucket=bucket,
        region=s3.region,
        **kwargs,
    )


def _raw_client(s3) -> Minio:
    return Minio(
        s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        secure=False,
        region=s3.region,
    )


@pytest.fixture(params=["local", "minio"], ids=["local", "minio"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        store = LocalArtifactStore(tmp_path / "artifacts")

        def tamper(key: str, data: bytes) -> None:
            (store.root / key).write_bytes(data)

        backend = Backend("local", store, tamper)
    else:
        s3 = request.getfixturevalue("s3_server")
        bucket = f"hl-{uuid.uuid4().hex[:12]}"
        # small parts so that the large-object test really goes multipart
        store = _minio_store(s3, bucket, part_size=5 * MiB)
        raw = _raw_client(s3)

        def tamper(key: str, data: bytes) -> None:
            stat = raw.stat_object(bucket, key)
            keep = {k: v for k, v in stat.metadata.items() if k.lower().startswith("x-amz-meta-")}
            raw.put_object(bucket, key, io.BytesIO(data), len(data), metadata=keep)

        backend = Backend("minio", store, tamper)
    yield backend
    backend.store.close()


class PatternReader(io.RawIOBase):
    """``size`` bytes of a seeded pseudo-random block repeated, made on demand (never all in memory)."""

    def __init__(
        self, size: int, *, seed: int = 7, block: int = 1 * MiB + 17, max_read: int | None = None
    ) -> None:
        super().__init__()
        self._block = random.Random(seed).randbytes(block)
        self._size = size
        self._pos = 0
        self._max_read = max_read  # imitate a socket that returns short reads

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        remaining = self._size - self._pos
        n = remaining if n is None or n < 0 else min(n, remaining)
        if self._max_read:
            n = min(n, self._max_read)
        if n <= 0:
            return b""
        start = self._pos % len(self._block)
        out = bytearray()
        while len(out) < n:
            take = min(n - len(out), len(self._block) - start)
            out += self._block[start : start + take]
            start = 0
        self._pos += n
        return bytes(out)


def sha_of_pattern(size: int, **kwargs) -> str:
    digest, reader = hashlib.sha256(), PatternReader(size, **kwargs)
    while chunk := reader.read(4 * MiB):
        digest.update(chunk)
    return digest.hexdigest()


def artifact_bytes(direction: str) -> float:
    return (
        REGISTRY.get_sample_value("histoloop_artifact_bytes_total", {"direction": direction}) or 0.0
    )


# --------------------------------------------------------------------------------------
def test_round_trip_bytes(backend: Backend) -> None:
    store = backend.store
    data = b"\x00embedding\xffbytes" * 100
    before = artifact_bytes("out")
    info = store.put(
        "embeddings/p1/v1/emb.h5ad",
        data,
        content_type="application/x-hdf5",
        metadata={"producer": "embedding", "Model-Version": "uni-2", "note": "µm, ünïcode"},
    )
    assert artifact_bytes("out") == before + len(data)
    assert (info.key, info.size, info.sha256) == (
        "embeddings/p1/v1/emb.h5ad",
        len(data),
        hashlib.sha256(data).hexdigest(),
    )
    assert info.content_type == "application/x-hdf5"
    assert dict(info.metadata) == {
        "producer": "embedding",
        "Model-Version": "uni-2",
        "note": "µm, ünïcode",
    }
    assert store.get("embeddings/p1/v1/emb.h5ad") == data
    stat = store.stat("embeddings/p1/v1/emb.h5ad")
    assert (stat.size, stat.sha256, stat.content_type, dict(stat.metadata)) == (
        info.size,
        info.sha256,
        info.content_type,
        dict(info.metadata),
    )
    assert stat.created.tzinfo is not None
    store.ping()

    big = random.Random(1).randbytes(6 * MiB)  # above the minio store's part size: multipart
    assert store.put("embeddings/p1/v1/big.npy", big).sha256 == hashlib.sha256(big).hexdigest()
    assert store.get("embeddings/p1/v1/big.npy") == big


def test_round_trip_streams(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    store.put("a/seekable.bin", io.BytesIO(b"seekable stream"))
    assert store.get("a/seekable.bin") == b"seekable stream"

    size = 3 * MiB + 5
    info = store.put("a/socket-like.bin", PatternReader(size, max_read=65_536))  # short reads
    assert (info.size, info.sha256) == (size, sha_of_pattern(size))

    store.put("a/empty.bin", io.BytesIO(b""))
    assert store.get("a/empty.bin") == b""
    assert store.stat("a/empty.bin").size == 0

    src = tmp_path / "in.bin"
    src.write_bytes(b"from a file")
    store.put_file("a/file.bin", src)
    out = store.get_file("a/file.bin", tmp_path / "out" / "file.bin")
    assert out.read_bytes() == b"from a file"


def test_artifacts_are_immutable(backend: Backend) -> None:
    store = backend.store
    store.put("models/p1/v1/model.pt", b"first")
    with pytest.raises(ArtifactExists):
        store.put("models/p1/v1/model.pt", b"second")
    with pytest.raises(ArtifactExists):
        store.put("models/p1/v1/model.pt", io.BytesIO(b"second, streamed"))
    assert store.get("models/p1/v1/model.pt") == b"first"
    assert [i.key for i in store.list("models/")] == ["models/p1/v1/model.pt"]  # no temp leftovers


def test_stat_exists_and_list_by_prefix_in_key_order(backend: Backend) -> None:
    store = backend.store
    keys = [
        "models/p1/v2/model.pt",
        "models/p1/v10/model.pt",
        "models/p2/v1/model.pt",
        "models/p1-old/v1/model.pt",
        "predictions/p1/v1/pred.csv",
        "models/p1/v1/model.pt",
        "z.txt",
    ]
    for key in random.Random(3).sample(keys, len(keys)):
        store.put(key, key.encode())
    assert [i.key for i in store.list()] == sorted(keys)
    assert [i.key for i in store.list("models/p1/")] == [
        "models/p1/v1/model.pt",
        "models/p1/v10/model.pt",
        "models/p1/v2/model.pt",
    ]
    assert [i.key for i in store.list("models/p1")] == sorted(
        k for k in keys if k.startswith("models/p1")
    )
    assert list(store.list("nothing/")) == []
    infos = {i.key: i for i in store.list("predictions/")}
    assert (
        infos["predictions/p1/v1/pred.csv"].sha256
        == hashlib.sha256(b"predictions/p1/v1/pred.csv").hexdigest()
    )
    assert store.exists("z.txt") and not store.exists("z.tx") and not store.exists("models/p1")
    assert store.stat("models/p2/v1/model.pt").size == len(b"models/p2/v1/model.pt")


def test_large_object_streams_in_and_out(backend: Backend) -> None:
    store = backend.store
    size = 64 * MiB + 123
    expected = sha_of_pattern(size)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.monotonic()
    info = store.put("slides/big.svs", PatternReader(size))
    assert (info.size, info.sha256) == (size, expected)

    digest, total, before = hashlib.sha256(), 0, artifact_bytes("in")
    with store.open("slides/big.svs") as fh:
        while chunk := fh.read(1 * MiB):
            digest.update(chunk)
            total += len(chunk)
    assert (total, digest.hexdigest()) == (size, expected)
    assert artifact_bytes("in") - before == size
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert grown < size, (
        f"peak memory grew by {grown / MiB:.0f} MiB for a {size / MiB:.0f} MiB object"
    )
    assert time.monotonic() - started < 120


def test_corruption_is_detected_on_read(backend: Backend) -> None:
    store = backend.store
    good = b"A" * 10_000
    store.put("queries/p1/r3/query.csv", good)
    backend.tamper("queries/p1/r3/query.csv", b"A" * 9_999 + b"B")  # same size, one byte off
    with pytest.raises(ChecksumMismatch):
        store.get("queries/p1/r3/query.csv")
    with pytest.raises(ChecksumMismatch):  # also when streamed chunk by chunk
        with store.open("queries/p1/r3/query.csv") as fh:
            while fh.read(1000):
                pass
    store.put("queries/p1/r3/other.csv", good)
    backend.tamper("queries/p1/r3/other.csv", good[:-10])  # truncated
    with pytest.raises(ChecksumMismatch):
        store.get("queries/p1/r3/other.csv")


def test_missing_key_is_not_found(backend: Backend) -> None:
    store = backend.store
    with pytest.raises(ArtifactNotFound):
        store.stat("no/such/key")
    with pytest.raises(ArtifactNotFound):
        store.get("no/such/key")
    with pytest.raises(ArtifactNotFound):
        with store.open("no/such/key"):
            pass
    assert store.exists("no/such/key") is False


@pytest.mark.parametrize(
    "key", ["../x", "/abs", "", "a//b", "a/./b", "a/", "a/../b", "sp ace", "!tmp/x"]
)
def test_invalid_keys_are_rejected(backend: Backend, key: str) -> None:
    store = backend.store
    with pytest.raises(InvalidKey):
        store.put(key, b"x")
    with pytest.raises(InvalidKey):
        store.stat(key)
    with pytest.raises(InvalidKey):
        store.get(key)
    with pytest.raises(InvalidKey):
        store.exists(key)


def test_uri_round_trip(backend: Backend) -> None:
    store = backend.store
    store.put("models/p1/v3/model.pt", b"m")
    uri = store.uri("models/p1/v3/model.pt")
    assert uri.startswith("file://" if backend.kind == "local" else "s3://")
    assert store.key_from_uri(uri) == "models/p1/v3/model.pt"
    for foreign in [
        "s3://another-bucket/models/p1/v3/model.pt",
        "file:///etc/passwd",
        "models/p1",
        "",
    ]:
        with pytest.raises(InvalidKey):
            store.key_from_uri(foreign)
    with pytest.raises(InvalidKey):
        store.key_from_uri(uri.rsplit("/", 4)[0] + "/../../etc/passwd")


# MinIO/S3 only --------------------------------------------------------------------------
def test_minio_bucket_is_created_on_start(s3_server) -> None:
    bucket = f"hl-new-{uuid.uuid4().hex[:8]}"
    raw = _raw_client(s3_server)
    assert not raw.bucket_exists(bucket)
    store = _minio_store(s3_server, bucket)
    assert raw.bucket_exists(bucket)
    store.ping()
    _minio_store(s3_server, bucket).ping()  # a second replica finds it there
    store.close()
    store.close()
    with pytest.raises(InvalidArgument):
        _minio_store(s3_server, "Not_A_Bucket")


def test_minio_unreachable_endpoint_is_unavailable_quickly() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    store = MinioArtifactStore(
        endpoint, access_key="k", secret_key="s3cr3t-value", bucket="histoloop"
    )
    for call in (
        store.ping,
        lambda: store.put("a/b", b"x"),
        lambda: store.stat("a/b"),
        lambda: list(store.list()),
    ):
        with pytest.raises(Unavailable) as info:
            call()
        assert endpoint in str(info.value)
        assert "s3cr3t-value" not in str(info.value)
    assert "s3cr3t-value" not in repr(store)
    assert time.monotonic() - started < 15


def test_minio_waits_for_a_late_server_and_fails_fast_when_it_stops() -> None:
    port = free_port()
    store = MinioArtifactStore(
        f"127.0.0.1:{port}", access_key="k", secret_key="s", bucket="late-bucket"
    )
    with pytest.raises(Unavailable):
        store.ping()
    with start_moto_s3(port=port) as server:
        store.ping()  # creates the bucket now
        store.put("a/b", b"x")
        assert store.get("a/b") == b"x"
        server.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable):
            store.ping()
        with pytest.raises(Unavailable):
            store.get("a/b")
        assert time.monotonic() - started < 10


def test_minio_object_without_checksum_is_not_trusted(s3_server) -> None:
    bucket = f"hl-{uuid.uuid4().hex[:12]}"
    store = _minio_store(s3_server, bucket)
    _raw_client(s3_server).put_object(bucket, "foreign/object", io.BytesIO(b"abc"), 3)
    with pytest.raises(ChecksumMismatch):
        store.get("foreign/object")
