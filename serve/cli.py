"""``warmserve`` command line: flags → frozen config → app."""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
from pathlib import Path

from serve import __version__
from serve.config import (
    Config,
    cache_dir_from_env,
    default_repository_from_env,
    load_repository,
    server_config_from_env,
)
from serve.errors import ServeError

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
    serve.add_argument("--grace-period", type=float, help="seconds in-flight calls get on SIGTERM")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    demo = commands.add_parser("demo", help="write the built-in demo models to a folder")
    demo.add_argument("directory")
    return parser


def demo_repository() -> Path:
    """The demo repository in the cache, built on first use in a subprocess (torch stays out)."""
    target = cache_dir_from_env() / f"demo-{__version__}"
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
    if args.command == "demo":
        from serve.testing.demo import build

        build(Path(args.directory))
        return 0
    try:
        server = server_config_from_env(
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            health_port=args.health_port,
            drain_delay_s=args.drain_delay,
            max_message_bytes=args.max_message_bytes,
            grace_period_s=args.grace_period,
            log_level=args.log_level,
        )
        logging.basicConfig(
            level=server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        repository = Path(args.repository or default_repository_from_env() or demo_repository())
        config = Config(
            server=server, models=load_repository(repository), repository=str(repository)
        )
        if not config.models:
            log.warning("no models in %s: the server will never be ready", repository)
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
