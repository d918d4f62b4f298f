"""The browser workspace: overlay payload, first view, pan/zoom fps, Deep Zoom tiles/s, labels → next query drawn.

Three parts, each on a fresh embedded stack in a temporary folder (nothing to set up;
the data come from ``../shared/data``; the browser is Debian's ``/usr/bin/chromium``
driven by Playwright):

1. **100,000 units**: the annotation store alone (no tiling, so nothing else competes)
   with a project whose dataset is a 290 × 345 grid of 100,050 units over
   CMU-1-Small-Region.svs, registered through ``RegisterDataset``. It reports the overlay
   payload (raw and gzip), the time to the first interactive view in headless Chromium
   (navigation start → slide open and overlay drawn, ``performance.mark``), and the
   frame rate while the viewport pans and zooms continuously for ``--seconds``
   (``requestAnimationFrame`` count; the 95th percentile of the gaps between frames and how
   many exceeded 33 ms), with the time of each moving-frame overlay update
   and of the full overlay redraws (every unit filled: all 100,050 carry a label). The
   first view is also split into its steps (the page's ``histoloop-*`` marks and the layer
   request's resource timing); each load starts once the workspace handles no request (its
   ``histoloop_web_requests_in_flight`` gauge), so that the store reads the last page's panels
   started (GetStatus, GetAgreement) do not fall into the next first view; the home view is fully redrawn five times each way in
   the same page: one canvas path per colour, pixels written into an ImageData, and the
   page's own choice; and the pan/zoom is repeated in a page forced onto OpenSeadragon's
   WebGL drawer (``?drawer=webgl``), which the page leaves for the 2D canvas when WebGL is
   a software renderer.
2. **Deep Zoom tiles/s** on the same slide: every tile of the top ``--levels`` levels,
   fetched over HTTP by ``--clients`` concurrent clients, cold (empty tile cache) and warm
   (cached), against a bare loop of ``DeepZoomGenerator.get_tile`` (+ the JPEG encoding any
   tile server needs) in this process, same run.
3. **Labels → next query drawn** on DLPFC 151510: all six services embedded; the page
   labels each query set with hotkeys and sends it; the time from send to the next query
   set drawn on the page (``--rounds`` rounds, median).

    nice .venv/bin/python benchmarks/bench_web.py
    nice .venv/bin/python benchmarks/bench_web.py --tiles-only --repeat 3   # part 2 alone, three times
    .venv/bin/python benchmarks/bench_web.py --quick   # checks the script works (not a measurement)

``--quick``: part 1 on a 40 × 30 grid (1,200 units) with one page load and a 0.5 s pan/zoom,
part 2 on the top 2 levels with 2 clients, part 3 skipped (``--quick --rounds 1`` runs one
DLPFC round too); nothing is written unless ``--json`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from histoloop.config import load_settings  # noqa: E402
from histoloop.runtime import settle_heap  # noqa: E402
from histoloop.server import Server  # noqa: E402
from histoloop.v1 import annotation_store_pb2 as pb  # noqa: E402
from histoloop.v1 import annotation_store_pb2_grpc, common_pb2  # noqa: E402
from histoloop.web import WebServer  # noqa: E402

SHARED = Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDE = SHARED / "wsi" / "CMU-1-Small-Region.svs"
DLPFC = SHARED / "dlpfc" / "151510"
CHROMIUM = os.environ.get("HISTOLOOP_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
LAYERS = ["Layer1", "Layer2", "Layer3", "Layer4", "Layer5", "Layer6", "WM"]

FPS = """async (seconds) => {
  const v = window.__histoloop.viewer;
  v.viewport.goHome(true);
  const drawn = window.__histoloop.drawMs.length;
  const full = window.__histoloop.fullDrawMs.slice(-5);
  let frames = 0; const t0 = performance.now(); const gaps = []; let last = t0;
  return await new Promise((resolve) => {
    function step(t) {
      frames++; gaps.push(t - last); last = t;
      const k = (t - t0) / 1000;
      v.viewport.panBy(new OpenSeadragon.Point(0.004 * Math.cos(k * 2), 0.004 * Math.sin(k * 2)), true);
      v.viewport.zoomBy(Math.floor(k) % 2 === 0 ? 1.02 : 1 / 1.02, null, true);
      if (t - t0 < seconds * 1000) requestAnimationFrame(step);
      else {
        const ms = window.__histoloop.drawMs.slice(drawn).sort((a, b) => a - b);
        gaps.sort((a, b) => a - b);
        resolve({fps: frames * 1000 / (t - t0), moving_draws: ms.length,
                 frame_ms_p95: gaps[Math.floor(gaps.length * 0.95)],
                 frames_over_33ms: gaps.filter((g) => g > 1000 / 30).length, frames,
                 moving_draw_ms_median: ms[Math.floor(ms.length / 2)] || 0,
                 full_redraw_ms: full});
      }
    }
    requestAnimationFrame(step);
  });
}"""


STEPS = """() => {
  const out = Object.fromEntries(performance.getEntriesByType('mark')
    .filter((m) => m.name.startsWith('histoloop-')).map((m) => [m.name.slice(10), m.startTime / 1000]));
  const layer = performance.getEntriesByType('resource').find((r) => r.name.endsWith('/layer'));
  if (layer) Object.assign(out, {'layer-request': layer.requestStart / 1000, 'layer-response': layer.responseEnd / 1000});
  return out;
}"""

REDRAW = """(render) => {
  const st = window.__histoloop;
  if (!st.redraw) return null;  // a page from before the raster path
  st.viewer.viewport.goHome(true);
  st.render = render;
  const ms = [];
  for (let k = 0; k < 5; k++) { const t = performance.now(); st.redraw(); ms.push(performance.now() - t); }
  const used = st.rendered;
  st.render = 'auto';
  return {render: used, ms};
}"""


def _wait_idle(base: str, timeout: float = 120.0) -> float:
    """Wait until the workspace handles no request (the last page's panel reads included); the seconds waited."""
    started = time.monotonic()
    with httpx.Client(base_url=base, timeout=30) as client:
        while time.monotonic() - started < timeout:
            if "histoloop_web_requests_in_flight 0.0" in client.get("/metrics").text:
                break
            time.sleep(0.2)
    return time.monotonic() - started


def _stack(folder: Path, services: list[str]) -> tuple[Server, WebServer]:
    settings = load_settings(data_dir=folder, grpc_port=0, metrics_port=0, web_port=0)
    server = Server(settings, services)
    server.start()
    web = WebServer(settings, store_address=f"127.0.0.1:{server.port}")
    web.start()
    settle_heap()  # as `histoloop serve` does once started
    return server, web


def _shown_page(browser, base: str, query: str):
    """A new page of the workspace, once its first view is interactive."""
    context = browser.new_context(viewport={"width": 1400, "height": 860})
    page = context.new_page()
    page.goto(f"{base}/{query}")
    page.wait_for_function(
        "() => window.__histoloop && window.__histoloop.ready === true", timeout=120_000
    )
    return context, page


def _settled_page(browser, base: str, query: str):
    """A page of the workspace, shown and with the panels' store reads ended (pan/zoom is measured on it)."""
    _wait_idle(base)
    context, page = _shown_page(browser, base, query)
    page.wait_for_timeout(3500)  # the panels' reads start at most 3 s after the first view
    _wait_idle(base)
    return context, page


def _grid_dataset(folder: Path, cols: int, rows: int, step: float) -> Path:
    spatial = folder / "grid" / "spatial"
    spatial.mkdir(parents=True)
    with open(spatial / "tissue_positions_list.csv", "w") as out:
        for r in range(rows):
            for c in range(cols):
                out.write(f"r{r}_c{c},1,{r},{c},{step * (r + 0.5):.1f},{step * (c + 0.5):.1f}\n")
    (spatial / "scalefactors_json.json").write_text(
        json.dumps(
            {"spot_diameter_fullres": step, "tissue_hires_scalef": 1.0, "tissue_lowres_scalef": 1.0}
        )
    )
    return spatial


@contextlib.contextmanager
def _grid_project(cols: int, rows: int, out: dict) -> Iterator[WebServer]:
    """The store alone (no training: nothing competes) and the workspace, with project "big": a
    ``cols`` × ``rows`` grid of units over CMU-1-Small-Region.svs, every unit labelled."""
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        server, web = _stack(Path(tmp), ["annotation_store"])  # no training: nothing competes
        try:
            store = annotation_store_pb2_grpc.AnnotationStoreServiceStub(
                grpc.insecure_channel(f"127.0.0.1:{server.port}")
            )
            store.CreateProject(
                pb.CreateProjectRequest(
                    project_id="big",
                    name=f"{cols * rows:,} units",
                    classes=[
                        common_pb2.ClassDef(name=n) for n in ("tumour", "stroma", "immune", "other")
                    ],
                )
            )
            spatial = _grid_dataset(Path(tmp), cols, rows, 7.6)
            t = time.perf_counter()
            store.RegisterDataset(
                pb.RegisterDatasetRequest(
                    project_id="big",
                    dataset_id="grid",
                    spatial_dir=str(spatial),
                    slide_path=str(SLIDE),
                    kind=common_pb2.DATASET_KIND_VISIUM,
                )
            )
            out["register_s"] = time.perf_counter() - t
            # every unit labelled (random classes): the overlay then fills every unit (100,050 by default)
            rng = random.Random(0)
            labels = [
                pb.SpotLabel(
                    barcode=f"r{r}_c{c}", label=rng.choice(("tumour", "stroma", "immune", "other"))
                )
                for r in range(rows)
                for c in range(cols)
            ]
            store.SubmitLabels(
                pb.SubmitLabelsRequest(
                    project_id="big", dataset_id="grid", batch_id="all", labels=labels
                ),
                timeout=600,
            )
            yield web
        finally:
            web.stop()
            server.stop(2)


def part_big(args: argparse.Namespace, browser, out: dict) -> None:
    with _grid_project(args.cols, args.rows, out) as web:
        base = web.url.rstrip("/")
        with httpx.Client(base_url=base, timeout=120) as client:
            raw = client.get(
                "/api/projects/big/datasets/grid/layer", headers={"Accept-Encoding": "identity"}
            )
            zipped = client.get(
                "/api/projects/big/datasets/grid/layer", headers={"Accept-Encoding": "gzip"}
            )
            out["units"] = int(raw.headers["x-units"])
            out["payload_bytes"] = len(raw.content)
            out["payload_gzip_bytes"] = int(
                zipped.headers.get("content-length") or len(gzip.compress(raw.content, 1))
            )
            t = time.perf_counter()
            for _ in range(3):
                client.get("/api/projects/big/datasets/grid/layer")
            out["layer_request_s"] = (time.perf_counter() - t) / 3
        interactive, steps, waited = [], [], []
        for _ in range(args.repeat):
            waited.append(
                _wait_idle(base)
            )  # the last load's store reads must not fall into this one
            context, page = _shown_page(browser, base, "?project=big")
            interactive.append(
                page.evaluate("performance.getEntriesByName('histoloop-interactive')[0].startTime")
                / 1000
            )
            steps.append(page.evaluate(STEPS))
            context.close()
        out["first_interactive_s"] = interactive
        out["first_view_steps_s"] = steps  # navigation start → each step, per page load
        out["idle_wait_before_load_s"] = waited
        # the same motion with OpenSeadragon's default drawer (WebGL), which the page leaves
        # for the 2D canvas when WebGL is a software renderer: same run, same slide
        context, page = _settled_page(browser, base, "?project=big&drawer=webgl")
        out["pan_zoom_webgl_drawer"] = page.evaluate(FPS, args.seconds)
        context.close()
        context, page = _settled_page(browser, base, "?project=big")
        out["drawer"] = page.evaluate("window.__histoloop.viewer.drawer.getType()")
        out["pan_zoom"] = page.evaluate(FPS, args.seconds)
        # the same motion with the overlay switched off: OpenSeadragon alone, same run
        layer = page.evaluate_handle(
            "(() => { const l = window.__histoloop.layer; "
            "window.__histoloop.layer = null; return l; })()"
        )
        page.wait_for_timeout(500)
        out["pan_zoom_without_overlay"] = page.evaluate(FPS, args.seconds)
        page.evaluate("(l) => { window.__histoloop.layer = l; }", layer)
        page.wait_for_timeout(1000)
        # full redraws of the home view, five each way in the same page: unit paths, pixel writes, the default
        for render in ("path", "raster", "auto"):
            out[f"full_redraw_{render}"] = page.evaluate(REDRAW, render)
        out["fps_ratio_overlay_vs_none"] = (
            out["pan_zoom"]["fps"] / out["pan_zoom_without_overlay"]["fps"]
        )
        out["fps_ratio_page_vs_webgl_drawer"] = (
            out["pan_zoom"]["fps"] / out["pan_zoom_webgl_drawer"]["fps"]
        )
        context.close()
        part_tiles(args, web, out)


def part_tiles_only(args: argparse.Namespace, out: dict) -> None:
    """Part 2 alone, ``--repeat`` times on one server (a 40 × 30 grid: the units do not enter it)."""
    runs = []
    with _grid_project(40, 30, out) as web:
        for _ in range(args.repeat):
            part_tiles(args, web, out)
            runs.append(out.pop("tiles"))
    out["tiles_runs"] = runs


def part_tiles(args: argparse.Namespace, web: WebServer, out: dict) -> None:
    import io

    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    dz = DeepZoomGenerator(
        openslide.OpenSlide(str(SLIDE)), tile_size=254, overlap=1, limit_bounds=False
    )
    top = dz.level_count - 1
    addresses = [
        (level, c, r)
        for level in range(top - args.levels + 1, top + 1)
        for c in range(dz.level_tiles[level][0])
        for r in range(dz.level_tiles[level][1])
    ]
    t = time.perf_counter()
    for level, c, r in addresses:
        dz.get_tile(level, (c, r))
    bare = len(addresses) / (time.perf_counter() - t)
    t = time.perf_counter()
    for level, c, r in addresses:
        buffer = io.BytesIO()
        dz.get_tile(level, (c, r)).save(buffer, "JPEG", quality=80)
    bare_jpeg = len(addresses) / (time.perf_counter() - t)
    base = web.url.rstrip("/") + "/api/projects/big/datasets/grid/slide_files"
    local = threading.local()
    clients: list[
        httpx.Client
    ] = []  # closed at the end, so that one run's connections do not linger into the next

    def fetch(address: tuple[int, int, int]) -> int:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=60)
            clients.append(local.client)
        level, c, r = address
        reply = local.client.get(f"{base}/{level}/{c}_{r}.jpeg")
        reply.raise_for_status()
        return len(reply.content)

    with (
        httpx.Client() as client
    ):  # open the slide once (copy to the cache, open) outside the timing
        client.get(f"{base}/{top}/0_0.jpeg").raise_for_status()
    web.app.state.web.tiles._tiles.clear()
    rates = {}
    with ThreadPoolExecutor(args.clients) as pool:
        for phase in ("cold", "warm"):
            t = time.perf_counter()
            list(pool.map(fetch, addresses))
            rates[phase] = len(addresses) / (time.perf_counter() - t)
    for client in clients:
        client.close()
    out["tiles"] = {
        "n": len(addresses),
        "bare_get_tile_per_s": bare,
        "bare_get_tile_jpeg_per_s": bare_jpeg,
        "http_cold_per_s": rates["cold"],
        "http_warm_per_s": rates["warm"],
        "cold_vs_bare": rates["cold"] / bare,
        "cold_vs_bare_jpeg": rates["cold"] / bare_jpeg,
        "warm_vs_bare": rates["warm"] / bare,
    }


