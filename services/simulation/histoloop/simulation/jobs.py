"""Campaigns as jobs: queued, run one at a time off the RPC threads, watched, cancelled.

:class:`SimulationJobs` is the domain side of ``SimulationService``: ``start`` checks a
campaign's cheap arguments at once (so a malformed request fails the call) and queues it;
one background thread runs the queued campaigns in turn, reporting rounds done after each
round; ``cancel`` stops a campaign between two rounds. Every finished round is on disk in
the campaign's folder, so starting a failed or cancelled job again resumes it, and
starting a finished one returns its result at once.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from histoloop.artifacts.base import ArtifactStore
from histoloop.datasets import read_anndata
from histoloop.errors import HistoloopError, InvalidArgument, NotFound
from histoloop.simulation.campaign import (
    RPC_MAX_ROUNDS,
    CampaignResult,
    SimulationConfig,
    run_campaign,
)

__all__ = ["JobState", "JobStatus", "SimulationJobs", "SimulationSpec"]

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


@dataclass(frozen=True)
class SimulationSpec:
    """What to simulate: exactly one data source, the campaign, an optional name.

    Attributes:
        config: the campaign's settings.
        embeddings_uri: an AnnData artifact in the store, or
        dataset_path: an ``.h5ad`` on the server.
        name: the campaign id; empty derives one from the settings and the data.
    """

    config: SimulationConfig
    embeddings_uri: str = ""
    dataset_path: str = ""
    name: str = ""

    def job_id(self) -> str:
        """The campaign name, or an id derived from everything else (same spec, same job)."""
        if self.name:
            return self.name
        text = repr((sorted(self.config.to_dict().items()), self.embeddings_uri, self.dataset_path))
        return "job-" + hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class JobStatus:
    """A job as callers see it."""

    job_id: str
    state: JobState
    rounds_done: int = 0
    rounds_total: int = 0
    error: str = ""
    error_code: str = ""
    result: CampaignResult | None = None
    seconds: float = 0.0


class _Cancelled(Exception):
    """Raised from the progress callback to stop a campaign between rounds."""


@dataclass
class _Job:
    spec: SimulationSpec
    status: JobStatus
    started: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)


class SimulationJobs:
    """Queued campaigns run by one background thread.

    Args:
        store: where embeddings artifacts are read and campaign outputs stored.
        root: the folder holding one sub-folder per campaign.
        max_total_rounds: the largest campaign (rounds of every run together) accepted.
    """

    def __init__(
        self, store: ArtifactStore, root: Path, *, max_total_rounds: int = RPC_MAX_ROUNDS
    ) -> None:
        self.store = store
        self.root = Path(root)
        self.max_total_rounds = max_total_rounds
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # API -----------------------------------------------------------------------------
    def start_job(self, spec: SimulationSpec) -> JobStatus:
        """Queue a campaign (or return the job already queued, running or finished).

        Raises:
            InvalidArgument: a bad setting or data source (the message names the field).
        """
        spec.config.validate()
        if bool(spec.embeddings_uri) == bool(spec.dataset_path):
            raise InvalidArgument("embeddings_uri or dataset_path: give exactly one")
        if spec.embeddings_uri:
            try:
                exists = self.store.exists(self.store.key_from_uri(spec.embeddings_uri))
            except HistoloopError as exc:
                raise InvalidArgument(f"embeddings_uri: {spec.embeddings_uri!r}: {exc}") from None
            if not exists:
                raise InvalidArgument(f"embeddings_uri: no artifact {spec.embeddings_uri!r}")
        elif not Path(spec.dataset_path).is_file():
            raise InvalidArgument(
                f"dataset_path: {spec.dataset_path!r} is not a file on the server"
            )
        job_id = spec.job_id()
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.status.state in ("queued", "running", "succeeded"):
                return self._status(job)
            self._jobs[job_id] = _Job(spec=spec, status=JobStatus(job_id=job_id, state="queued"))
        self._queue.put(job_id)
        log.info("simulation job %s queued", job_id)
        return self.get(job_id)

    def get(self, job_id: str) -> JobStatus:
        """A job's state and progress.

        Raises:
            NotFound: no such job (since this process started).
        """
        with self._lock:
            return self._status(self._find(job_id))

    def cancel(self, job_id: str) -> JobStatus:
        """Stop a queued or running job (a running one stops after its current round).

        Raises:
            NotFound: no such job.
        """
        with self._lock:
            job = self._find(job_id)
            job.cancel.set()
            if job.status.state == "queued":
                job.status = replace(job.status, state="cancelled")
            return self._status(job)

    # background loop -----------------------------------------------------------------
    def start(self) -> None:
        """Start the thread that runs the queued jobs."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="simulation-jobs", daemon=True)
            self._thread.start()

    def stop(self, timeout: float) -> None:
        """Cancel the running job and join the thread; safe to call twice."""
        self._stopping.set()
        with self._lock:
            for job in self._jobs.values():
                job.cancel.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            job_id = self._queue.get()
            if job_id is None:
                return
            with self._lock:
                job = self._jobs.get(job_id)
                if job is None or job.status.state != "queued":
                    continue
                job.started = time.perf_counter()
                job.status = replace(job.status, state="running")
            self._run(job)

    def _run(self, job: _Job) -> None:
        def on_progress(done: int, total: int) -> None:
            with self._lock:
                job.status = replace(job.status, rounds_done=done, rounds_total=total)
            if job.cancel.is_set():
                raise _Cancelled

        spec = job.spec
        try:
            data: Any = (
                read_anndata(self.store, spec.embeddings_uri)
                if spec.embeddings_uri
                else spec.dataset_path
            )
            result = run_campaign(
                data,
                spec.config,
                root=self.root,
                workers=1,
                resume=True,
                store=self.store,
                name=spec.name,
                progress=False,
                on_progress=on_progress,
                max_total_rounds=self.max_total_rounds,
            )
        except _Cancelled:
            self._finish(job, state="cancelled")
            log.info(
                "simulation job %s cancelled after %d rounds",
                job.status.job_id,
                job.status.rounds_done,
            )
        except HistoloopError as exc:
            self._finish(job, state="failed", error=str(exc), error_code=exc.code)
            log.warning("simulation job %s failed: %s", job.status.job_id, exc)
        except (ValueError, OSError) as exc:  # an unreadable data file
            self._finish(job, state="failed", error=f"data: {exc}", error_code=InvalidArgument.code)
            log.warning("simulation job %s failed: %s", job.status.job_id, exc)
        except Exception as exc:
            self._finish(job, state="failed", error=f"internal error: {exc}", error_code="INTERNAL")
            log.exception("simulation job %s failed", job.status.job_id)
        else:
            self._finish(job, state="succeeded" if result.complete else "cancelled", result=result)
            log.info(
                "simulation job %s: campaign %s in %.1f s",
                job.status.job_id,
                result.campaign_id,
                result.seconds,
            )

    def _finish(
        self,
        job: _Job,
        *,
        state: JobState,
        error: str = "",
        error_code: str = "",
        result: CampaignResult | None = None,
    ) -> None:
        with self._lock:
            job.status = replace(
                job.status,
                state=state,
                error=error,
                error_code=error_code,
                result=result,
                seconds=time.perf_counter() - job.started,
            )

    def _find(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"job_id: no simulation job {job_id!r}")
        return job

    def _status(self, job: _Job) -> JobStatus:
        if job.status.state == "running":
            return replace(job.status, seconds=time.perf_counter() - job.started)
        return job.status
