"""The stop request: one flag for the whole process, the Ctrl-C handler that sets it and
the poll every trainer makes between optimizer steps.

The first Ctrl-C (under `graceful_sigint`) only asks: the trainers finish their current
optimizer step, save a checkpoint and raise `errors.Interrupted`; the pipeline checks
between phases and raises the same. A second Ctrl-C interrupts at once (the pipeline's
state.json is still consistent: it is only ever replaced whole). Tests and callers stop a
run in process with `request_stop()`.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

_STOP = threading.Event()


def stop_requested() -> bool:
    """True once a stop was requested (this process only; see `stop_now` for all ranks)."""
    return _STOP.is_set()


def request_stop() -> None:
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def stop_now() -> bool:
    """The stop decision, agreed by every rank (one all-reduce when distributed), so that
    all ranks leave the loop after the same step and none waits on a collective."""
    from . import distributed as dist

    import mlx.core as mx

    flag = stop_requested()
    if dist.size() == 1:
        return flag
    return dist.global_sum(mx.array(1.0 if flag else 0.0)).item() > 0


@contextlib.contextmanager
def graceful_sigint(message: str = "stopping after the current step (Ctrl-C again to abort)") -> Iterator[None]:
    """Install the two-stage SIGINT handler for the duration of a run (main thread only);
    a stop request left from before is cleared."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if _STOP.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        _STOP.set()
        print(f"\n{message}", file=sys.stderr, flush=True)

    clear_stop()
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
