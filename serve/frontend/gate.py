"""The front end's readiness gate, shared by gRPC health, ServerReady/ModelReady and HTTP.

Closed until the front end's own inference path has been warmed (a loopback call per model),
open while serving, closed again the moment shutdown begins, and shut while a condition added
with ``require`` fails (no relay listening). Readiness is the gate AND the runtime's own
readiness.
"""

from __future__ import annotations

from collections.abc import Callable


class ReadinessGate:
    def __init__(self) -> None:
        self._opened = False
        self._conditions: list[Callable[[], bool]] = []
        self._listeners: list[Callable[[], None]] = []

    @property
    def open(self) -> bool:
        """Opened, and every condition added holds (with relays: one of them listens)."""
        return self._opened and all(condition() for condition in self._conditions)

    def require(self, condition: Callable[[], bool]) -> None:
        """Keep the gate shut while ``condition`` is false; call changed() when it may flip."""
        self._conditions.append(condition)

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def set(self, open_: bool) -> None:
        if open_ != self._opened:
            self._opened = open_
            self.changed()

    def changed(self) -> None:
        for listener in self._listeners:
            listener()
