"""The tiling step of the loop: a registered dataset → stored patches → ``tiles.ready``.

Inputs come from the artifact store (the annotation store copied them there at
registration), so the service needs no shared filesystem. Patches are written under a
fresh prefix each attempt; only a complete run gets a result record (keyed by the event
id) and an event, so a crash mid-tiling leaves nothing that an event refers to, and a
redelivered event re-announces the recorded result instead of tiling twice.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from histoloop import events
from histoloop.artifacts.base import ArtifactStore
from histoloop.bus.base import EventBus
from histoloop.errors import FailedPrecondition, HistoloopError, InvalidArgument, NotFound
from histoloop.progress import ProgressBoard
from histoloop.tiling._tiling import tile_visium, tile_wsi
from histoloop.tiling._visium import HIRES_IMAGE, hires_scale, read_spatial
from histoloop.v1 import common_pb2, events_pb2

__all__ = ["TilingStep"]

log = logging.getLogger(__name__)
PRODUCER = "tiling"


class TilingStep:
    """Tiles datasets and announces the patches."""

    def __init__(self, store: ArtifactStore, bus: EventBus, *, workers: int | None = None) -> None:
        self.store = store
        self.bus = bus
        self.workers = workers
        self.progress = ProgressBoard()

    def _record_key(self, msg: events_pb2.DatasetRegistered) -> str:
        return f"tiles/{msg.meta.project}/{msg.meta.dataset}/result-{msg.meta.event_id}.json"

    def _registration_key(self, project: str, dataset: str) -> str:
        return f"tiles/{project}/{dataset}/registered.pb"

    def on_registered(self, msg: events_pb2.DatasetRegistered, _record: object = None) -> None:
        """Handle ``dataset.registered``."""
        project, dataset = msg.meta.project, msg.meta.dataset
        reg_key = self._registration_key(project, dataset)
        if not self.store.exists(reg_key):
            self.store.put(reg_key, msg.SerializeToString())
        record_key = self._record_key(msg)
        if self.store.exists(record_key):
            result = json.loads(self.store.get(record_key))
        else:
            self.progress.begin(project, dataset, "tiling")
            try:
                result = self._tile(msg)
            except Exception as exc:
                self.progress.finish(project, dataset, error=str(exc))
                raise
            self.store.put(record_key, json.dumps(result).encode(), content_type="application/json")
            self.progress.finish(project, dataset)
        self._announce(msg, result)

    def retile(self, project: str, dataset: str) -> dict:
        """Tile a registered dataset again (the TileDataset RPC) and announce it."""
        key = self._registration_key(project, dataset)
        if not self.store.exists(key):
            raise NotFound(
                f"dataset {project}/{dataset} was never registered with the tiling service"
            )
        msg = events_pb2.DatasetRegistered.FromString(self.store.get(key))
        msg.meta.event_id = str(uuid.uuid4())  # a new run, not a redelivery
        self.on_registered(msg)
        return json.loads(self.store.get(self._record_key(msg)))

    def _tile(self, msg: events_pb2.DatasetRegistered) -> dict:
        project, dataset = msg.meta.project, msg.meta.dataset
        prefix = f"tiles/{project}/{dataset}/{uuid.uuid4().hex[:12]}"
        with tempfile.TemporaryDirectory(prefix="histoloop-tiling-") as tmp:
            spatial_dir = self._fetch_spatial(msg, Path(tmp) / "spatial")
            spots_key = f"{prefix}/spots.csv"
            if spatial_dir is not None:
                positions = read_spatial(spatial_dir).positions
                buffer = io.StringIO()
                positions.to_csv(buffer, index=False)
                self.store.put(spots_key, buffer.getvalue().encode(), content_type="text/csv")
            result: dict = {
                "spots_uri": self.store.uri(spots_key) if spatial_dir is not None else "",
                "patches_uri": "",
                "index_uri": "",
                "overlay_uri": "",
                "n_tiles": 0,
            }
            hires = spatial_dir / HIRES_IMAGE if spatial_dir is not None else None
            scale = msg.slide_scale or 1.0
            if msg.slide_uri:
                slide = self.store.get_file(
                    self.store.key_from_uri(msg.slide_uri),
                    Path(tmp) / ("slide-" + msg.slide_uri.rsplit("/", 1)[-1]),
                )
            elif hires is not None and hires.is_file() and msg.kind != common_pb2.DATASET_KIND_WSI:
                slide, scale = hires, msg.slide_scale or hires_scale(hires.parent)
                log.info(
                    "tiling %s/%s: no slide registered; using spatial/%s with slide_scale %.6g",
                    project,
                    dataset,
                    HIRES_IMAGE,
                    scale,
                )
            else:
                if spatial_dir is None:
                    raise FailedPrecondition(
                        f"dataset {dataset} has neither a slide nor Space Ranger files"
                    )
                result["n_tiles"] = int((positions["in_tissue"] == 1).sum())
                return result

            def on_progress(done: int, total: int) -> None:
                self.progress.update(project, dataset, done, total)

            with _naming_the_slide(slide, msg.slide_uri):
                if msg.kind == common_pb2.DATASET_KIND_WSI or spatial_dir is None:
                    tiled = tile_wsi(
                        slide,
                        self.store,
                        prefix + "/wsi",
                        mpp=msg.mpp or None,
                        tile_size=msg.tile_size or 224,
                        workers=self.workers,
                        on_progress=on_progress,
                    )
                else:
                    tiled = tile_visium(
                        slide,
                        spatial_dir,
                        self.store,
                        prefix + "/visium",
                        context=msg.context or 1.0,
                        scale=scale,
                        workers=self.workers,
                        on_progress=on_progress,
                    )
            for warning in tiled.warnings:
                log.warning("tiling %s/%s: %s", project, dataset, warning)
            result.update(
                patches_uri=self.store.uri(tiled.manifest_key),
                index_uri=self.store.uri(tiled.index_key),
                overlay_uri=self.store.uri(tiled.overlay_key),
                n_tiles=tiled.n_patches,
            )
            return result

    def _fetch_spatial(self, msg: events_pb2.DatasetRegistered, folder: Path) -> Path | None:
        if not msg.spatial_uri_prefix:
            return None
        prefix = self.store.key_from_uri(msg.spatial_uri_prefix.rstrip("/")) + "/"
        infos = list(self.store.list(prefix))
        if not infos:
            raise NotFound(f"no Space Ranger files under {msg.spatial_uri_prefix}")
        for info in infos:
            self.store.get_file(info.key, folder / info.key[len(prefix) :])
        return folder

    def _announce(self, msg: events_pb2.DatasetRegistered, result: dict) -> None:
        message = events_pb2.TilesReady(
            meta=events.new_meta(
                project=msg.meta.project,
                dataset=msg.meta.dataset,
                producer=PRODUCER,
                event_id=events.derived_id(msg.meta.event_id, "tiles"),
                source_versions=dict(msg.meta.source_versions),
                trace_id=msg.meta.trace_id,
            ),
            patches_uri=result["patches_uri"],
            index_uri=result["index_uri"],
            overlay_uri=result["overlay_uri"],
            spots_uri=result["spots_uri"],
            expression_uri=msg.expression_uri,
            config=msg.config,
            n_tiles=int(result["n_tiles"]),
        )
        events.publish(self.bus, message)
        log.info("tiles ready for %s/%s: %d", msg.meta.project, msg.meta.dataset, result["n_tiles"])


@contextmanager
def _naming_the_slide(local: Path, slide_uri: str) -> Iterator[None]:
    """Errors about the slide name the user's file (and its artifact), not the temporary copy.

    A slide that cannot be read is bad input, not an outage: an error that is not already a
    histoloop error is raised as InvalidArgument, so the event is parked at once (RetryStage
    re-runs it once the slide is replaced).
    """
    try:
        yield
    except Exception as exc:
        text = str(exc)
        if str(local) not in text and local.name not in text:
            raise
        name = slide_uri.rsplit("/", 1)[-1]
        named = text.replace(str(local), name).replace(local.name, name) + f" (slide {slide_uri})"
        if isinstance(exc, HistoloopError):
            raise type(exc)(named) from exc
        raise InvalidArgument(f"slide_path: {named}") from exc
