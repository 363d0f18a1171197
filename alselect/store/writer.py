"""An embedding pass's store writes on a background thread, grouped when the model outpaces the disk.

Registering a batch costs a round trip to the disk (its arrays appended and fsynced, then one
transaction), about 1 ms for 64 images and 5 ms for 1,024 on the VM measured
(docs/benchmarks.md). Done in the model's loop, that is time the model waits; at small batches on
a fast GPU it would cap the run (64 images per ms is 57,000 images/s at best). ``OutputWriter``
takes each batch off the loop: the loop hands it over and goes on, one thread registers batches in
the order given, and when batches are waiting it registers them together (one append and fsync per
array file, one transaction: group commit), so the store keeps up with any model.

What a ``kill -9`` can lose grows from the batch being written to the group being written (the
batches that waited: at most ``QUEUE_BATCHES``, and ``GROUP_ROWS`` images) plus the batches
waiting since (at most ``QUEUE_BATCHES``); the store stays consistent either way
(``Store.add_outputs``) and the next run embeds them again.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from alselect.store import storable

if TYPE_CHECKING:
    from alselect.store import Store

QUEUE_BATCHES = 4  # batches handed over and waiting; the loop blocks on a fifth
GROUP_ROWS = 8192  # at most this many images registered in one append and transaction
_STOP = object()


class _Outputs:
    """One handed-over batch: ``sha256 [n]`` and ``name -> [n, ...]`` arrays."""

    __slots__ = ("arrays", "sha256")

    def __init__(self, sha256: list[str], arrays: dict[str, np.ndarray]) -> None:
        self.sha256 = sha256
        self.arrays = arrays

    def layout(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(self.arrays.items()))


class OutputWriter:
    """Registers ``model_key``'s outputs in ``store`` on one background thread, in hand-over order.

    ``put`` hands a batch over; ``call`` runs any other write of the pass (failures to record)
    on the same thread, in order with the batches. A write that fails stops the writer: the next
    ``put``/``call`` and ``close`` raise its error. Use as a context manager: leaving it waits for
    every batch handed over to be registered. While it is open, nothing else may use ``store``.
    """

    def __init__(
        self,
        store: Store,
        model_key: str,
        *,
        queue_batches: int = QUEUE_BATCHES,
        group_rows: int = GROUP_ROWS,
    ) -> None:
        self.store = store
        self.model_key = model_key
        self.group_rows = group_rows
        self.groups = 0  # add_outputs calls made (each one transaction); batches put: ``batches``
        self.batches = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_batches))
        self._error: BaseException | None = None
        self._closed = False
        self._stop_sent = False
        self._drop = False  # set by an interrupted close: what has not begun is not written
        self._thread = threading.Thread(target=self._run, name="alselect-output-writer", daemon=True)
        self._thread.start()

    # -- the loop's side ---------------------------------------------------------------------

    def put(self, sha256: Sequence[str], arrays: Mapping[str, np.ndarray]) -> None:
        """Hand over one batch; its arrays are copied, so the caller may reuse its buffers.

        Each array must have a row per content (``ValueError`` here, as ``Store.add_outputs``
        says it): grouped with others, a batch with rows to spare and one short of rows would
        line up and store rows under other contents' hashes.
        """
        self._check()
        n = len(sha256)
        if n == 0:
            return
        copies = {name: np.array(storable(name, a, n), copy=True) for name, a in arrays.items()}
        self.batches += 1
        self._queue.put(_Outputs(list(sha256), copies))

    def call(self, write: Callable[[], object]) -> None:
        """Run ``write`` (a store write) on the writer thread, after the batches handed over so far."""
        self._check()
        self._queue.put(write)

    def close(self) -> None:
        """Wait until everything handed over is registered; raise the writer's error, if any.

        Interrupted while it waits (a second Ctrl-C), it drops the writes not yet begun (the next
        run embeds them again) and still waits for the one in progress before raising: the caller
        closes the store next, and no thread may be using it then.
        """
        if not self._closed:
            self._closed = True
            try:
                self._stop()
            except BaseException:
                self._drop = True
                while True:
                    try:
                        self._stop()
                        break
                    except KeyboardInterrupt:
                        continue
                raise
        if self._error is not None:
            raise self._error

    def _stop(self) -> None:
        if not self._stop_sent:
            self._queue.put(_STOP)
            self._stop_sent = True
        self._thread.join()

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the loop failed: keep what was handed over, say its error
            self.close()

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("OutputWriter is closed")
        if self._error is not None:
            raise self._error

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            rows = len(items[0].sha256) if isinstance(items[0], _Outputs) else 0
            # no more than the queue holds: a put that lands while they are taken waits for the
            # next group, so what a kill -9 can lose stays bounded by the queue (module docstring)
            while items[-1] is not _STOP and rows < self.group_rows and len(items) < self._queue.maxsize:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                items.append(item)
                rows += len(item.sha256) if isinstance(item, _Outputs) else 0
            if self._error is None and not self._drop:
                try:
                    self._write(items)
                except BaseException as exc:  # handed to the loop's thread
                    self._error = exc
            if items[-1] is _STOP:
                return

    def _write(self, items: list[Any]) -> None:
        group: list[_Outputs] = []
        for item in items:
            if isinstance(item, _Outputs):  # ``_run`` took no more than ``group_rows`` for them
                if group and group[0].layout() != item.layout():
                    self._register(group)
                    group = []
                group.append(item)
                continue
            self._register(group)
            group = []
            if item is not _STOP and not self._drop:
                item()
        self._register(group)

    def _register(self, group: list[_Outputs]) -> None:
        if not group or self._drop:
            return
        if len(group) == 1:
            sha256, arrays = group[0].sha256, group[0].arrays
        else:
            sha256 = [sha for item in group for sha in item.sha256]
            arrays = {name: np.concatenate([item.arrays[name] for item in group]) for name in group[0].arrays}
        self.store.add_outputs(self.model_key, sha256, arrays)
        self.groups += 1
