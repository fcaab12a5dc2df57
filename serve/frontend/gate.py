"""The front end's readiness gate, shared by gRPC health, ServerReady/ModelReady and HTTP.

Closed until the front end's own inference path has been warmed (a loopback call per model),
open while serving, closed again the moment shutdown begins. Readiness is the gate AND the
runtime's own readiness.
"""

from __future__ import annotations

from collections.abc import Callable


class ReadinessGate:
    def __init__(self) -> None:
        self.open = False
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def set(self, open_: bool) -> None:
        if open_ != self.open:
            self.open = open_
            for listener in self._listeners:
                listener()
