"""The workspace in a real browser: Debian's chromium driven by Playwright (never downloaded).

Without ``/usr/bin/chromium`` or the ``playwright`` package these tests skip and say why
(``make test`` installs chromium where it runs as root with apt). Screenshots land in
``$HISTOLOOP_WEB_SCREENSHOTS`` (default: the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from histoloop.v1 import annotation_store_pb2 as pb
from tests.web.conftest import COLOURS, DATASET, LAYERS, PROJECT, WSI_PROJECT, Stack

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

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed"
)
if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
    pytest.skip(
        f"no browser: {CHROMIUM} is missing (apt-get install chromium; make test does it as root)",
        allow_module_level=True,
    )

OVERLAY_SIGNATURE = """() => {
  const c = document.getElementById('overlay');
  const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let h = 0, n = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i + 3]) { n++; h = (h * 31 + data[i] * 7 + data[i + 1] * 3 + data[i + 2]) % 1000000007; }
  return [n, h];
}"""

# Small units are written into an ImageData (the raster path), larger ones drawn as canvas paths.
# Every unit on screen gets a pending label but three: one off tissue and unlabelled, two with a
# prediction (one with uncertainty 0.5, one without). Read: the colours of twelve chosen units and,
# at the centre pixel of every unit on screen, raster == paths.
RASTER_AND_PATHS = """(size) => {
  const st = window.__histoloop, L = st.layer, v = st.viewer, scale = st.slide.unit_scale;
  const canvas = document.getElementById('overlay'), ratio = window.devicePixelRatio || 1;
  st.query = []; st.cursor = -1;                          // nothing drawn over the fills:
  for (let i = 0; i < L.n; i++) L.flags[i] &= ~2;           // no query rings, no disputed crosses
  const pxPerUnit = () => {
    const a = v.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    const b = v.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 0));
    return (b.x - a.x) / 1000 * scale;
  };
  v.viewport.goHome(true);
  v.viewport.zoomBy(size / (st.grid.largest * pxPerUnit()), null, true);
  const onScreen = st.grid.largest * pxPerUnit();
  const centre = (i) => {
    const p = v.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(L.x[i] * scale, L.y[i] * scale));
    return [Math.floor(p.x * ratio), Math.floor(p.y * ratio)];
  };
  const inView = [];
  for (let i = 0; i < L.n; i++) {
    const [x, y] = centre(i);
    if (x > 8 && y > 8 && x < canvas.width - 8 && y < canvas.height - 8) inView.push(i);
  }
  const pick = (k) => inView[Math.floor((k + 0.5) * inView.length / 16)];
  const picture = (render) => {
    st.render = render;
    st.redraw();
    return [st.rendered, canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data];
  };
  const at = (data, i) => {
    const [x, y] = centre(i), k = 4 * (y * canvas.width + x);
    return Array.from(data.slice(k, k + 4));
  };
  const agree = (a, b) => {  // premultiplied, so that faint pixels' colour rounding does not count
    let worst = 0, alphaA = 0, alphaB = 0;
    for (const i of inView) {
      const p = at(a, i), q = at(b, i);
      for (let c = 0; c < 3; c++) worst = Math.max(worst, Math.abs(p[c] * p[3] - q[c] * q[3]) / 255);
      worst = Math.max(worst, Math.abs(p[3] - q[3]));
    }
    for (let k = 3; k < a.length; k += 4) { alphaA += a[k]; alphaB += b[k]; }
    return {worst, coverage: alphaA / Math.max(alphaB, 1)};
  };
  const known = [...Array(12).keys()].map(pick), blank = pick(12), half = pick(13), none = pick(14);
  st.mode = 'consensus';
  inView.forEach((i, k) => { if (![blank, half, none].includes(i)) st.pending.set(i, k % L.classes.length); });
  L.flags[blank] &= ~1; L.consensus[blank] = -1;           // off tissue, unlabelled: not drawn
  const [rasterUsed, raster] = picture('raster'), [pathUsed, path] = picture('path'), [autoUsed] = picture('auto');
  const consensus = {rasterUsed, pathUsed, autoUsed, blank: at(raster, blank), ...agree(raster, path),
                     known: known.map((i) => [st.pending.get(i), at(raster, i)])};
  st.mode = 'uncertainty';
  L.predicted[half] = 1; L.uncertainty[half] = 127;        // alpha 127/254
  L.predicted[none] = 1; L.uncertainty[none] = 255;        // no uncertainty: not drawn
  const [, raster2] = picture('raster'), [, path2] = picture('path');
  const uncertainty = {pending: at(raster2, known[0]), half: at(raster2, half), none: at(raster2, none),
                       ...agree(raster2, path2)};
  v.viewport.zoomBy(4, null, true);
  const [zoomedUsed] = picture('auto');
  st.pending.clear();
  return {consensus, uncertainty, zoomedUsed, onScreen, n: inView.length};
}"""


def _rgb(colour: str) -> list[int]:
    return [int(colour[k : k + 2], 16) for k in (1, 3, 5)]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
            args=ARGS,
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(
        os.environ.get("HISTOLOOP_WEB_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots")
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


VIEW_SHOWN = """() => {
  const v = window.__histoloop.viewer;
  const loaded = (world) => !!world.getItemAt(0) && world.getItemAt(0).getFullyLoaded();
  return loaded(v.world) && (!v.navigator || loaded(v.navigator.world))
    && !!document.getElementById('round-number');
}"""


def _shot(page, path: Path) -> None:
    """A screenshot once every slide tile in view (and in the navigator) is drawn and the panels
    are filled (the page is ready before either)."""
    page.wait_for_function(VIEW_SHOWN, timeout=60_000)
    page.screenshot(path=str(path))


def _open(
    browser,
    stack: Stack,
    who: str,
    project: str = PROJECT,
    *,
    view_only: bool = False,
    pixel_ratio: float = 1,
    query: str = "",
):
    context = browser.new_context(
        viewport={"width": 1400, "height": 860}, device_scale_factor=pixel_ratio
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{stack.url}/?project={project}{query}")
    page.fill("#signin-token", stack.tokens[who])
    if view_only:
        page.check("#signin-view-only")
    page.click("#signin-form button[type=submit]")
    page.wait_for_function(
        "() => window.__histoloop && window.__histoloop.ready === true", timeout=60_000
    )
    page.wait_for_timeout(300)
    assert not errors, errors
    return context, page


def _label_query_with_hotkeys(page, stack: Stack) -> int:
    ids = page.evaluate("window.__histoloop.query.map(i => window.__histoloop.layer.ids[i])")
    assert ids, "the page shows no query units"
    page.evaluate("window.__histoloop.cursor = -1")
    page.keyboard.press("n")
    labelled = 0
    for k, unit in enumerate(ids):
        label = stack.truth.get(unit)
        if label is None:
            if k < len(ids) - 1:
                page.keyboard.press("n")
            continue
        page.keyboard.press(str(LAYERS.index(label) + 1))
        labelled += 1
    assert page.evaluate("window.__histoloop.pending.size") == labelled
    return labelled


def test_dlpfc_hotkeys_send_next_round_overlay_changes(browser, stack: Stack, shots: Path) -> None:
    context, page = _open(browser, stack, "ann-a")
    round_before = page.evaluate("window.__histoloop.round")
    page.select_option("#colour-mode", "consensus")
    before = page.evaluate(OVERLAY_SIGNATURE)
    consensus_before = page.evaluate(
        "Array.from(window.__histoloop.layer.consensus).filter(c => c >= 0).length"
    )
    _shot(page, shots / "web-query.png")
    labelled = _label_query_with_hotkeys(page, stack)
    page.keyboard.press("s")
    page.wait_for_function(f"() => window.__histoloop.round > {round_before}", timeout=120_000)
    page.wait_for_selector("#banner:not([hidden])")
    banner = page.text_content("#banner")
    assert banner.startswith(f"round {round_before + 1}:") and "new spots" in banner
    page.wait_for_timeout(200)
    consensus_after = page.evaluate(
        "Array.from(window.__histoloop.layer.consensus).filter(c => c >= 0).length"
    )
    assert consensus_after >= consensus_before + labelled
    after = page.evaluate(OVERLAY_SIGNATURE)
    assert after != before, "the overlay did not change after the next round arrived"
    _shot(page, shots / "web-next-round.png")
    page.evaluate("window.__histoloop.viewer.viewport.goHome(true)")
    page.select_option("#colour-mode", "predicted")
    page.wait_for_timeout(1500)
    predicted = page.evaluate(OVERLAY_SIGNATURE)
    assert predicted != after
    _shot(page, shots / "web-predicted.png")
    # the model panel says what the model was validated on, or that nothing could be held out
    # yet; the panel refreshes every 10 s and the loop may publish a newer model meanwhile, so
    # the panel and /status are compared until they describe the same model (at most 30 s)
    deadline, panel, wanted = time.monotonic() + 30, "", []
    while time.monotonic() < deadline:
        metrics = page.evaluate(f"fetch('/api/projects/{PROJECT}/status').then(r => r.json())")[
            "latest_metrics"
        ]
        wanted = [
            f"trained on\t{metrics['n_train']} labels",
            f"validated on {metrics['n_val']} held-out labels"
            if metrics["n_val"]
            else "too few labels to hold some out for validation yet",
        ]
        panel = page.inner_text("#metrics")
        if all(w in panel for w in wanted):
            break
        page.wait_for_timeout(500)
    assert all(w in panel for w in wanted), (wanted, panel)
    page.select_option("#colour-mode", "uncertainty")
    page.wait_for_timeout(200)
    _shot(page, shots / "web-uncertainty.png")
    assert int(page.text_content("#round-number")) >= round_before + 1
    context.close()


def test_two_annotators_both_see_the_next_query_set(browser, stack: Stack, shots: Path) -> None:
    ctx_a, page_a = _open(browser, stack, "ann-a")
    ctx_b, page_b = _open(browser, stack, "ann-b")
    ctx_v, page_v = _open(browser, stack, "ann-b", view_only=True)
    assert page_v.is_hidden("#send") and "read-only" in page_v.text_content("#who")
    start = page_a.evaluate("window.__histoloop.round")
    assert page_b.evaluate("window.__histoloop.round") == start
    _label_query_with_hotkeys(page_a, stack)
    page_a.click("#send")
    for page in (page_a, page_b, page_v):
        page.wait_for_function(f"() => window.__histoloop.round > {start}", timeout=120_000)
        assert page.text_content("#banner").startswith(f"round {start + 1}:")
    assert page_b.text_content("#who").startswith("ann-b")
    _shot(page_b, shots / "web-second-annotator.png")
    ctx_a.close()
    ctx_v.close()

    # brush and lasso over the spots, each undone
    page_b.evaluate("window.__histoloop.viewer.viewport.goHome(true)")
    page_b.wait_for_timeout(300)
    box = page_b.locator("#viewer-wrap").bounding_box()
    cx, cy = box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.5
    page_b.keyboard.press("b")
    page_b.mouse.move(cx - 80, cy)
    page_b.mouse.down()
    page_b.mouse.move(cx + 80, cy, steps=20)
    page_b.mouse.up()
    brushed = page_b.evaluate("window.__histoloop.pending.size")
    assert brushed > 10
    page_b.keyboard.press("u")
    assert page_b.evaluate("window.__histoloop.pending.size") == 0
    page_b.keyboard.press("l")
    page_b.mouse.move(cx - 60, cy - 60)
    page_b.mouse.down()
    for x, y in ((cx + 60, cy - 60), (cx + 60, cy + 60), (cx - 60, cy + 60), (cx - 60, cy - 59)):
        page_b.mouse.move(x, y, steps=5)
    page_b.mouse.up()
    lassoed = page_b.evaluate("window.__histoloop.pending.size")
    assert lassoed > brushed  # a 120 px square holds more spots than a 160 px brush line
    page_b.keyboard.press("u")
    assert page_b.evaluate("window.__histoloop.pending.size") == 0

    # two annotators disagree on a spot: the adjudication panel lists both labels
    unit = str(stack.truth.index[-1])
    for who, label in (("ann-a", "Layer1"), ("ann-b", "Layer2")):
        stack.store.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id=PROJECT,
                dataset_id=DATASET,
                batch_id=f"dispute-{who}",
                annotator_id=who,
                labels=[pb.SpotLabel(barcode=unit, label=label)],
            ),
            metadata=stack.admin,
        )
    page_b.reload()
    page_b.wait_for_function(
        "() => window.__histoloop && window.__histoloop.ready === true", timeout=60_000
    )
    page_b.wait_for_selector(f"#adjudication tr[data-unit]:has-text('{unit}')", timeout=30_000)
    row = page_b.text_content(f"#adjudication tr[data-unit]:has-text('{unit}')")
    assert "ann-a: Layer1" in row and "ann-b: Layer2" in row
    page_b.locator("#adjudication").scroll_into_view_if_needed()
    _shot(page_b, shots / "web-adjudication.png")
    ctx_b.close()


def test_wsi_tiles_brush_stroke(browser, stack: Stack, shots: Path) -> None:
    """Tiles of a real slide: two brush strokes of two classes, send, the next round arrives."""
    context, page = _open(browser, stack, "ann-a", project=WSI_PROJECT)
    assert page.evaluate("window.__histoloop.layer.n") > 0, "the WSI dataset shows no tiles"
    assert page.evaluate("window.__histoloop.layer.kind") == "wsi"
    round_before = page.evaluate("window.__histoloop.round")
    page.select_option("#colour-mode", "consensus")
    before = page.evaluate(OVERLAY_SIGNATURE)
    _shot(page, shots / "web-wsi.png")
    box = page.locator("#overlay").bounding_box()

    def stroke(key: str, height: float) -> None:
        page.keyboard.press(key)
        page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * height)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * height, steps=40)
        page.mouse.up()

    page.keyboard.press("b")
    stroke("1", 0.35)
    first = page.evaluate("window.__histoloop.pending.size")
    assert first > 0
    page.keyboard.press("u")
    assert page.evaluate("window.__histoloop.pending.size") == 0
    stroke("1", 0.35)
    stroke("2", 0.65)
    assert page.evaluate("window.__histoloop.pending.size") > first
    page.keyboard.press("s")
    page.wait_for_function(f"() => window.__histoloop.round > {round_before}", timeout=180_000)
    banner = page.text_content("#banner")
    assert banner.startswith(f"round {round_before + 1}:") and "new tiles" in banner
    page.wait_for_timeout(200)
    assert page.evaluate(OVERLAY_SIGNATURE) != before, (
        "the overlay did not change after the next round"
    )
    _shot(page, shots / "web-wsi-next-round.png")
    context.close()


def test_key_r_adds_the_proposed_region_as_one_undo_step(browser, stack: Stack) -> None:
    status = stack.store.GetStatus(pb.GetStatusRequest(project_id=PROJECT), metadata=stack.admin)
    if not status.latest_model_version:  # alone, this test runs before the project's first model
        query_set = stack.store.GetQuerySet(
            pb.GetQuerySetRequest(project_id=PROJECT), metadata=stack.admin
        )
        stack.store.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id=PROJECT,
                dataset_id=DATASET,
                batch_id="region-key",
                labels=[
                    pb.SpotLabel(barcode=s.barcode, label=stack.truth[s.barcode])
                    for s in query_set.spots
                    if s.barcode in stack.truth.index
                ],
            ),
            metadata=stack.admin,
        )
        stack.wait_round(PROJECT, query_set.round)
    context, page = _open(browser, stack, "ann-a")
    page.click(".class-button[data-cls='2']")
    page.evaluate("window.__histoloop.focus = window.__histoloop.query[0]")
    unit = page.evaluate("window.__histoloop.layer.ids[window.__histoloop.focus]")
    page.keyboard.press("r")
    page.wait_for_function("() => window.__histoloop.pending.size > 0", timeout=30_000)
    # once a model knows ann-a's style (another test's labels), the page asks as ann-a
    mine = "&as=ann-a" if " as ann-a:" in page.text_content("#status-line") else ""
    region = page.evaluate(f"""async () => (await (await fetch(
        '/api/projects/{PROJECT}/datasets/{DATASET}/region?unit={unit}{mine}')).json()).units""")
    pending = page.evaluate(
        "[...window.__histoloop.pending].map(([i, c]) => [window.__histoloop.layer.ids[i], c])"
    )
    assert sorted(u for u, _ in pending) == sorted(region) and region[0] == unit
    assert {c for _, c in pending} == {2}
    assert "region of" in page.text_content("#status-line")
    page.keyboard.press("u")
    assert page.evaluate("window.__histoloop.pending.size") == 0
    context.close()


def test_key_r_proposes_as_the_signed_in_annotator_when_the_model_knows_them(
    browser, stack: Stack
) -> None:
    """Two annotators label the same spots differently; the next model carries a per-annotator
    model, and ``r`` asks for the region as the signed-in annotator."""
    query_set = stack.store.GetQuerySet(
        pb.GetQuerySetRequest(project_id=PROJECT), metadata=stack.admin
    )
    spots = [s.barcode for s in query_set.spots if s.barcode in stack.truth.index]
    for name, shift in (("ann-a", 0), ("ann-b", 1)):
        stack.store.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id=PROJECT,
                dataset_id=DATASET,
                batch_id=f"raters-{name}",
                labels=[
                    pb.SpotLabel(
                        barcode=b,
                        label=LAYERS[(LAYERS.index(stack.truth[b]) + shift) % len(LAYERS)],
                    )
                    for b in spots
                ],
            ),
            metadata=[("authorization", f"Bearer {stack.tokens[name]}")],
        )
    stack.wait_round(PROJECT, query_set.round)
    context, page = _open(browser, stack, "ann-a")
    page.wait_for_function("() => window.__histoloop.raters.includes('ann-a')", timeout=30_000)
    page.evaluate("window.__histoloop.focus = window.__histoloop.query[0]")
    unit = page.evaluate("window.__histoloop.layer.ids[window.__histoloop.focus]")
    page.keyboard.press("r")
    page.wait_for_function("() => window.__histoloop.pending.size > 0", timeout=30_000)
    region = page.evaluate(f"""async () => (await (await fetch(
        '/api/projects/{PROJECT}/datasets/{DATASET}/region?unit={unit}&as=ann-a')).json()).units""")
    pending = page.evaluate(
        "[...window.__histoloop.pending].map(([i]) => window.__histoloop.layer.ids[i])"
    )
    assert sorted(pending) == sorted(region)
    assert "as ann-a" in page.text_content("#status-line")
    context.close()


@pytest.mark.parametrize("pixel_ratio", [1, 2])
def test_raster_redraw_draws_the_colours_and_agrees_with_paths(
    browser, stack: Stack, pixel_ratio: float
) -> None:
    """Units under 4 px are written as pixels: each class's colour and alpha where a unit is, nothing where
    none is drawn, and at every unit on screen the same pixels as the per-unit canvas paths."""
    context, page = _open(browser, stack, "ann-a", pixel_ratio=pixel_ratio)
    result = page.evaluate(RASTER_AND_PATHS, 3)
    context.close()
    consensus, uncertainty = result["consensus"], result["uncertainty"]
    assert 2 <= result["onScreen"] < 4 and result["n"] > 1000, result
    assert (consensus["rasterUsed"], consensus["pathUsed"], consensus["autoUsed"]) == (
        "raster",
        "path",
        "raster",
    )
    assert result["zoomedUsed"] == "path"  # 12 px units: paths (circles)
    for c, (r, g, b, a) in consensus["known"]:
        assert all(abs(x - y) <= 2 for x, y in zip((r, g, b), _rgb(COLOURS[c]), strict=True)), (
            c,
            r,
            g,
            b,
        )
        assert abs(a - 153) <= 1  # 0.6
    assert consensus["blank"] == [0, 0, 0, 0]
    assert uncertainty["pending"][3] == 153 and uncertainty["none"] == [0, 0, 0, 0]
    assert uncertainty["half"][3] == 128 and all(
        abs(x - y) <= 2 for x, y in zip(uncertainty["half"][:3], _rgb(COLOURS[1]), strict=True)
    )
    for picture in (consensus, uncertainty):
        assert picture["worst"] <= 2, picture["worst"]
        assert 0.85 <= picture["coverage"] <= 1.15, picture["coverage"]


RENDERER = """() => {
  const gl = document.createElement('canvas').getContext('webgl');
  const info = gl && gl.getExtension('WEBGL_debug_renderer_info');
  return info ? gl.getParameter(info.UNMASKED_RENDERER_WEBGL) : null;
}"""


def test_software_webgl_takes_the_canvas_drawer_and_the_url_can_force_one(
    browser, stack: Stack
) -> None:
    """OpenSeadragon's WebGL drawer pans at a quarter of the canvas drawer's rate on a software
    renderer (benchmarks/README.md): the page takes the canvas there, WebGL on a GPU."""
    drawers = {}
    for query in ("", "&drawer=webgl", "&drawer=html", "&drawer=bogus"):
        context, page = _open(browser, stack, "ann-a", query=query)
        drawers[query] = page.evaluate("window.__histoloop.viewer.drawer.getType()")
        renderer = page.evaluate(RENDERER)
        context.close()
    software = renderer is None or any(
        word in renderer.lower() for word in ("swiftshader", "llvmpipe", "software")
    )
    chosen = "canvas" if software else "webgl"
    assert drawers == {
        "": chosen,
        "&drawer=webgl": "webgl",
        "&drawer=html": "html",
        "&drawer=bogus": chosen,
    }, (renderer, drawers)


def test_stages_panel_says_each_state_and_error_in_plain_words(browser, stack: Stack) -> None:
    """The store's status passes through with a failed, a parked and a running stage added (the
    states and errors the never-stalls machinery records): the panel says them in words."""
    extra = {
        "notice": "need labels of at least 2 classes; asking 10 more spots",
        "stages": [
            {"stage": "tiling", "dataset": "cmu1", "status": "STAGE_STATUS_DONE", "progress": 1},
            {"stage": "embedding", "dataset": "cmu1", "status": "STAGE_STATUS_RUNNING",
             "progress": 0.42, "last_error": "", "attempts": 0},
            {"stage": "training", "dataset": "", "status": "STAGE_STATUS_FAILED",
             "last_error": "artifact store unreachable", "attempts": 2},
            {"stage": "prediction", "dataset": "cmu1", "status": "STAGE_STATUS_PARKED",
             "last_error": "embeddings of cmu1 have 0 rows", "attempts": 5},
        ],
        "parked": [
            {"stage": "prediction", "dataset": "cmu1", "error": "embeddings of cmu1 have 0 rows",
             "attempts": 5, "event_id": "e1", "topic": "model.trained"}
        ],
        "n_parked": 1,
        "pending_events": 3,
    }  # fmt: skip
    context, page = _open(browser, stack, "ann-a", project=WSI_PROJECT)

    def status(route) -> None:
        real = route.fetch()
        route.fulfill(response=real, json={**real.json(), **extra})

    page.route("**/api/projects/*/status", status)
    page.reload()
    page.wait_for_function(
        "() => document.getElementById('stages').textContent.includes('needs an operator')",
        timeout=60_000,
    )
    text = page.inner_text("#stages")
    context.close()
    assert "STAGE_STATUS" not in text, text
    assert "Waiting: need labels of at least 2 classes; asking 10 more spots" in text
    for line in (
        "tiling cmu1\tdone",
        "embedding cmu1\trunning (42 %)",
        "training\tfailed, trying again after 2 attempts",
        "artifact store unreachable",
        "prediction cmu1\tstopped: needs an operator after 5 attempts",
        f"histoloop retry {WSI_PROJECT} prediction",
        "3 event(s) waiting to be published",
    ):
        assert line in text, (line, text)
