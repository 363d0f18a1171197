"""Exception hierarchy: the CLI maps each to one stderr line and an exit code."""

from __future__ import annotations


class AlselectError(Exception):
    """A runtime failure the user can act on (exit code 1)."""

    exit_code = 1


class UsageError(AlselectError):
    """The command line asked for something impossible (exit code 2)."""

    exit_code = 2


class DataError(AlselectError):
    """The image folder or an input list is missing or unusable."""


class CheckpointError(AlselectError):
    """The checkpoint cannot be found, trusted, or loaded."""


class StoreError(AlselectError):
    """The store is unreadable, from a newer version, or in an unexpected state."""


class StoreLockedError(StoreError):
    """Another process holds the store's writer lock past the wait limit."""


class NoRunError(AlselectError):
    """An export or query needs a scoring run and the store has none."""


class NothingUsableError(AlselectError):
    """A run found nothing usable (the folder vanished, every image failed): exit code 3 for cron."""

    exit_code = 3


class OutputClosedError(AlselectError):
    """The reader of stdout went away mid-write (broken pipe): nothing was recorded."""
