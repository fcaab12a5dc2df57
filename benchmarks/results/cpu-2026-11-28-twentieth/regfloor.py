"""The floor server with its registered methods chosen by REG: "all" (as the generated code
registers them), "hot" (ModelInfer and ModelStreamInfer only) or "none" (generic handlers only).
Run before the change, when the floor registered every method; used by regab.py."""

from __future__ import annotations

import os
import sys
from typing import Any

import grpc.aio._server as aio_server

_register = aio_server.Server.add_registered_method_handlers


def _chosen(self: Any, service: str, handlers: dict[str, Any]) -> None:
    mode = os.environ.get("REG", "all")
    if mode == "none":
        return
    if mode == "hot":
        handlers = {k: v for k, v in handlers.items() if k in ("ModelInfer", "ModelStreamInfer")}
    _register(self, service, handlers)


aio_server.Server.add_registered_method_handlers = _chosen  # type: ignore[method-assign]
sys.argv = ["floor_server", *sys.argv[1:]]

from benchmarks import floor_server  # noqa: E402  (after the patch)

floor_server.main()
