"""The browser workspace as an ASGI (Starlette) app: pages, Deep Zoom tiles, overlay, labelling, live updates.

Every endpoint is a thin adapter over one RPC of the annotation store, the training or the
prediction service (see :mod:`histoloop.web.backends`), made with the signed-in annotator's token.
Bad input gets a 4xx with ``{"error": "<what, naming the field>"}`` and changes nothing.

Endpoints (``{p}`` a project id, ``{d}`` one of its dataset ids):

========================================================  ===========================================
``GET /``                                                 the workspace page (``?project=…``)
``GET /healthz``, ``GET /readyz``                         liveness; readiness (the store answers)
``GET /metrics``                                          Prometheus metrics (``histoloop_web_*``)
``GET /api/me``                                           auth mode, who is signed in, read-only
``POST /api/session``, ``DELETE /api/session``            sign in with an annotator token; sign out
``GET /api/projects/{p}``                                 project: classes, datasets, settings
``GET /api/projects/{p}/status``                          ``GetStatus`` (stage states when present)
``GET /api/projects/{p}/queryset``                        the latest query set
``GET /api/projects/{p}/models``                          model cards (learning curve)
``GET /api/projects/{p}/agreement``                       ``GetAgreement`` (``?dataset=``)
``GET /api/projects/{p}/events``                          server-sent events from ``WatchQuerySets``
``GET /api/projects/{p}/datasets/{d}/layer``              the overlay, binary (:mod:`.layer`)
``GET /api/projects/{p}/datasets/{d}/slide.json|.dzi``    Deep Zoom descriptor
``GET /api/projects/{p}/datasets/{d}/slide_files/L/C_R.jpeg``  a Deep Zoom tile (cached, ETag)
``POST /api/projects/{p}/datasets/{d}/labels``            one ``SubmitLabels`` batch
``GET /api/projects/{p}/datasets/{d}/export?kind=``       Loupe CSV: labels, queryset, predictions
``GET /api/projects/{p}/datasets/{d}/region?unit=[&as=]`` ``ProposeRegion``: click-to-region units
                                                          (``as``: by that annotator's own model)
========================================================  ===========================================
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as Message_

from histoloop.artifacts.base import ArtifactStore
from histoloop.config import Settings
from histoloop.errors import HistoloopError
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import prediction_pb2, training_pb2
from histoloop.web.backends import Backends, WebError, http_status
from histoloop.web.layer import encode_layer
from histoloop.web.metrics import EVENT_STREAMS, TILES, RequestMetrics, metrics_endpoint
from histoloop.web.sessions import COOKIE, Session, SessionStore
from histoloop.web.slides import Slide, SlideCache, TileCache, check_address

__all__ = ["STATIC", "WebApp", "create_app"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_EXPORTS = {
    "labels": pb.EXPORT_KIND_LABELS,
    "queryset": pb.EXPORT_KIND_QUERY_SET,
    "predictions": pb.EXPORT_KIND_PREDICTIONS,
}
_FORMATS = {
    "loupe": pb.EXPORT_FORMAT_LOUPE_CSV,
    "geojson": pb.EXPORT_FORMAT_GEOJSON,
    "png": pb.EXPORT_FORMAT_PNG,
}
_HEADER_TTL = 30.0
_KEEPALIVE = 15.0
_MAX_BODY = 8 * 1024 * 1024
_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
)
"""Everything from this origin only (no CDN); inline style attributes for the panels' swatches."""
_LOCAL = Session(token="", subject="local", read_only=False, expires=float("inf"))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _message(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _check_id(value: str, what: str) -> str:
    if not _ID.match(value):
        raise WebError(400, f"{what} {value[:40]!r} is not a valid id")
    return value


@dataclass
class _Header:
    layer: pb.UnitLayer
    fetched: float


class WebApp:
    """The workspace's state (clients, caches, sessions) and its request handlers."""

    def __init__(self, settings: Settings, store: ArtifactStore, backends: Backends) -> None:
        """Wire the handlers.

        Args:
            settings: ``web_*`` settings and the data folder (slide cache).
            store: the artifact store slides are read from.
            backends: gRPC clients of the store and training service.
        """
        self.settings = settings
        self.backends = backends
        self.sessions = SessionStore(settings.web_session_hours * 3600)
        self.slides = SlideCache(store, settings.data_dir / "web-cache")
        self.tiles = TileCache()
        self.viewers = {v.strip() for v in settings.web_viewers.split(",") if v.strip()}
        self._headers: dict[tuple[str, str], _Header] = {}
        self._lock = threading.Lock()

    # sessions -----------------------------------------------------------------------------
    async def session(self, request: Request, project: str | None = None) -> Session:
        """The caller's session; with ``project``, also checks (once) that the store lets them in."""
        if not self.backends.auth:
            return _LOCAL
        try:
            session = self.sessions.get(request.cookies.get(COOKIE))
        except HistoloopError as exc:
            raise WebError(401, str(exc)) from None
        if project is not None and project not in session.projects:
            await run_in_threadpool(
                self.backends.call,
                self.backends.store.GetProject,
                pb.GetProjectRequest(project_id=project),
                session.token,
            )
            session.projects.add(project)
        return session

    async def me(self, request: Request) -> JSONResponse:
        """Who is signed in."""
        if not self.backends.auth:
            return JSONResponse(
                {"auth": False, "signed_in": True, "subject": "local", "read_only": False}
            )
        try:
            session = self.sessions.get(request.cookies.get(COOKIE))
        except HistoloopError:
            return JSONResponse({"auth": True, "signed_in": False})
        return JSONResponse(
            {
                "auth": True,
                "signed_in": True,
                "subject": session.subject,
                "read_only": session.read_only,
            }
        )

    async def sign_in(self, request: Request) -> Response:
        """Check an annotator token with the store (``GetProject``) and start a session."""
        body = await _json(request)
        token, project = body.get("token"), body.get("project")
        if not isinstance(token, str) or not token.strip():
            raise WebError(400, "token: give your annotator token")
        if not isinstance(project, str):
            raise WebError(400, "project: give the project to open")
        _check_id(project, "project")
        if not self.backends.auth:
            return JSONResponse({"subject": "local", "read_only": False})
        reply = await run_in_threadpool(
            self.backends.call,
            self.backends.store.GetProject,
            pb.GetProjectRequest(project_id=project),
            token.strip(),
        )
        subject = ""
        if reply.datasets:
            header = await run_in_threadpool(
                self.backends.call,
                self.backends.store.GetUnitLayer,
                pb.GetUnitLayerRequest(
                    project_id=project, dataset_id=reply.datasets[0], header_only=True
                ),
                token.strip(),
            )
            subject = header.caller
        read_only = bool(body.get("view_only")) or subject in self.viewers
        sid, session = self.sessions.create(
            token.strip(), subject, read_only=read_only, projects={project}
        )
        response = JSONResponse({"subject": subject, "read_only": read_only})
        response.set_cookie(
            COOKIE,
            sid,
            max_age=int(self.sessions.lifetime),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        log.info(
            "signed in %s to project %s%s",
            subject or "(unknown)",
            project,
            " (read-only)" if read_only else "",
        )
        return response

    async def sign_out(self, request: Request) -> Response:
        """End the session."""
        self.sessions.drop(request.cookies.get(COOKIE))
        response = JSONResponse({"signed_in": False})
        response.delete_cookie(COOKIE, path="/")
        return response

    # project-wide reads -------------------------------------------------------------------
    async def _rpc(self, request: Request, project: str, method: Any, message: Any) -> Any:
        session = await self.session(request, project)
        return await run_in_threadpool(self.backends.call, method, message, session.token)

    async def project(self, request: Request) -> JSONResponse:
        """The project: classes, datasets, loop settings."""
        p = _check_id(request.path_params["project"], "project")
        reply = await self._rpc(
            request, p, self.backends.store.GetProject, pb.GetProjectRequest(project_id=p)
        )
        return JSONResponse(_message(reply))

    async def status(self, request: Request) -> JSONResponse:
        """``GetStatus`` as JSON; new fields (stage states) pass through as they are."""
        p = _check_id(request.path_params["project"], "project")
        reply = await self._rpc(
            request, p, self.backends.store.GetStatus, pb.GetStatusRequest(project_id=p)
        )
        return JSONResponse(_message(reply))

    async def query_set(self, request: Request) -> JSONResponse:
        """The latest query set."""
        p = _check_id(request.path_params["project"], "project")
        reply = await self._rpc(
            request, p, self.backends.store.GetQuerySet, pb.GetQuerySetRequest(project_id=p)
        )
        return JSONResponse(_message(reply))

    async def models(self, request: Request) -> JSONResponse:
        """Model cards, oldest first: the learning curve."""
        p = _check_id(request.path_params["project"], "project")
        await self.session(
            request, p
        )  # the store confirms membership; then the service token reads
        reply = await run_in_threadpool(
            self.backends.call,
            self.backends.training.ListModels,
            training_pb2.ListModelsRequest(project_id=p),
            "",
        )
        return JSONResponse(
            {
                "models": [
                    {
                        "model_version": m.model_version,
                        "label_version": m.label_version,
                        "head": m.head,
                        "n_train": m.metrics.n_train,
                        "n_val": m.metrics.n_val,
                        "macro_f1": m.metrics.macro_f1,
                        "balanced_accuracy": m.metrics.balanced_accuracy,
                        "raters": list(m.raters),
                    }
                    for m in reply.models
                ]
            }
        )

    async def agreement(self, request: Request) -> JSONResponse:
        """``GetAgreement`` (kappas, disputed units) for the project or one dataset."""
        p = _check_id(request.path_params["project"], "project")
        dataset = request.query_params.get("dataset", "")
        if dataset:
            _check_id(dataset, "dataset")
        reply = await self._rpc(
            request,
            p,
            self.backends.store.GetAgreement,
            pb.GetAgreementRequest(project_id=p, dataset_id=dataset),
        )
        return JSONResponse(_message(reply))

    async def events(self, request: Request) -> Response:
        """Server-sent events: ``queryset`` each time the store publishes one for the project."""
        p = _check_id(request.path_params["project"], "project")
        session = await self.session(request, p)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        stream = self.backends.store.WatchQuerySets(
            pb.WatchQuerySetsRequest(project_id=p, include_latest=False),
            metadata=self.backends.metadata(session.token),
        )

        def pump() -> None:
            try:
                for query_set in stream:
                    summary = {
                        "queryset_id": query_set.queryset_id,
                        "round": query_set.round,
                        "n": len(query_set.spots),
                        "strategy": query_set.strategy,
                        "model_version": query_set.model_version,
                    }
                    loop.call_soon_threadsafe(queue.put_nowait, ("queryset", summary))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    loop.call_soon_threadsafe(
                        queue.put_nowait, ("error", {"error": exc.details() or ""})
                    )
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=pump, name=f"sse-{p}", daemon=True).start()

        async def body() -> AsyncIterator[str]:
            EVENT_STREAMS.inc()
            try:
                yield "retry: 2000\n\n"
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), _KEEPALIVE)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if item is None:
                        return
                    kind, data = item
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
            finally:
                EVENT_STREAMS.dec()
                stream.cancel()

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # one dataset --------------------------------------------------------------------------
    def _ids(self, request: Request) -> tuple[str, str]:
        return (
            _check_id(request.path_params["project"], "project"),
            _check_id(request.path_params["dataset"], "dataset"),
        )

    async def layer(self, request: Request) -> Response:
        """Every unit of the dataset, binary columns (gzip when the browser accepts it)."""
        p, d = self._ids(request)
        reply = await self._rpc(
            request,
            p,
            self.backends.store.GetUnitLayer,
            pb.GetUnitLayerRequest(project_id=p, dataset_id=d),
        )
        data = await run_in_threadpool(encode_layer, reply)
        headers = {"Cache-Control": "no-store", "X-Units": str(len(reply.unit_ids))}
        if "gzip" in request.headers.get("accept-encoding", ""):
            data = await run_in_threadpool(gzip.compress, data, 1)
            headers["Content-Encoding"] = "gzip"
        return Response(data, media_type="application/octet-stream", headers=headers)

    async def region(self, request: Request) -> JSONResponse:
        """``ProposeRegion``: the units the model (``?as=``: that annotator's model) gives the
        clicked unit's class, connected to it."""
        p, d = self._ids(request)
        unit = request.query_params.get("unit", "")
        if not unit:
            raise WebError(400, "unit: give the clicked unit's id (?unit=)")
        await self.session(request, p)  # the store confirms membership; then the service token asks
        ask = prediction_pb2.ProposeRegionRequest(
            project_id=p, dataset_id=d, unit=unit, annotator_id=request.query_params.get("as", "")
        )
        reply = await run_in_threadpool(
            self.backends.call, self.backends.prediction.ProposeRegion, ask, ""
        )
        return JSONResponse(_message(reply))

    async def _slide(self, request: Request) -> Slide:
        p, d = self._ids(request)
        session = await self.session(request, p)
        with self._lock:
            cached = self._headers.get((p, d))
        if cached is None or time.monotonic() - cached.fetched > _HEADER_TTL:
            header = await run_in_threadpool(
                self.backends.call,
                self.backends.store.GetUnitLayer,
                pb.GetUnitLayerRequest(project_id=p, dataset_id=d, header_only=True),
                session.token,
            )
            cached = _Header(header, time.monotonic())
            with self._lock:
                self._headers[(p, d)] = cached
        h = cached.layer
        opened = self.slides.opened(h.slide_uri, h.spatial_uri_prefix, h.coordinates)
        if opened is not None:  # the common case, without a thread hop
            return opened
        return await run_in_threadpool(
            self.slides.slide, h.slide_uri, h.spatial_uri_prefix, h.coordinates
        )

    async def slide_json(self, request: Request) -> JSONResponse:
        """The Deep Zoom descriptor in OpenSeadragon's inline form, with the overlay's unit scale."""
        slide = await self._slide(request)
        described = slide.describe()
        image = described["Image"]
        assert isinstance(image, dict)  # the descriptor's "Image" object
        image["Url"] = (
            str(
                request.url_for(
                    "slide_tile",
                    project=request.path_params["project"],
                    dataset=request.path_params["dataset"],
                    level="0",
                    tile="0_0.jpeg",
                )
            ).rsplit("/0/0_0.jpeg", 1)[0]
            + "/"
        )
        return JSONResponse(described)

    async def slide_dzi(self, request: Request) -> Response:
        """The ``.dzi`` XML."""
        slide = await self._slide(request)
        return Response(slide.dzi(), media_type="application/xml")

    async def slide_tile(self, request: Request) -> Response:
        """One Deep Zoom tile: 304 on a matching ETag, else from the cache or rendered."""
        tile = request.path_params["tile"]
        if not tile.endswith(".jpeg") or "_" not in tile:
            raise WebError(404, f"tile {tile[:40]!r}: expected <column>_<row>.jpeg")
        col, row = tile[: -len(".jpeg")].split("_", 1)
        level, c, r = check_address(request.path_params["level"], col, row)
        slide = await self._slide(request)
        try:
            slide.check_tile(level, c, r)
        except HistoloopError as exc:
            raise WebError(404, str(exc)) from None
        etag = slide.etag(level, c, r)
        headers = {"ETag": etag, "Cache-Control": "private, max-age=86400"}
        if request.headers.get("if-none-match") == etag:
            TILES.labels("not_modified").inc()
            return Response(status_code=304, headers=headers)
        data = self.tiles.cached(slide, level, c, r)  # a cached tile is sent without a thread hop
        if data is None:
            hits = self.tiles.hits
            data = await run_in_threadpool(self.tiles.get, slide, level, c, r)
            TILES.labels("cache" if self.tiles.hits > hits else "rendered").inc()
        else:
            TILES.labels("cache").inc()
        return Response(data, media_type="image/jpeg", headers=headers)

    async def submit(self, request: Request) -> JSONResponse:
        """One ``SubmitLabels`` batch from the page: ``{labels: [{unit, label}], queryset_id, batch_id}``."""
        p, d = self._ids(request)
        session = await self.session(request, p)
        if session.read_only:
            raise WebError(
                403, f"{session.subject or 'this session'} is read-only: labels are not accepted"
            )
        body = await _json(request)
        labels = body.get("labels")
        if not isinstance(labels, list) or not labels:
            raise WebError(400, "labels: give a non-empty list of {unit, label}")
        if len(labels) > self.settings.web_max_batch:
            raise WebError(
                413,
                f"labels: {len(labels)} labels in one batch; at most "
                f"{self.settings.web_max_batch} are accepted",
            )
        spots = []
        for i, item in enumerate(labels):
            if not isinstance(item, dict):
                raise WebError(400, f"labels[{i}]: expected an object with unit and label")
            unit, label = item.get("unit"), item.get("label")
            if not isinstance(unit, str) or not unit:
                raise WebError(400, f"labels[{i}].unit: expected a unit id")
            if not isinstance(label, str) or not label:
                raise WebError(400, f"labels[{i}].label: expected a class name")
            spots.append(pb.SpotLabel(barcode=unit, label=label))
        queryset_id = body.get("queryset_id") or ""
        batch_id = body.get("batch_id") or f"web-{uuid.uuid4()}"
        if not isinstance(queryset_id, str) or not isinstance(batch_id, str):
            raise WebError(400, "queryset_id and batch_id must be strings")
        reply = await run_in_threadpool(
            self.backends.call,
            self.backends.store.SubmitLabels,
            pb.SubmitLabelsRequest(
                project_id=p,
                dataset_id=d,
                batch_id=batch_id,
                labels=spots,
                source=pb.LABEL_SOURCE_GRPC,
                queryset_id=queryset_id,
            ),
            session.token,
        )
        return JSONResponse(_message(reply))

    async def export(self, request: Request) -> Response:
        """Labels, the query set or the predictions as a download: Loupe CSV, QuPath GeoJSON or PNG."""
        p, d = self._ids(request)
        kind = request.query_params.get("kind", "labels")
        if kind not in _EXPORTS:
            raise WebError(400, f"kind {kind[:40]!r}: choose one of {', '.join(_EXPORTS)}")
        form = request.query_params.get("format", "loupe")
        if form not in _FORMATS:
            raise WebError(400, f"format {form[:40]!r}: choose one of {', '.join(_FORMATS)}")
        reply = await self._rpc(
            request,
            p,
            self.backends.store.ExportLabels,
            pb.ExportLabelsRequest(
                project_id=p, dataset_id=d, kind=_EXPORTS[kind], format=_FORMATS[form]
            ),
        )
        return Response(
            reply.content or reply.csv,
            media_type=reply.media_type or "text/csv",
            headers={"Content-Disposition": f'attachment; filename="{reply.filename}"'},
        )

    # health -------------------------------------------------------------------------------
    async def readyz(self, request: Request) -> JSONResponse:
        """Ready when the annotation store answers its health check."""
        stub = health_pb2_grpc.HealthStub(self.backends.store_channel)
        try:
            reply = await run_in_threadpool(
                stub.Check,
                health_pb2.HealthCheckRequest(service="histoloop.v1.AnnotationStoreService"),
                timeout=3,
            )
        except grpc.RpcError as exc:
            return _error(
                503, f"annotation store at {self.backends.store_address}: {exc.code().name}"
            )
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return _error(503, f"annotation store at {self.backends.store_address} is not serving")
        return JSONResponse({"status": "ready"})


