"""``warmserve`` command line: flags → frozen config → app."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

from serve import __version__
from serve.bundles.manifest import MANIFEST_FILE
from serve.config import (
    LOG_LEVELS,
    MODEL_CONFIG_FILE,
    Config,
    cache_dir_from_env,
    default_repository_from_env,
    server_config_from_env,
)
from serve.errors import ConfigError, ServeError

log = logging.getLogger("serve")
DEMO_BUILD_TIMEOUT_S = 600


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warmserve", description="warm model serving over gRPC")
    parser.add_argument("--version", action="version", version=f"warmserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve a model repository (the demo models by default)"
    )
    serve.add_argument(
        "--repository", help="folder with one sub-folder (model.toml + model) per model"
    )
    serve.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 8001)")
    serve.add_argument("--http-port", type=int, help="HTTP health + metrics port (8000; -1: off)")
    serve.add_argument(
        "--health-port", type=int, help="extra plaintext gRPC health-only port (default off)"
    )
    serve.add_argument(
        "--drain-delay", type=float, help="seconds NOT_SERVING before stopping on SIGTERM"
    )
    serve.add_argument(
        "--max-message-bytes", type=int, help="largest gRPC message (default 64 MiB)"
    )
    serve.add_argument(
        "--max-inflight-bytes",
        type=int,
        help="bytes of requests held at once, server-wide; beyond: RESOURCE_EXHAUSTED (1 GiB)",
    )
    serve.add_argument("--grace-period", type=float, help="seconds in-flight calls get on SIGTERM")
    serve.add_argument(
        "--max-connection-age",
        type=float,
        help="seconds before a client connection gets a GOAWAY and moves (default 8; 0: never)",
    )
    serve.add_argument("--log-level", help=f"{', '.join(LOG_LEVELS)} (default INFO)")
    serve.add_argument(
        "--frontends",
        type=int,
        help="gRPC relay processes sharing the port, feeding this one (default 1: none)",
    )
    serve.add_argument(
        "--model-control",
        action="store_true",
        default=None,
        help="allow repository load/unload RPCs (rollouts and rollbacks)",
    )
    serve.add_argument(
        "--require-gpu",
        action="store_true",
        default=None,
        help='models with device "auto" must run on CUDA; a worker on CPU fails its start',
    )
    demo = commands.add_parser("demo", help="write the built-in demo models to a folder")
    demo.add_argument("directory")
    demo.add_argument(
        "--sources", action="store_true", help="write model folders (model.toml), not bundles"
    )
    _bundle_commands(commands.add_parser("bundle", help="build, verify, inspect model bundles"))
    listing = commands.add_parser("index", help="list a running server's model versions")
    listing.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address")
    for action, text in (
        ("load", "roll out a model version from the server's repository"),
        ("unload", "stop serving a model (or one version)"),
        ("rollback", "switch a model back to its previous version"),
    ):
        command = commands.add_parser(action, help=text)
        command.add_argument("model")
        if action != "rollback":
            command.add_argument(
                "--version", help="a version label (default: the newest / every version)"
            )
        command.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address")
    return parser


def _bundle_commands(bundle: argparse.ArgumentParser) -> None:
    actions = bundle.add_subparsers(dest="bundle_command", required=True)
    build = actions.add_parser("build", help="build a bundle from a model folder (model.toml)")
    build.add_argument("source", help="folder with model.toml, the model file, process.py, data")
    build.add_argument("--out", required=True, help="bundle directory to create")
    build.add_argument("--archive", help="also write a single-file bundle (.wsb) here")
    build.add_argument("--include", nargs="*", default=[], help="more files of the folder to add")
    for name in ("verify", "inspect"):
        actions.add_parser(name, help=f"{name} a bundle directory or .wsb").add_argument("path")


def _bundle(args: argparse.Namespace) -> int:
    from serve.bundles.archive import SUFFIX, extract_archive, write_archive
    from serve.bundles.build import build_bundle, describe
    from serve.bundles.cache import BundleCache
    from serve.bundles.verify import verify_bundle

    if args.bundle_command == "build":
        bundle = build_bundle(Path(args.source), Path(args.out), tuple(args.include))
        if args.archive:
            write_archive(bundle.path, Path(args.archive))
        print(f"built {bundle.model.name} version {bundle.model.version}: {bundle.id}")
        return 0
    path = Path(args.path)
    if path.suffix == SUFFIX:
        bundle = extract_archive(path, BundleCache(cache_dir_from_env() / "bundles"))
    else:
        bundle = verify_bundle(path)
    if args.bundle_command == "verify":
        print(f"ok: {bundle.model.name} version {bundle.model.version}, id {bundle.id}")
    else:
        print(json.dumps(describe(bundle), indent=2))
    return 0


def _files_command(args: argparse.Namespace) -> int:
    """``demo`` and ``bundle``: what they read or write on disk is named by the user, so a
    path that is not what it should be (a file for a folder, no permission, a full disk) is the
    user's to fix: one line naming it, not a traceback."""
    try:
        if args.command == "bundle":
            return _bundle(args)
        target = Path(args.directory)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            # (the demo builder replaces its target whole: it would delete what is there)
            raise ConfigError(
                f"{target} exists and is not an empty folder; the demo models would replace "
                "it: name a new or empty folder"
            )
        from serve.testing.demo import build

        build(target, as_bundles=not args.sources)
        return 0
    except OSError as exc:
        print(f"warmserve {args.command}: {exc}", file=sys.stderr)
        return 2


