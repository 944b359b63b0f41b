"""Errors a user can cause. The CLI prints them as one line, never a traceback."""

from __future__ import annotations

from pathlib import Path


class MindprintError(Exception):
    """Bad input or an impossible request; the message names the file, key or value."""


class Interrupted(MindprintError):
    """A trainer stopped between steps because a stop was requested; its checkpoint at
    `step` is complete, so the same call with `resume=True` continues exactly."""

    def __init__(self, what: str, step: int, checkpoint: str | Path | None):
        self.what, self.step, self.checkpoint = what, step, checkpoint
        where = f"; checkpoint in {checkpoint}" if checkpoint else ""
        super().__init__(f"{what}: stopped at step {step} on request{where}; resume to continue")
