"""Ctrl-C as a request: the first SIGINT asks the run to stop after the current step (the
trainers poll it between optimizer steps, save a checkpoint and raise `Interrupted`); a
second one interrupts at once (state.json is still consistent: it is only ever replaced
whole, after a phase's artefacts are complete)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

# The same event the trainers poll (mindprint_mlx.train.loop.stop_requested), so the first
# Ctrl-C stops SFT, reward training and PPO after their current optimizer step.
from ..train.loop import _STOP as _requested


def requested() -> bool:
    """True once Ctrl-C was pressed; trainers may poll this between steps."""
    return _requested.is_set()


def request() -> None:
    _requested.set()


def clear() -> None:
    _requested.clear()


@contextlib.contextmanager
def graceful_sigint(message: str = "stopping after the current step (Ctrl-C again to abort)") -> Iterator[None]:
    """Install the two-stage SIGINT handler for the duration of a run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if _requested.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        _requested.set()
        print(f"\n{message}", file=sys.stderr, flush=True)

    clear()
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
