"""A small progress bar on stderr: rate, ETA and live stats; plain lines when not a TTY."""

from __future__ import annotations

import sys
import time
from typing import Mapping


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """`with Progress(total, "sft") as bar: bar.update(1, loss=..)`.

    On a terminal it redraws one line; otherwise it prints a line every `every` seconds
    so logs stay readable. `enabled=False` silences it (rank > 0, tests).
    """

    def __init__(self, total: int | None, desc: str = "", enabled: bool = True,
                 initial: int = 0, every: float = 10.0, stream=None):
        self.total, self.desc, self.n = total, desc, initial
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every
        self.start = time.perf_counter()
        self.start_n = initial
        self.last_print = 0.0
        self.stats: dict = {}

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **stats) -> None:
        self.n += n
        self.stats.update(stats)
        now = time.perf_counter()
        if self.enabled and (self.tty or now - self.last_print >= self.every
                             or (self.total and self.n >= self.total)):
            self._draw(now)

    def set_stats(self, stats: Mapping) -> None:
        self.stats.update(stats)

    def _line(self, now: float) -> str:
        done = self.n - self.start_n
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(1.0, self.n / self.total)
            width = 20
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            eta = (self.total - self.n) / rate if rate > 0 else 0
            head = f"{self.desc} [{bar}] {self.n}/{self.total} {_hms(elapsed)}<{_hms(eta)}"
        else:
            head = f"{self.desc} {self.n} {_hms(elapsed)}"
        stats = " ".join(f"{k}={_fmt(v)}" for k, v in self.stats.items())
        return f"{head} {rate:.2f}it/s {stats}".rstrip()

    def _draw(self, now: float) -> None:
        self.last_print = now
        line = self._line(now)
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()

    def write(self, msg: str) -> None:
        """A message above the bar."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + msg + "\n")
            self._draw(time.perf_counter())
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()