async def _json(request: Request) -> dict[str, Any]:
    if "application/json" not in request.headers.get("content-type", ""):
        raise WebError(415, "send JSON (Content-Type: application/json)")
    body = await request.body()
    if len(body) > _MAX_BODY:
        raise WebError(413, f"request body of {len(body)} bytes; at most {_MAX_BODY} are accepted")
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise WebError(400, f"body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise WebError(400, "body: expected a JSON object")
    return value


def _guard(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except WebError as exc:
            return _error(exc.status, exc.message)
        except HistoloopError as exc:
            return _error(http_status(exc.code), str(exc))

    return wrapped


class _SecurityHeaders:
    """Adds a strict Content-Security-Policy and friends to every HTTP response (pure ASGI)."""

    _HEADERS = [
        (b"content-security-policy", _CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
        (b"x-frame-options", b"DENY"),
    ]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message_) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *self._HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(settings: Settings, store: ArtifactStore, backends: Backends) -> Starlette:
    """The workspace as an ASGI app (see the module docstring for its endpoints)."""
    web = WebApp(settings, store, backends)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    api = "/api/projects/{project}"
    ds = api + "/datasets/{dataset}"
    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/metrics", metrics_endpoint),
        Route("/readyz", _guard(web.readyz)),
        Route("/api/me", _guard(web.me)),
        Route("/api/session", _guard(web.sign_in), methods=["POST"]),
        Route("/api/session", _guard(web.sign_out), methods=["DELETE"]),
        Route(api, _guard(web.project)),
        Route(api + "/status", _guard(web.status)),
        Route(api + "/queryset", _guard(web.query_set)),
        Route(api + "/models", _guard(web.models)),
        Route(api + "/agreement", _guard(web.agreement)),
        Route(api + "/events", _guard(web.events)),
        Route(ds + "/layer", _guard(web.layer)),
        Route(ds + "/slide.json", _guard(web.slide_json)),
        Route(ds + "/slide.dzi", _guard(web.slide_dzi)),
        Route(ds + "/slide_files/{level}/{tile}", _guard(web.slide_tile), name="slide_tile"),
        Route(ds + "/labels", _guard(web.submit), methods=["POST"]),
        Route(ds + "/export", _guard(web.export)),
        Route(ds + "/region", _guard(web.region)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes, middleware=[Middleware(RequestMetrics), Middleware(_SecurityHeaders)]
    )
    app.state.web = web
    return app
