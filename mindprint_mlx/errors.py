"""Errors a user can cause. The CLI prints them as one line, never a traceback."""

from __future__ import annotations

from pathlib import Path


class MindprintError(Exception):
    """Bad input or an impossible request; the message names the file, key or value."""


class Interrupted(MindprintError):
    """A run stopped because a stop was requested (`mindprint_mlx.stop`): a trainer between
    optimizer steps, its checkpoint at `step` complete, or the pipeline between phases
    (`step` None); the same call with resume continues exactly."""

    def __init__(self, what: str, step: int | None = None, checkpoint: str | Path | None = None):
        self.what, self.step, self.checkpoint = what, step, checkpoint
        at = f" at step {step}" if step is not None else ""
        where = f"; checkpoint in {checkpoint}" if checkpoint else ""
        super().__init__(f"{what}: stopped{at} on request{where}; resume to continue")
