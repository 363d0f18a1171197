"""``OutputWriter``: an embedding pass's registrations on a background thread, in order, grouped
when batches wait (one append and transaction for several), errors raised in the loop's thread."""

from __future__ import annotations

import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import numpy as np
import pytest

from alselect import pipeline
from alselect.errors import StoreError
from alselect.store import Store
from alselect.store.writer import OutputWriter, _Outputs
from tests.helpers import FAST, MakeImages, assert_stored_as_direct_forward, score

KEY = "c" * 64


def sha(i: int) -> str:
    return f"{(i * 0x9E3779B97F4A7C15) % (1 << 256):064x}"


def batch(ids: range, width: int = 4) -> tuple[list[str], dict[str, np.ndarray]]:
    n = len(ids)
    return [sha(i) for i in ids], {
        "probs": np.full((n, 3), 1 / 3, np.float32),
        "embedding": np.array([[i] * width for i in ids], np.float32),
    }


@pytest.fixture
def store(tmp_path: Path) -> Store:
    opened = Store.open(tmp_path / "store", write=True, create=True)
    opened.register_model(KEY, KEY, "/m.pt", "test", None, 3, None, {})
    yield opened
    opened.close()


def stored_embeddings(store: Store, ids: range) -> np.ndarray:
    found, arrays = store.outputs_of(KEY, ["embedding"], [sha(i) for i in ids])
    assert found.all()
    return arrays["embedding"]


def blocked_writer(store: Store, **kwargs: int) -> tuple[OutputWriter, threading.Event]:
    """A writer whose thread waits in a ``call`` until the returned event is set."""
    writer = OutputWriter(store, KEY, **kwargs)
    release, started = threading.Event(), threading.Event()
    writer.call(lambda: (started.set(), release.wait(10)))
    assert started.wait(10)
    return writer, release


def test_batches_waiting_are_registered_in_one_transaction(store: Store) -> None:
    writer, release = blocked_writer(store)
    with mock.patch.object(store, "add_outputs", wraps=store.add_outputs) as add:
        for lo in (0, 5, 10):
            writer.put(*batch(range(lo, lo + 5)))
        release.set()
        writer.close()
    assert [len(call.args[1]) for call in add.call_args_list] == [15]  # one group of three batches
    assert (writer.batches, writer.groups) == (3, 1)
    np.testing.assert_array_equal(stored_embeddings(store, range(15))[:, 0], np.arange(15))


def test_a_writer_that_keeps_up_registers_each_batch_alone(store: Store) -> None:
    with (
        mock.patch.object(store, "add_outputs", wraps=store.add_outputs) as add,
        OutputWriter(store, KEY) as writer,
    ):
        for lo in (0, 3, 6):
            writer.put(*batch(range(lo, lo + 3)))
            done = threading.Event()
            writer.call(done.set)
            assert done.wait(10)  # the loop waits: nothing is left to group
    assert [len(call.args[1]) for call in add.call_args_list] == [3, 3, 3]


def test_groups_stop_at_group_rows(store: Store) -> None:
    writer, release = blocked_writer(store, group_rows=4, queue_batches=8)
    with mock.patch.object(store, "add_outputs", wraps=store.add_outputs) as add:
        for lo in range(0, 10, 2):
            writer.put(*batch(range(lo, lo + 2)))
        release.set()
        writer.close()
    sizes = [len(call.args[1]) for call in add.call_args_list]
    assert sum(sizes) == 10 and max(sizes) == 4


def test_calls_run_in_order_with_the_batches(store: Store) -> None:
    seen: list[int] = []
    count = "SELECT (SELECT COUNT(*) FROM outputs) + (SELECT COUNT(*) FROM outputs_log)"
    writer, release = blocked_writer(store)
    writer.put(*batch(range(0, 4)))
    writer.call(lambda: seen.append(int(store.scalar(count))))
    writer.put(*batch(range(4, 6)))
    release.set()
    writer.close()
    assert seen == [4]  # the second batch was not grouped ahead of the call
    assert int(store.scalar(count)) == 6


def test_the_callers_buffers_may_be_reused_after_put(store: Store) -> None:
    writer, release = blocked_writer(store)
    shas, arrays = batch(range(3))
    writer.put(shas, arrays)
    arrays["embedding"][:] = -1  # a reused output buffer
    release.set()
    writer.close()
    np.testing.assert_array_equal(stored_embeddings(store, range(3))[:, 0], [0, 1, 2])


def test_a_failed_registration_is_raised_in_the_loop(store: Store) -> None:
    writer = OutputWriter(store, KEY)
    writer.put(*batch(range(2)))
    writer.put(*batch(range(2, 4), width=5))  # another layout than the model's first batch
    with pytest.raises(StoreError, match="stores"):
        for lo in range(4, 400, 2):  # a put after the failure raises it (at the latest at close)
            writer.put(*batch(range(lo, lo + 2)))
        writer.close()
    with pytest.raises(StoreError):
        writer.close()  # and keeps raising it
    assert store.outputs_of(KEY, ["embedding"], [sha(0), sha(1)])[0].all()  # the batch before stays


