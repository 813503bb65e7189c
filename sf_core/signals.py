"""SIGINT / SIGTERM while a command runs: stop cleanly instead of dying mid-write.

    with StopSignals() as stop:          # "raise": the signal raises Interrupted where the code is
        ...                              # (temporary files are removed by atomic_path on the way out)

    with StopSignals(defer=True) as stop:
        while not stop.requested: ...    # "defer": the first signal only sets `requested`; the loop stops
                                         # at its next safe point; a second signal raises Interrupted

Handlers are installed only in the main thread (elsewhere the context does nothing) and the previous
ones are restored on exit.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised by StopSignals; `signum` is the signal received. Exit status 128 + signum by convention."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    def __init__(self, defer: bool = False):
        self.defer = defer
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.defer and self.signum is None:
            self.signum = signum
            return
        self.signum = signum
        raise Interrupted(signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
