"""How library code reports progress and notes without knowing about terminals."""

from __future__ import annotations


class Reporter:
    """Receives progress and messages from library calls; the default ignores everything.

    The CLI subclasses this to draw progress bars on a terminal and log to stderr.
    """

    def progress(self, stage: str, done: int, total: int | None) -> None:
        """``done`` of ``total`` items finished in ``stage`` (``total`` None when unknown)."""

    def info(self, message: str) -> None:
        """A line worth showing unless ``--quiet``."""

    def warning(self, message: str) -> None:
        """Something the user should act on; the run continues."""


NULL_REPORTER = Reporter()
