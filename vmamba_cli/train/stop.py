"""Stop requests (Ctrl-C / SIGTERM) and what step hooks see."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable


class StopRequest:
    """While entered: the first Ctrl-C (or SIGTERM) asks the run to stop after the current step and
    save; a second Ctrl-C aborts at once."""

    def __init__(self, log: Callable[[str], None]):
        self.requested = False
        self._log = log
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self._log("stop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False


@dataclass
class StepInfo:
    """What hooks see after each optimizer step."""

    epoch: int            # 0-based epoch being trained
    step: int             # optimizer steps done in this epoch
    global_step: int
    loss: float
    lr: float
    stop: StopRequest