def part_dlpfc(args: argparse.Namespace, browser, out: dict) -> None:
    import anndata as ad

    truth = (
        ad.read_h5ad(DLPFC / "dlpfc151510_500genes.h5ad")
        .obs["layer"]
        .astype("object")
        .dropna()
        .astype(str)
    )
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        server, web = _stack(
            Path(tmp),
            ["annotation_store", "tiling", "embedding", "training", "prediction", "acquisition"],
        )
        try:
            store = annotation_store_pb2_grpc.AnnotationStoreServiceStub(
                grpc.insecure_channel(f"127.0.0.1:{server.port}")
            )
            store.CreateProject(
                pb.CreateProjectRequest(
                    project_id="dlpfc",
                    name="DLPFC 151510",
                    classes=[common_pb2.ClassDef(name=n) for n in LAYERS],
                    config=common_pb2.LoopConfig(
                        features=common_pb2.FEATURE_SET_EXPRESSION,
                        query_size=20,
                        spatial_neighbours=6,
                    ),
                )
            )
            store.RegisterDataset(
                pb.RegisterDatasetRequest(
                    project_id="dlpfc",
                    dataset_id="151510",
                    kind=common_pb2.DATASET_KIND_VISIUM,
                    spatial_dir=str(DLPFC / "spatial"),
                    expression_path=str(DLPFC / "dlpfc151510_500genes.h5ad"),
                )
            )
            context = browser.new_context(viewport={"width": 1400, "height": 860})
            page = context.new_page()
            page.goto(f"{web.url}?project=dlpfc")
            deadline = time.monotonic() + 300
            while True:  # the cold-start query set first
                page.wait_for_function(
                    "() => window.__histoloop && window.__histoloop.ready === true", timeout=300_000
                )
                if page.evaluate("window.__histoloop.query.length") or time.monotonic() > deadline:
                    break
                page.wait_for_timeout(1000)
                page.reload()
            for k in range(args.rounds):
                before = page.evaluate("window.__histoloop.round")
                ids = page.evaluate(
                    "window.__histoloop.query.map(i => window.__histoloop.layer.ids[i])"
                )
                page.evaluate("window.__histoloop.cursor = -1")
                page.keyboard.press("n")
                for j, unit in enumerate(ids):
                    if unit in truth.index:
                        page.keyboard.press(str(LAYERS.index(truth[unit]) + 1))
                    elif j < len(ids) - 1:
                        page.keyboard.press("n")
                page.keyboard.press("s")
                page.wait_for_function(
                    f"() => window.__histoloop.round > {before} && window.__histoloop.latencies.length > {k}",
                    timeout=300_000,
                )
            latencies = [x / 1000 for x in page.evaluate("window.__histoloop.latencies")]
            out["labels_to_query_drawn_s"] = latencies
            out["labels_to_query_drawn_median_s"] = statistics.median(latencies)
            context.close()
        finally:
            web.stop()
            server.stop(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="pan/zoom duration")
    parser.add_argument("--repeat", type=int, default=3, help="first-view measurements")
    parser.add_argument("--levels", type=int, default=4, help="top Deep Zoom levels fetched")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients for tiles")
    parser.add_argument("--rounds", type=int, default=5, help="DLPFC rounds labelled in the page")
    parser.add_argument("--skip-dlpfc", action="store_true")
    parser.add_argument(
        "--tiles-only",
        action="store_true",
        help="part 2 alone, --repeat times on one server (no browser)",
    )
    parser.add_argument(
        "--cols", type=int, default=290, help="grid columns of part 1 (290 × 345 = 100,050 units)"
    )
    parser.add_argument("--rows", type=int, default=345, help="grid rows of part 1")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run that checks the script works (make bench; not a measurement)",
    )
    args = parser.parse_args()
    if args.quick:
        args.cols, args.rows, args.repeat, args.seconds, args.levels, args.clients = (
            40,
            30,
            1,
            0.5,
            2,
            2,
        )
        quick_rounds = "--rounds" in sys.argv[1:] or any(
            a.startswith("--rounds=") for a in sys.argv[1:]
        )
        args.skip_dlpfc = args.skip_dlpfc or not quick_rounds
    out: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average": os.getloadavg(),
    }
    if args.tiles_only:
        part_tiles_only(args, out)
        return _report(out, args.json)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        out["browser"] = browser.version
        part_big(args, browser, out)
        if not args.skip_dlpfc:
            part_dlpfc(args, browser, out)
        browser.close()
    return _report(out, args.json)


def _report(out: dict, path: str | None) -> int:
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        Path(path).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
