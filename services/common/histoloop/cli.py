"""The ``histoloop`` command: serve, run one service, health probe, migrate, demo, and the
client commands (project, dataset, annotator, labels, export, status, watch, agreement)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from histoloop.config import load_settings
from histoloop.errors import HistoloopError, InvalidArgument
from histoloop.logs import setup_logging
from histoloop.presets import DEFAULTS
from histoloop.runtime import EDGE_SERVICE_NAMES, SERVICE_NAMES

__all__ = ["main"]

log = logging.getLogger("histoloop.cli")


def _serve(args: argparse.Namespace) -> int:
    from histoloop.server import Server

    settings = load_settings(**_overrides(args))
    server = Server(settings, SERVICE_NAMES + EDGE_SERVICE_NAMES)
    if not getattr(args, "no_web", False):
        from histoloop.web import WorkspaceCompanion

        server.companions.append(
            WorkspaceCompanion(
                server,
                settings,
                on_ready=lambda url: print(f"browser workspace: {url}", flush=True),
            )
        )
    server.serve_until_signal()
    return 0


def _run(args: argparse.Namespace) -> int:
    from histoloop.server import Server, normalise_service_name

    settings = load_settings(**_overrides(args))
    if args.service.strip().lower() == "web":
        from histoloop.web import WebServer

        WebServer(
            settings, on_ready=lambda url: print(f"browser workspace: {url}", flush=True)
        ).serve_until_signal()
        return 0
    Server(settings, [normalise_service_name(args.service)]).serve_until_signal()
    return 0


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from histoloop.channels import make_channel

    # TLS (and the client certificate for mutual TLS) from HISTOLOOP_TLS_*; probes need no token
    settings = load_settings()
    if not args.address:  # the server this machine's settings start
        args.address = f"{settings.grpc_host}:{settings.grpc_port}"
    with make_channel(args.address, settings, token="") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name} {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _migrate(args: argparse.Namespace) -> int:
    from histoloop.annotation_store.db import migrate

    settings = load_settings()
    migrate(settings.sqlalchemy_url)
    print("annotation store database is at the latest revision")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from tqdm import tqdm

    from histoloop.demo import DemoRound, run_demo

    if "HISTOLOOP_LOG_LEVEL" not in os.environ:
        logging.getLogger().setLevel(
            logging.WARNING
        )  # the table is the output; services stay quiet
    shared = Path(os.environ.get("HISTOLOOP_SHARED_DATA", "../shared/data"))
    if args.sample == "her2st-a1":
        return _demo_a1(args, Path(args.data) if args.data else shared / "her2st" / "A1")
    data = Path(args.data) if args.data else shared / "dlpfc" / "151510"
    out = Path(args.out)
    header = f"{'round':>5} {'labels':>6} {'macro-F1':>8} {'bal.acc':>7} {'labels→next query':>18}"
    bar = tqdm(total=args.rounds, desc="rounds", unit="round")
    bar.write(header)

    def on_round(row: DemoRound) -> None:
        bar.write(
            f"{row.round:>5} {row.labels:>6} {row.macro_f1:>8.3f} {row.balanced_accuracy:>7.3f} "
            f"{row.seconds_to_next_query:>17.2f}s"
        )
        bar.update(1)

    def on_workspace(url: str) -> None:
        bar.write(f"browser workspace (live while the demo runs): {url}")

    def hold() -> None:
        if args.serve:
            import signal
            import threading

            done = threading.Event()
            signal.signal(signal.SIGINT, lambda *_: done.set())
            signal.signal(signal.SIGTERM, lambda *_: done.set())
            print("the workspace stays open; Ctrl-C to stop", flush=True)
            done.wait()

    rows = run_demo(
        data,
        out,
        rounds=args.rounds,
        query_size=args.query_size,
        strategy=args.strategy,
        head=args.head,
        spatial_neighbours=args.neighbours,
        seed=args.seed,
        on_round=on_round,
        on_workspace=on_workspace,
        hold=hold,
    )
    bar.close()
    latencies = sorted(r.seconds_to_next_query for r in rows)
    print(f"median labels→next query set: {latencies[len(latencies) // 2]:.2f}s")
    print(
        f"wrote {out}/learning_curve.png, {out}/prediction_map.png, {out}/loupe_*.csv, {out}/rounds.csv"
    )
    return 0


def _demo_a1(args: argparse.Namespace, data: object) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from histoloop.demo_a1 import A1Round, run_a1_demo

    rounds = args.rounds
    bar = tqdm(total=2 * rounds, desc="rounds (image, then image + counts)", unit="round")
    bar.write(
        f"{'mode':>12} {'round':>5} {'labels':>6} {'macro-F1':>8} {'bal.acc':>7} {'labels→next query':>18}"
    )

    def on_round(row: A1Round) -> None:
        bar.write(
            f"{row.mode:>12} {row.round:>5} {row.labels:>6} {row.macro_f1:>8.3f} "
            f"{row.balanced_accuracy:>7.3f} {row.seconds_to_next_query:>17.2f}s"
        )
        bar.update(1)

    run_a1_demo(
        Path(str(data)),
        Path(args.out),
        rounds=rounds,
        query_size=args.query_size,
        strategy=args.strategy,
        augment_views=args.views,
        seed=args.seed,
        on_round=on_round,
    )
    bar.close()
    print(f"wrote {args.out}/a1_learning_curves.png and {args.out}/a1_rounds.csv")
    return 0


def _tile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from histoloop.artifacts.local import LocalArtifactStore
    from histoloop.tiling import tile_visium, tile_wsi

    store = LocalArtifactStore(Path(args.out))
    bar = tqdm(desc="patches", unit="patch")

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    if args.spatial:
        result = tile_visium(
            args.slide,
            args.spatial,
            store,
            args.prefix,
            context=args.context,
            patch_size=args.tile_size,
            scale=args.scale,
            workers=args.workers,
            on_progress=on_progress,
        )
    else:
        result = tile_wsi(
            args.slide,
            store,
            args.prefix,
            mpp=args.mpp,
            tile_size=args.tile_size,
            workers=args.workers,
            on_progress=on_progress,
        )
    bar.close()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"{result.n_patches} patches (level {result.level}, "
        f"{'direct JPEG' if result.direct else 'OpenSlide'}) in {result.seconds:.1f}s; "
        f"overlay: {Path(args.out) / result.overlay_key}"
    )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import os

    from histoloop.simulation import (
        SimulationConfig,
        parse_schedule,
        project_default_config,
        run_campaign,
    )

    if "HISTOLOOP_LOG_LEVEL" not in os.environ:
        logging.getLogger().setLevel(logging.WARNING)  # the bar and the table are the output
    common = dict(
        obsm=args.obsm or (),
        pca=args.pca,
        seeds=args.seeds,
        test_fraction=args.test_fraction,
        initial_size=args.initial_size,
        query_size=args.query_size,
        rounds=args.rounds,
        budget=args.budget,
        schedule=parse_schedule(args.schedule) if args.schedule else (),
        metric=args.metric,
        target=args.target,
        x_values=args.x_values,
        raters=args.raters or (),
        **({"loop": _json_object("--loop", args.loop)} if args.loop else {}),
    )
    default_mode = args.head is None and args.strategies is None
    if default_mode:  # "does the project default beat random on my data?"
        extra = {
            k: v
            for k, v in (("neighbours", args.neighbours), ("initial", args.initial))
            if v is not None
        }
        config = project_default_config(
            args.label_column, preset=args.preset or "", **common, **extra
        )
    else:
        config = SimulationConfig(
            label_column=args.label_column,
            neighbours=args.neighbours or 0,
            strategies=args.strategies or (),
            heads=args.head or ("mlp",),
            initial=args.initial or "per_class",
            **common,
        )
    store = None
    if args.store:
        from histoloop.artifacts import make_store

        store = make_store(load_settings())
    result = run_campaign(
        args.data,
        config,
        args.out,
        workers=args.workers,
        resume=args.resume,
        store=store,
        name=args.name or "",
    )
    print((result.folder / "comparison.md").read_text())
    print(
        f"campaign {result.campaign_id}: {result.rounds_run} rounds run in {result.seconds:.0f}s; "
        f"outputs in {result.folder}/"
    )
    for name, uri in result.uris.items():
        print(f"stored {name}: {uri}")
    if default_mode and result.comparison is not None:
        print(_default_verdict(result.comparison, config))
    return 0


def _json_object(flag: str, text: str) -> dict:
    """A JSON object given on the command line.

    Raises:
        InvalidArgument: not a JSON object (names ``flag``).
    """
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"{flag}: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{flag}: expected a JSON object, got {text!r}")
    return value


def _default_verdict(comparison: dict, config: object) -> str:
    """The last line of a default-mode campaign: the project default against random."""
    head = comparison["heads"][0]
    rows = {r["strategy"]: r for r in comparison["rows"] if r["head"] == head}
    strategy = next(s for s in rows if s != "random") if len(rows) > 1 else "random"
    row = rows[strategy]
    ratio, bound = row["ratio_to_random"], row["ratio_bound"]
    share = f"{100 * comparison['target_share']:g} %"
    if ratio is None:
        return (
            f"project default ({strategy} / {head}): neither it nor random reached {share} of full "
            "supervision within the campaign; run more rounds"
        )
    verdict = "fewer" if ratio < 1 else "more"
    return (
        f"project default ({strategy} / {head}, {getattr(config, 'neighbours', 0)} neighbours) needs "
        f"{'' if bound in (None, '=') else bound + ' '}{ratio:.2f}× the labels random needs to reach {share} "
        f"of full supervision ({verdict} than random)"
    )


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    if getattr(args, "port", None) is not None:
        overrides["grpc_port"] = args.port
    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = args.data_dir
    if getattr(args, "web_port", None) is not None:
        overrides["web_port"] = args.web_port
    return overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="histoloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="all six services in one process (embedded default)")
    serve.add_argument("--port", type=int, help="gRPC port (default HISTOLOOP_GRPC_PORT or 50051)")
    serve.add_argument("--data-dir", help="state folder (default HISTOLOOP_DATA_DIR or .histoloop)")
    serve.add_argument(
        "--web-port", type=int, help="browser workspace port (default HISTOLOOP_WEB_PORT or 8080)"
    )
    serve.add_argument("--no-web", action="store_true", help="do not serve the browser workspace")
    serve.set_defaults(func=_serve)

    run = sub.add_parser("run", help="one service, backends from HISTOLOOP_* settings")
    run.add_argument("service", help=" | ".join((*SERVICE_NAMES, *EDGE_SERVICE_NAMES, "web")))
    run.add_argument("--port", type=int)
    run.add_argument("--data-dir")
    run.set_defaults(func=_run)

    health = sub.add_parser("health", help="gRPC health check; exit 0 when SERVING")
    health.add_argument(
        "--address",
        default="",
        help="host:port; default: HISTOLOOP_GRPC_HOST:HISTOLOOP_GRPC_PORT (127.0.0.1:50051)",
    )
    health.add_argument(
        "--service", default="", help="full gRPC service name; empty = whole server"
    )
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=_health)

    demo = sub.add_parser(
        "demo", help="the whole loop on DLPFC 151510 with a simulated pathologist"
    )
    demo.add_argument(
        "--sample",
        choices=("dlpfc-151510", "her2st-a1"),
        default="dlpfc-151510",
        help="her2st-a1: real H&E with pathologist labels, image alone and image + counts",
    )
    demo.add_argument(
        "--views",
        type=int,
        default=0,
        help="her2st-a1: augmented views per spot (project augment_views; cost × (1 + views))",
    )
    demo.add_argument(
        "--data", help="folder with dlpfc151510_500genes.h5ad and spatial/ (or her2st/A1)"
    )
    demo.add_argument("--out", default="demo-output")
    demo.add_argument("--rounds", type=int, default=10)
    demo.add_argument("--query-size", type=int, default=DEFAULTS["query_size"])
    demo.add_argument(
        "--strategy", default=DEFAULTS["strategy"], help="default: the project default"
    )
    demo.add_argument("--head", default=DEFAULTS["head"], help="default: the project default")
    demo.add_argument(
        "--neighbours",
        type=int,
        default=DEFAULTS["spatial_neighbours"],
        help="spatial neighbour features (0 = off; default: the project default)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--serve", action="store_true", help="keep the browser workspace open after the rounds"
    )
    demo.set_defaults(func=_demo)

    tile = sub.add_parser(
        "tile", help="cut a slide into patches (Visium spots or a WSI grid) with a progress bar"
    )
    tile.add_argument(
        "slide",
        help="a slide OpenSlide reads (SVS, NDPI, MRXS, tiled TIFF, …) or a plain PNG/JPEG/TIFF",
    )
    tile.add_argument(
        "--spatial",
        help="Space Ranger spatial/ folder (Visium) or a legacy ST *_selection.tsv; "
        "omit for grid tiling",
    )
    tile.add_argument("--out", default="tiles-output", help="local artifact folder to write into")
    tile.add_argument("--prefix", default="tiles", help="key prefix of the patch set")
    tile.add_argument("--tile-size", type=int, default=224, help="patch side in pixels")
    tile.add_argument("--mpp", type=float, default=0.5, help="grid tiling resolution, µm/px")
    tile.add_argument(
        "--context", type=float, default=1.0, help="patch side = spot diameter × context"
    )
    tile.add_argument(
        "--scale",
        "--slide-scale",
        dest="scale",
        type=float,
        default=1.0,
        help="slide px per positions px (Space Ranger full-res, or the legacy ST image)",
    )
    tile.add_argument("--workers", type=int, default=None)
    tile.set_defaults(func=_tile)

    sim = sub.add_parser(
        "simulate", help="compare strategies on pre-annotated data (simulated campaigns)"
    )
    sim.add_argument("--data", required=True, help="an .h5ad with vectors in obsm or counts in X")
    sim.add_argument("--label-column", required=True, help="obs column with the ground truth")
    sim.add_argument(
        "--obsm", help="obsm key(s) of the feature vectors, comma-separated (default: counts in X)"
    )
    sim.add_argument(
        "--pca", type=int, default=0, help="PCA components (default 30 without --obsm)"
    )
    sim.add_argument(
        "--strategies",
        help="comma-separated (with --head and no --strategies: every strategy that "
        "works with the heads; with neither: the project default against random)",
    )
    sim.add_argument("--seeds", type=int, default=5)
    sim.add_argument(
        "--head",
        help="mlp | logreg | ensemble, or several comma-separated (default: the project "
        "default's head, compared with random)",
    )
    sim.add_argument(
        "--preset",
        help="with neither --head nor --strategies: the preset whose defaults to test "
        "(e.g. activevisium)",
    )
    sim.add_argument(
        "--query-size", type=int, default=0, help="spots per round (default 2 %% of the pool)"
    )
    sim.add_argument(
        "--loop",
        help="a project's settings as JSON, as every arm uses them in the live loop, e.g. "
        '\'{"hybrid_share": 0.5, "stop_patience": 3}\' (hybrid_share, kmeans_pick, '
        "mc_dropout_samples, stop_*, resampling_every, preset)",
    )
    sim.add_argument(
        "--x-values",
        default="auto",
        choices=("auto", "counts", "normalised"),
        help="what X holds without --obsm (auto: counts if whole numbers, else used as is)",
    )
    sim.add_argument(
        "--raters",
        help="simulated raters for rater_disagreement, comma-separated: exact, border, "
        "merge:<class>:<into> (e.g. exact,border,merge:Layer6:Layer5)",
    )
    size = sim.add_mutually_exclusive_group()
    size.add_argument("--rounds", type=int, default=0, help="rounds of --query-size")
    size.add_argument(
        "--budget", type=int, default=0, help="rounds of --query-size up to this many labels"
    )
    sim.add_argument(
        "--schedule",
        help="labelled fractions of the pool, e.g. 0.1:1.0:0.1 (after --rounds/--budget)",
    )
    sim.add_argument(
        "--neighbours",
        type=int,
        default=None,
        help="spatial neighbour-mean features (0 = off; "
        "default: 0, or the project default's in default mode)",
    )
    sim.add_argument("--test-fraction", type=float, default=0.3)
    sim.add_argument(
        "--initial",
        default=None,
        help="per_class or a cold-start strategy (default: per_class, or "
        "the project default's cold start in default mode)",
    )
    sim.add_argument(
        "--initial-size",
        type=int,
        default=0,
        help="with a cold-start strategy (default --query-size)",
    )
    sim.add_argument(
        "--metric", default="macro_f1", help="macro_f1 | balanced_accuracy | accuracy | kappa"
    )
    sim.add_argument(
        "--target", type=float, default=0.95, help="target as a share of full supervision"
    )
    sim.add_argument("--out", required=True, help="campaign folder")
    sim.add_argument("--workers", type=int, default=2, help="parallel processes")
    sim.add_argument("--resume", action="store_true", help="continue the campaign in --out")
    sim.add_argument("--name", help="campaign id (default: derived from the settings and the data)")
    sim.add_argument(
        "--store", action="store_true", help="also store the outputs in the artifact store"
    )
    sim.set_defaults(func=_simulate)

    migrate = sub.add_parser("migrate", help="upgrade the annotation store's database")
    migrate.set_defaults(func=_migrate)

    from histoloop.client_cli import add_commands  # project, dataset, labels, export, watch, …

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``histoloop`` command."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        setup_logging(settings.log_level, settings.log_format)
        return int(args.func(args))
    except HistoloopError as exc:
        print(f"histoloop: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