def test_an_error_in_the_loop_keeps_what_was_handed_over(store: Store) -> None:
    with pytest.raises(ValueError, match="model failed"), OutputWriter(store, KEY) as writer:
        writer.put(*batch(range(4)))
        raise ValueError("model failed")
    np.testing.assert_array_equal(stored_embeddings(store, range(4))[:, 0], np.arange(4))


def test_arrays_that_do_not_match_their_batch_are_refused_where_they_are_put(store: Store) -> None:
    # Alone, add_outputs refuses such a batch; grouped, 3 + 1 rows for 2 + 2 contents would line up
    # and store row 3 (batch 1's extra) under batch 2's first content.
    writer, release = blocked_writer(store)
    with pytest.raises(ValueError, match=r"'embedding' has shape \(3, 1\) for 2 images"):
        writer.put([sha(0), sha(1)], {"embedding": np.array([[0.0], [1.0], [99.0]], np.float32)})
    with pytest.raises(ValueError, match=r"'embedding' has shape \(1, 1\) for 2 images"):
        writer.put([sha(2), sha(3)], {"embedding": np.array([[3.0]], np.float32)})
    with pytest.raises(ValueError, match=r"'loss_pred' has shape \(\) for 1 images"):
        writer.put([sha(4)], {"loss_pred": np.float32(0.5)})
    release.set()
    writer.close()
    assert writer.batches == 0
    assert not store.outputs_of(KEY, ["embedding"], [sha(i) for i in range(4)])[0].any()


def test_an_interrupt_while_closing_drops_what_waits_but_never_leaves_the_thread_on_the_store(
    store: Store,
) -> None:
    # A second Ctrl-C while close() waits: the store is closed next (the CLI's ``with``), so the
    # thread must be gone first; the batch still waiting is dropped (the next run embeds it again).
    writer, release = blocked_writer(store)
    writer.put(*batch(range(2)))
    join = writer._thread.join
    waits: list[bool] = []

    def interrupted_join(timeout: float | None = None) -> None:
        waits.append(True)
        if len(waits) == 1:
            raise KeyboardInterrupt  # lands in the first wait
        release.set()  # only a writer that waits again lets the blocked write finish
        join(timeout)

    writer._thread.join = interrupted_join  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        writer.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)  # the first Ctrl-C left the loop
    alive = writer._thread.is_alive()
    release.set()
    join(10)
    assert not alive
    assert not store.outputs_of(KEY, ["embedding"], [sha(0), sha(1)])[0].any()


class _HeldWriter(OutputWriter):
    """Every batch of the pass waits until it ends, then goes in groups of at most 5 images."""

    made: ClassVar[list[OutputWriter]] = []

    def __init__(self, store: Store, model_key: str, **_: Any) -> None:
        super().__init__(store, model_key, queue_batches=1000, group_rows=5)
        self._release, started = threading.Event(), threading.Event()
        self.call(lambda: (started.set(), self._release.wait(60)))
        assert started.wait(60)
        self.made.append(self)

    def close(self) -> None:
        self._release.set()
        super().close()


def test_a_pass_whose_batches_all_wait_stores_each_image_its_own_outputs(
    tmp_path: Path,
    store_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Grouped batches, split by decode failures (recorded on the writer thread between them) and
    # by the group size, against the model run on each image directly.
    files = make_images(tmp_path / "pool", 11)
    for i in (2, 7):
        (tmp_path / "pool" / f"img_{i:04d}_bad.png").write_bytes(b"not an image %d" % i)
    shutil.copy(files[4], tmp_path / "pool" / "z_copy.png")
    monkeypatch.setattr(pipeline, "OutputWriter", _HeldWriter)
    _HeldWriter.made.clear()
    result = score(
        store_path, tmp_path / "pool", tiny_checkpoint, options=replace(FAST, precision="fp32", batch_size=3)
    )
    [writer] = _HeldWriter.made
    assert writer.batches > writer.groups > 1  # batches were grouped, in more than one group
    assert result.embed.embedded == 11
    assert [name for name, _ in result.embed.failures] == ["img_0002_bad.png", "img_0007_bad.png"]
    key = result.embed.model_key
    assert_stored_as_direct_forward(store_path, tmp_path / "pool", key, tiny_checkpoint, files)


def test_a_group_holds_no_more_than_the_queue_even_when_the_loop_puts_while_it_is_taken(
    store: Store,
) -> None:
    # What a kill -9 loses is bounded by the queue: the group being written takes at most what
    # waited. The loop's blocked put can land between the writer's first take and the rest.
    writer, release = blocked_writer(store, queue_batches=2)
    writer.put(*batch(range(0, 2)))
    writer.put(*batch(range(2, 4)))
    late = [_Outputs(*batch(range(4, 6)))]
    take = writer._queue.get

    def take_then_the_loop_puts(*args: Any, **kwargs: Any) -> Any:
        item = take(*args, **kwargs)
        if late:
            writer._queue.put_nowait(late.pop())  # into the slot just freed
        return item

    with mock.patch.object(store, "add_outputs", wraps=store.add_outputs) as add:
        writer._queue.get = take_then_the_loop_puts  # type: ignore[method-assign]
        release.set()
        writer.close()
    assert [len(call.args[1]) for call in add.call_args_list] == [4, 2]
    np.testing.assert_array_equal(stored_embeddings(store, range(6))[:, 0], np.arange(6))
