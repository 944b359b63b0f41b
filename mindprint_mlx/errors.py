"""Errors a user can cause. The CLI prints them as one line, never a traceback."""


class MindprintError(Exception):
    """Bad input or an impossible request; the message names the file, key or value."""
