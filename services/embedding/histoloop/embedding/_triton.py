"""Embedding through a model served by NVIDIA Triton (gRPC).

The client reads the model's metadata and configuration to learn its input name, shape
and dtype and its ``max_batch_size``; splits the patches into batches of that size;
keeps up to ``max_in_flight`` requests in flight (a small thread pool, one gRPC client
per thread); retries a request with exponential backoff while Triton is unavailable, and
raises :class:`histoloop.errors.Unavailable` when the retries are spent. Every response
is checked against the declared output shape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from histoloop.embedding._base import Embedder, EmbeddingShapeError, check_patches
from histoloop.embedding._modelio import IMAGENET_MEAN, IMAGENET_STD, ModelIO
from histoloop.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

__all__ = ["TritonEmbedder"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# gRPC status codes worth retrying: the server is down, restarting or overloaded
_RETRYABLE = {
    "StatusCode.UNAVAILABLE",
    "StatusCode.DEADLINE_EXCEEDED",
    "StatusCode.RESOURCE_EXHAUSTED",
}


class TritonEmbedder(Embedder):
    """Embeds patches with a model served by Triton over gRPC.

    Args:
        url: Triton's gRPC address, ``host:port``.
        model_name: the model in Triton's repository.
        model_version: a version, or "" for the one Triton picks (recorded as the highest
            served version).
        max_in_flight: concurrent requests.
        batch_size: patches per request (default and upper bound: the model's
            ``max_batch_size``).
        timeout_s: per-request timeout.
        retries: attempts per request while Triton is unavailable (≥ 1).
        backoff_s: first retry delay; doubles each attempt up to ``max_backoff_s``.
        max_backoff_s: longest delay between attempts.
        expected_dim: fail at start unless the model returns vectors of this length.
        mean: per-channel mean, for models with float input.
        std: per-channel std, for models with float input.

    Raises:
        Unavailable: Triton cannot be reached within the retries.
        NotFound: Triton does not serve ``model_name`` (or that version).
        EmbeddingShapeError: the model's declared inputs/outputs break the contract.
    """

    def __init__(
        self,
        url: str,
        model_name: str,
        *,
        model_version: str = "",
        max_in_flight: int = 4,
        batch_size: int | None = None,
        timeout_s: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        expected_dim: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if not url or not model_name:
            raise InvalidArgument("the Triton embedder needs a url and a model_name")
        if retries < 1 or max_in_flight < 1:
            raise InvalidArgument("retries and max_in_flight must be ≥ 1")
        self.url = url
        self.name = model_name
        self.model_version = str(model_version)
        self.max_in_flight = int(max_in_flight)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.mean, self.std = tuple(mean), tuple(std)
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

        meta = self._call(
            "read model metadata",
            lambda c: c.get_model_metadata(
                model_name,
                model_version=self.model_version,
                as_json=True,
                client_timeout=self.timeout_s,
            ),
        )
        config = self._call(
            "read model config",
            lambda c: c.get_model_config(
                model_name,
                model_version=self.model_version,
                as_json=True,
                client_timeout=self.timeout_s,
            ),
        ).get("config", {})
        self.max_batch_size = int(config.get("max_batch_size", 0) or 0)
        if self.max_batch_size <= 0:
            raise EmbeddingShapeError(
                f"Triton model {model_name!r} has max_batch_size 0; the embedding contract "
                "needs a batching model (max_batch_size ≥ 1 in config.pbtxt)"
            )
        served = [str(v) for v in meta.get("versions", [])]
        self.version = self.model_version or (max(served, key=_version_key) if served else "")
        inputs, outputs = meta.get("inputs", []), meta.get("outputs", [])
        if len(inputs) != 1 or len(outputs) != 1:
            raise EmbeddingShapeError(
                f"Triton model {model_name!r}: expected one input and one output, got "
                f"{[i.get('name') for i in inputs]} → {[o.get('name') for o in outputs]}"
            )
        # metadata shapes of a batching model start with the batch dimension (-1)
        self.io = ModelIO.from_shapes(
            model_name,
            input_name=inputs[0]["name"],
            input_dtype=inputs[0]["datatype"],
            input_shape=list(inputs[0]["shape"])[1:],
            output_name=outputs[0]["name"],
            output_shape=list(outputs[0]["shape"])[1:],
        )
        if outputs[0].get("datatype") not in ("FP32", "FP16", "FP64"):
            raise EmbeddingShapeError(
                f"Triton model {model_name!r}: output {outputs[0]['name']!r} is "
                f"{outputs[0].get('datatype')}; expected floating point"
            )
        self.batch_size = min(int(batch_size or self.max_batch_size), self.max_batch_size)
        self._dim = self.io.dim
        if self._dim <= 0:
            h, w = self.io.input_size or (224, 224)
            self._dim = self._infer(np.zeros((1, h, w, 3), np.uint8)).shape[1]
        if expected_dim is not None and self._dim != expected_dim:
            raise EmbeddingShapeError(
                f"Triton model {model_name!r} returns {self._dim}-d vectors; expected "
                f"{expected_dim}"
            )
        log.info(
            "Triton embedder %s v%s at %s: %s %s input, %d-d output, batches of %d, %d in flight",
            model_name,
            self.version,
            url,
            self.io.layout,
            self.io.input_dtype,
            self._dim,
            self.batch_size,
            self.max_in_flight,
        )

    # -- plumbing -------------------------------------------------------------------------

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.grpc as grpcclient

            client = grpcclient.InferenceServerClient(self.url)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(client)``, retrying with exponential backoff while Triton is unavailable."""
        from tritonclient.utils import InferenceServerException

        delay, started = self.backoff_s, time.monotonic()
        for attempt in range(1, self.retries + 1):
            if self._closed:
                raise FailedPrecondition("the Triton embedder is closed")
            try:
                return fn(self._client())
            except InferenceServerException as exc:
                status = str(exc.status() or "")
                message = exc.message() or str(exc)
                if status == "StatusCode.NOT_FOUND" or "unknown model" in message.lower():
                    raise NotFound(
                        f"Triton at {self.url} does not serve model {self.name!r}"
                        f"{' version ' + self.model_version if self.model_version else ''}: "
                        f"{message}"
                    ) from exc
                if status not in _RETRYABLE and status:
                    raise FailedPrecondition(
                        f"Triton at {self.url} refused to {what} for {self.name!r}: "
                        f"[{status}] {message}"
                    ) from exc
                if attempt == self.retries:
                    raise Unavailable(
                        f"Triton at {self.url} unavailable: could not {what} for model "
                        f"{self.name!r} after {attempt} attempts over "
                        f"{time.monotonic() - started:.1f}s: {message}"
                    ) from exc
                log.warning(
                    "Triton at %s: %s failed (%s), attempt %d/%d; retrying in %.2fs",
                    self.url,
                    what,
                    status or message,
                    attempt,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        raise AssertionError("unreachable")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import np_to_triton_dtype

        x = self.io.prepare(batch, self.mean, self.std)
        inp = grpcclient.InferInput(self.io.input_name, list(x.shape), np_to_triton_dtype(x.dtype))
        inp.set_data_from_numpy(x)
        out = grpcclient.InferRequestedOutput(self.io.output_name)
        result = self._call(
            "infer",
            lambda c: c.infer(
                self.name,
                [inp],
                model_version=self.model_version,
                outputs=[out],
                client_timeout=self.timeout_s,
            ),
        )
        return self.io.check_output(
            result.as_numpy(self.io.output_name), len(batch), getattr(self, "_dim", -1)
        )

    # -- Embedder -------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def input_size(self) -> tuple[int, int] | None:
        return self.io.input_size

    def embed(self, patches: np.ndarray) -> np.ndarray:
        check_patches(patches, size=self.io.input_size)
        starts = list(range(0, len(patches), self.batch_size))
        out = np.empty((len(patches), self.dim), dtype=np.float32)
        if not starts:
            return out
        if len(starts) == 1 or self.max_in_flight == 1:
            for s in starts:
                out[s : s + self.batch_size] = self._infer(patches[s : s + self.batch_size])
            return out
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="triton")
        futures = [self._pool.submit(self._infer, patches[s : s + self.batch_size]) for s in starts]
        try:
            for s, fut in zip(starts, futures, strict=True):
                out[s : s + self.batch_size] = fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        return out

    def ping(self) -> None:
        """Raise Unavailable unless Triton is live and the model is ready."""
        ready = self._call(
            "check readiness",
            lambda c: (
                c.is_server_live(client_timeout=self.timeout_s)
                and c.is_model_ready(
                    self.name, model_version=self.model_version, client_timeout=self.timeout_s
                )
            ),
        )
        if not ready:
            raise Unavailable(f"Triton at {self.url}: model {self.name!r} is not ready")

    def close(self) -> None:
        """Stop the request threads and close the gRPC channels; safe to call twice."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)
