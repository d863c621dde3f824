"""Ctrl-C and SIGTERM during training: the first asks for a stop, a second Ctrl-C stops now."""

from __future__ import annotations

import signal
import threading
from typing import Callable


class StopSignals:
    """``requested`` turns true on the first SIGINT or SIGTERM; the trainer finishes the step,
    saves and stops (see :mod:`.trainer`). A second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> Callable[[], None]:
        """Install the handlers (main thread only: Python delivers signals there); returns
        the function that puts the previous ones back."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True

        for s in previous:
            signal.signal(s, handler)

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
        return restore