def _control(args: argparse.Namespace) -> int:
    from serve.frontend.client import control

    values: dict[str, str | bool] = {}
    version = getattr(args, "version", None)
    if version is not None:
        if not version.strip():  # (an unset shell variable: it acted on every version)
            default = "the newest version" if args.command == "load" else "every version"
            raise ConfigError(
                f"--version is empty: name a version label, or leave the flag out to "
                f"{args.command} {default}"
            )
        values["version"] = version
    if args.command == "rollback":
        values["rollback"] = True
    control(args.url, "unload" if args.command == "unload" else "load", args.model, values)
    print(f"{args.command}: {args.model} done")
    return 0


def demo_repository() -> Path:
    """The demo repository in the cache, built on first use in a subprocess (torch stays out)."""
    target = cache_dir_from_env() / f"demo-bundles-{__version__}"
    if not target.is_dir():
        log.info("building the demo models into %s (first run)", target)
        subprocess.run(
            [sys.executable, "-m", "serve.testing.demo", str(target)],
            check=True,
            timeout=DEMO_BUILD_TIMEOUT_S,
        )
    return target


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("demo", "bundle"):
            return _files_command(args)
        if args.command in ("load", "unload", "rollback"):
            return _control(args)
        if args.command == "index":
            from serve.frontend.client import index

            for name, version, state, reason in index(args.url):
                print(f"{name}\t{version}\t{state}\t{reason}")
            return 0
        server = server_config_from_env(
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            health_port=args.health_port,
            drain_delay_s=args.drain_delay,
            model_control=args.model_control,
            max_message_bytes=args.max_message_bytes,
            max_inflight_bytes=args.max_inflight_bytes,
            grace_period_s=args.grace_period,
            log_level=args.log_level,
            require_gpu=args.require_gpu,
            frontends=args.frontends,
            max_connection_age_s=args.max_connection_age,
        )
        logging.basicConfig(
            level=server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        from serve.frontend import grpc_logs, grpc_process

        grpc_process.prepare()  # before gRPC is imported (no fork handlers: grpc_process.py)
        grpc_logs.install()  # a client gone before its answer: one INFO line, not a traceback
        from serve.memory import keep_large_buffers_in_heap

        keep_large_buffers_in_heap()  # before the first request's buffers (serve/memory.py)
        if args.repository is not None and not args.repository.strip():
            # (an unset shell variable, --repository "$MODELS", served the demo models instead)
            raise ConfigError(
                "--repository is empty: name the model repository folder (leave the flag out "
                "to serve the demo models)"
            )
        repository = Path(args.repository or default_repository_from_env() or demo_repository())
        if not repository.is_dir():
            raise ConfigError(f"model repository {repository} is not a directory")
        for marker in (MODEL_CONFIG_FILE, MANIFEST_FILE):  # (its parent is the repository)
            if (repository / marker).is_file():
                raise ConfigError(
                    f"model repository {repository} is itself a model (it holds {marker}): "
                    f"pass the folder that holds the models, {repository.resolve().parent}"
                )
        config = Config(
            server=server, repository=str(repository), cache_dir=str(cache_dir_from_env())
        )
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_serve(config))
    except ServeError as exc:
        print(f"warmserve: {exc}", file=sys.stderr)
        return 2
    except subprocess.SubprocessError as exc:
        print(f"warmserve: building the demo models failed: {exc}", file=sys.stderr)
        return 2


async def _serve(config: Config) -> int:
    from serve.app import serve

    return await serve(config)
