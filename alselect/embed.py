"""Batched inference over image files: decode in worker processes, run the model, hand back arrays.

Two engines produce the same ``(indices, outputs, failures)`` batches for the caller to store:
``local`` (this module: DataLoader decode workers, the model in this process) and ``ray``
(``alselect.ray_engine``: decode in Ray tasks, the model in an actor pool across a cluster).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from alselect.device_decode import DeviceDecoder, JpegFile, device_decodable
from alselect.devices import check_device
from alselect.errors import AlselectError, UsageError
from alselect.images import (
    OUT_OF_MEMORY,
    ImageDecodeError,
    decode_image_geometry,
    jpeg_header,
    load_image_geometry,
    read_image_file,
)
from alselect.inference import Accelerated, ThreadTuner, check_precision, resolve_precision
from alselect.limits import (
    DEFAULT_MAX_PIXELS,
    PREFETCH_BATCHES,
    check_batch_memory,
    default_threads,
    default_workers,
    usable_cpus,
)
from alselect.preprocess import Preprocess
from alselect.progress import NULL_REPORTER, Reporter


class OutputModel(Protocol):
    """What ``run_model`` drives: a ``LoadedModel`` or a wrapper of one (e.g. MC-dropout passes).

    A model with a true ``needs_geometry`` attribute is called as ``forward_outputs(batch,
    geometry)`` with ``geometry`` an ``int64 [n, 4]`` tensor on the CPU, one row per image as
    ``alselect.images.GEOMETRY`` describes (original height and width after EXIF orientation, the
    height and width the image occupies in the input): detection and segmentation runners need it
    to map boxes back to the image and to leave letterbox padding out.
    """

    def to(self, device: torch.device) -> Any: ...

    def forward_outputs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]: ...


DECODE_MODES = ("auto", "cpu", "gpu")
ENGINES = ("local", "ray")
EMBEDDING_DTYPES = ("float32", "float16")
RAY_INSTALL_HINT = "pip install 'alselect[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """How the Ray engine runs.

    ``address``: a running cluster (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``); None starts a
    local Ray instance for the run and shuts it down after. ``actors``: model actors (None: one per
    ``gpus_per_actor`` GPUs of the cluster, or half its CPUs without GPUs). ``gpus_per_actor``:
    None picks 1 when the cluster has GPUs and ``--device`` allows them, else 0.
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise UsageError(f"--ray-actors must be at least 1, got {self.actors}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise UsageError(f"--ray-gpus-per-actor must be >= 0, got {self.gpus_per_actor}")


@dataclass(frozen=True)
class EmbedOptions:
    """Where and how to run the model: device, batch size, decode workers, and the engine.

    ``workers`` and ``threads`` (decoding processes, torch threads of the model) default to a
    split of the CPUs this process may use (``alselect.limits``). ``precision``: ``auto``, ``fp32``,
    ``bf16`` or ``fp16`` (``alselect.inference``); ``compile``: run the model through
    ``torch.compile``; ``decode``: ``gpu`` decodes JPEGs in batches on the CUDA device
    (``alselect.device_decode``), ``cpu`` in the workers, ``auto`` the first with a CUDA device.
    """

    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None  # None: from the CPUs and the device; 0: decode in this process
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images fail as decompression bombs
    precision: str = "auto"
    compile: bool = False
    threads: int | None = None  # None: from the CPUs and the workers
    decode: str = "auto"  # where JPEGs are decoded: auto (gpu on CUDA devices), cpu, gpu
    embedding_dtype: str = "float32"  # the stored format of ``embedding`` arrays: float32 or float16
    engine: str = "local"  # "local" or "ray"
    ray: RayOptions = RayOptions()

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be local or ray, got {self.engine!r}")
        if self.decode not in DECODE_MODES:
            raise UsageError(f"--decode must be auto, cpu or gpu, got {self.decode!r}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise UsageError(f"--embedding-dtype must be float32 or float16, got {self.embedding_dtype!r}")

    def worker_count(self) -> int:
        if self.workers is not None:
            if self.workers < 0:
                raise UsageError(f"--workers must be >= 0, got {self.workers}")
            return self.workers
        return default_workers(accelerator=self.device != "cpu" and _cuda_present())

    def thread_count(self, workers: int, device: torch.device) -> int:
        """Torch threads for the model: ``threads``, or the CPUs the decoding workers leave."""
        if self.threads is not None:
            return self.threads
        return default_threads(workers, accelerator=device.type != "cpu")

    def thread_candidates(self, workers: int, device: torch.device) -> list[int]:
        """Thread counts ``ThreadTuner`` tries on a CPU device when ``threads`` is not given:
        the CPUs the workers leave, and all of them. One fixed count otherwise."""
        fixed = self.thread_count(workers, device)
        if self.threads is not None or device.type != "cpu":
            return [fixed]
        return [fixed, usable_cpus()]

    def check(self) -> None:
        """Fail before any work (the scan included): a missing local device, ``--decode gpu``
        without a CUDA one, bad counts, or a Ray engine that cannot run here."""
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        self.worker_count()
        if self.engine == "local":
            jpegs_on_device(self, resolve_device(self.device))
            return
        local_only = {
            "--precision": self.precision not in ("auto", "fp32"),
            "--compile": self.compile,
            "--threads": self.threads is not None,
            "--decode": self.decode != "auto",
        }
        if any(local_only.values()):
            named = ", ".join(name for name, given in local_only.items() if given)
            raise UsageError(f"{named}: only with the local engine (Ray runs the model in fp32)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(
                f"--device {self.device}: with --engine ray use auto, cpu or cuda (Ray gives actors GPUs)"
            )
        if self.device == "cpu" and self.ray.gpus_per_actor:
            raise UsageError("--device cpu and --ray-gpus-per-actor > 0 contradict each other")
        if importlib.util.find_spec("ray") is None:
            raise AlselectError(f"--engine ray needs Ray, which is not installed: {RAY_INSTALL_HINT}")


def _cuda_present() -> bool:
    return torch.cuda.is_available()


def resolve_device(spec: str, option: str = "--device") -> torch.device:
    """``auto`` picks CUDA when available; a device checked by ``check_device`` (``option`` names it)."""
    check_device(spec, option)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


# (index, pixels, failure reason, geometry, a JPEG left for the device to decode)
Decoded = tuple[int, "np.ndarray | None", "str | None", "np.ndarray | None", "JpegFile | None"]


def decode_file(
    path: Path,
    preprocess: Preprocess,
    expected_sha256: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    interleaved: bool = False,
) -> tuple[np.ndarray | None, str | None, np.ndarray | None]:
    """``(pixels, None, geometry)`` or ``(None, reason, None)``: ``load_image_geometry`` with its
    failure as the recorded reason (``interleaved`` as there).

    Every engine decodes through here, so failures and their reasons are the same everywhere.
    """
    try:
        pixels, geometry = load_image_geometry(
            path, preprocess, expected_sha256, max_pixels=max_pixels, interleaved=interleaved
        )
        return pixels, None, geometry
    except ImageDecodeError as exc:
        return None, str(exc), None
    except MemoryError:
        return None, OUT_OF_MEMORY, None


class BatchForward:
    """The model on a device, fed ``uint8 [n, 3, S, S]`` pixels: normalises, runs, returns numpy arrays.

    Shared by the engines so that a batch gives the same arrays whichever engine runs it.
    """

    def __init__(self, model: OutputModel, preprocess: Preprocess, device: torch.device) -> None:
        self.model = model
        self.device = device
        model.to(device)
        self.mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1) * 255.0

    def __call__(
        self, pixels: np.ndarray | torch.Tensor, geometry: np.ndarray | torch.Tensor | None = None
    ) -> dict[str, np.ndarray]:
        """``pixels uint8 [n, 3, S, S]`` (a tensor keeps its memory layout, e.g. channels_last,
        and may be pinned or already on the device); ``geometry int [n, 4]`` for models that need it."""
        batch = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(pixels))
        batch = batch.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        if getattr(self.model, "needs_geometry", False):
            if geometry is None:
                raise ValueError("this model needs each image's geometry")
            sizes = torch.as_tensor(
                np.asarray(geometry, dtype=np.int64) if isinstance(geometry, np.ndarray) else geometry
            )
            outputs = self.model.forward_outputs(batch, sizes)  # type: ignore[call-arg]
        else:
            outputs = self.model.forward_outputs(batch)
        return {name: value.cpu().numpy() for name, value in outputs.items()}


class _ImageFiles(Dataset[Decoded]):
    """Decodes file ``index`` (in a worker). With ``device_jpegs``, a JPEG the device can decode is
    only read, hashed and looked at: it comes back as a ``JpegFile``."""

    def __init__(
        self,
        paths: Sequence[Path],
        preprocess: Preprocess,
        expected_sha256: Sequence[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device_jpegs: bool = False,
    ) -> None:
        self.paths = paths
        self.preprocess = preprocess
        self.expected_sha256 = expected_sha256
        self.max_pixels = max_pixels
        self.device_jpegs = device_jpegs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Decoded:
        expected = None if self.expected_sha256 is None else self.expected_sha256[index]
        if not self.device_jpegs:
            path = self.paths[index]
            return (
                index,
                *decode_file(path, self.preprocess, expected, self.max_pixels, interleaved=True),
                None,
            )
        try:
            return self._for_device(index, expected)
        except ImageDecodeError as exc:
            return index, None, str(exc), None, None
        except MemoryError:
            return index, None, OUT_OF_MEMORY, None, None

    def _for_device(self, index: int, expected: str | None) -> Decoded:
        data = read_image_file(self.paths[index], expected)
        header = jpeg_header(data, self.max_pixels) if data else None
        if device_decodable(header):
            assert header is not None
            width, height, orientation, _ = header
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return index, None, None, None, JpegFile(index, raw, width, height, orientation)
        pixels, geometry = decode_image_geometry(
            data, self.preprocess, max_pixels=self.max_pixels, interleaved=True
        )
        return index, pixels, None, geometry, None


@dataclass
class DecodedBatch:
    """One batch as a decoding worker hands it over (``jpegs``: see ``alselect.device_decode``).

    ``pixels``: ``uint8 [n, 3, S, S]`` of the ``n`` decoded images, stored ``[n, S, S, 3]`` (the
    channels_last layout, built straight from Pillow's interleaved pixels in one copy); a tensor,
    so it crosses from a worker in shared memory and can be pinned for an asynchronous copy to the
    GPU. ``geometry``: ``int64 [n, 4]`` (``alselect.images.GEOMETRY``). ``indices``: the decoded
    files' indices; ``failures``: ``(index, reason)`` of the others; ``count``: files in the batch.
    """

    indices: list[int]
    pixels: torch.Tensor | None
    geometry: torch.Tensor | None
    failures: list[tuple[int, str]]
    count: int
    jpegs: list[JpegFile] = field(default_factory=list)  # not decoded yet: for the device

    def pin_memory(self) -> DecodedBatch:
        """The DataLoader's pinning thread calls this (``pin_memory=True`` on CUDA)."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def collate(items: list[Decoded]) -> DecodedBatch:
    """``DecodedBatch`` of decoded files (runs in the worker that decoded them)."""
    ok = [(index, pixels, geometry) for index, pixels, _, geometry, _ in items if pixels is not None]
    failures = [(index, reason) for index, _, reason, _, _ in items if reason is not None]
    jpegs = [jpeg for *_, jpeg in items if jpeg is not None]
    if not ok:
        return DecodedBatch([], None, None, failures, len(items), jpegs)
    channels, height, width = ok[0][1].shape
    batch = torch.empty((len(ok), height, width, channels), dtype=torch.uint8)
    np.stack([pixels.transpose(1, 2, 0) for _, pixels, _ in ok], out=batch.numpy())
    geometry = torch.from_numpy(
        np.stack([g if g is not None else np.zeros(4, np.int32) for _, _, g in ok]).astype(np.int64)
    )
    indices = [i for i, _, _ in ok]
    return DecodedBatch(indices, batch.permute(0, 3, 1, 2), geometry, failures, len(items), jpegs)


BatchSink = Callable[[list[int], dict[str, np.ndarray], list[tuple[int, str]]], None]

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int, _worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: on Linux the kernel SIGKILLs the worker when its parent dies.

    Without it a worker busy decoding outlives a killed main process until it finishes the file.
    Elsewhere (or if ``prctl`` is unavailable) this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL)) != 0:
            return
    except (OSError, AttributeError, TypeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _is_worker_death(exc: RuntimeError) -> bool:
    """The DataLoader's report of a worker that died (OOM killer, segfault), not an error it raised."""
    return "DataLoader worker (pid" in str(exc)


@contextlib.contextmanager
def _worker_deaths_deferred(replay: bool = True) -> Iterator[None]:
    """Hold off torch's SIGCHLD handler, which raises a worker's death wherever the main thread is.

    Inside the block (the model, ``on_batch``, shutting the workers down) such an exception would
    leave it unknown whether a batch was stored. After a clean exit a deferred SIGCHLD is replayed,
    so a death surfaces between batches; the loader would also notice it on its next wait.
    """
    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGCHLD)
    pending: list[int] = []

    def defer(signum: int, _frame: FrameType | None) -> None:
        pending.append(signum)

    signal.signal(signal.SIGCHLD, defer)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL if previous is None else previous)
    if replay and pending and callable(previous):
        previous(signal.SIGCHLD, None)


def _shutdown(iterator: Any) -> None:
    """Stop a multi-process loader's workers now rather than whenever the iterator is collected."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        with _worker_deaths_deferred(replay=False), contextlib.suppress(Exception):
            shutdown()


def decode_workers(options: EmbedOptions, total: int, reporter: Reporter = NULL_REPORTER) -> int:
    """Decoding processes for ``total`` images: ``options.worker_count()``, but no more than there are
    batches (a process without a batch only costs its start). More than the CPUs this process may
    use is the user's call (slow storage can gain from it); one warning says they share the cores."""
    batches = -(-total // options.batch_size)
    workers = min(options.worker_count(), batches)
    cpus = usable_cpus()
    if workers > cpus:
        reporter.warning(
            f"--workers: {workers} decoding processes share the {cpus} CPU(s) this process may use; "
            "fewer are usually as fast unless the files come from slow storage"
        )
    return workers


class _Loader(DataLoader):
    """A DataLoader that leaves the worker count to ``decode_workers``, which sized it and warned in
    alselect's words: torch's own warning (a raw ``UserWarning`` per loader) stays quiet."""

    def check_worker_number_rationality(self) -> None:
        return None


def _loader(dataset: Dataset[Decoded], batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return _Loader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
        worker_init_fn=functools.partial(_die_with_parent, os.getpid()) if workers > 0 else None,
    )


def run_model(
    model: OutputModel,
    paths: Sequence[Path],
    preprocess: Preprocess,
    options: EmbedOptions,
    on_batch: BatchSink,
    reporter: Reporter = NULL_REPORTER,
    *,
    expected_sha256: Sequence[str] | None = None,
) -> None:
    """Decode ``paths`` and call ``on_batch(indices, outputs, failures)``.

    ``outputs`` maps each of the model's named outputs to ``[n, ...]`` arrays
    (``LoadedModel.forward_outputs``: ``probs [n, C]`` and ``embedding [n, D]`` for a classifier).

    ``failures`` lists ``(index, reason)`` for files that could not be decoded; they never stop
    the loop. Batches are handed over in input order, one per ``batch_size`` files, and every
    index is reported exactly once.

    ``expected_sha256`` (aligned with ``paths``): each file is read once and its bytes hashed;
    a file whose content no longer matches fails with "changed while reading" instead of being
    decoded, so an embedding is never stored under the hash of other content.

    When a decoding worker process dies (OOM killer, a crash in a decoder), the files not yet
    handed to ``on_batch`` are decoded in this process instead; a ``MemoryError`` there fails
    that file with "out of memory while decoding".
    """
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {options.batch_size}")
    workers = decode_workers(options, len(paths), reporter)
    check_batch_memory(options.batch_size, preprocess.image_size, workers)
    check_expected(paths, expected_sha256)
    device = resolve_device(options.device)
    forward = BatchForward(accelerate(model, device, options, reporter), preprocess, device)
    on_device = jpegs_on_device(options, device)
    decoder = DeviceDecoder(preprocess, device, options.max_pixels) if on_device else None
    dataset = _ImageFiles(paths, preprocess, expected_sha256, options.max_pixels, device_jpegs=on_device)
    total = len(paths)
    handed = 0
    reporter.progress("embed", 0, total)

    def hand_over(batch: DecodedBatch) -> None:
        nonlocal handed
        with tuner.batch(len(batch.indices) + len(batch.jpegs)):
            run(with_device_jpegs(batch, decoder) if batch.jpegs and decoder is not None else batch)
        handed += batch.count
        reporter.progress("embed", handed, total)

    def run(batch: DecodedBatch) -> None:
        if batch.pixels is not None:
            on_batch(batch.indices, forward(batch.pixels, batch.geometry), batch.failures)
        else:
            on_batch([], {}, batch.failures)

    with threads_restored():
        tuner = ThreadTuner(options.thread_candidates(workers, device))
        if workers > 0:
            iterator = None
            try:
                iterator = iter(_loader(dataset, options.batch_size, workers, device))
                for batch in iterator:
                    with _worker_deaths_deferred():
                        hand_over(batch)
                return
            except RuntimeError as exc:
                if not _is_worker_death(exc):
                    raise
                reason = str(exc).strip()
            finally:
                _shutdown(iterator)
            if handed < total:
                reporter.warning(
                    f"an image decoding worker died ({reason}); "
                    f"decoding the remaining {total - handed} image(s) in this process"
                )
        remaining: Dataset[Decoded] = Subset(dataset, range(handed, total)) if handed else dataset
        for batch in _loader(remaining, options.batch_size, 0, device):
            hand_over(batch)


def jpegs_on_device(options: EmbedOptions, device: torch.device) -> bool:
    """Whether JPEGs are decoded on the device: ``--decode gpu`` (which needs a CUDA device), or
    ``auto`` with one."""
    if options.decode == "gpu" and device.type != "cuda":
        raise UsageError(f"--decode gpu needs a CUDA device; the model runs on {device}")
    return options.decode != "cpu" and device.type == "cuda"


def with_device_jpegs(batch: DecodedBatch, decoder: DeviceDecoder) -> DecodedBatch:
    """``batch`` with its JPEGs decoded on the device and merged in index order (pixels on the device)."""
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if batch.pixels is not None and batch.geometry is not None:
        pixels = batch.pixels.to(decoder.device, non_blocking=True)
        rows = {index: (pixels[row], batch.geometry[row]) for row, index in enumerate(batch.indices)}
    failures = list(batch.failures)
    for index, image, geometry, reason in decoder.decode(batch.jpegs):
        if image is not None and geometry is not None:
            rows[index] = (image, geometry)
        elif reason is not None:
            failures.append((index, reason))
    indices = sorted(rows)
    if not indices:
        return DecodedBatch([], None, None, sorted(failures), batch.count)
    return DecodedBatch(
        indices,
        torch.stack([rows[i][0] for i in indices]),
        torch.stack([rows[i][1] for i in indices]),
        sorted(failures),
        batch.count,
    )


def accelerate(model: OutputModel, device: torch.device, options: EmbedOptions, reporter: Reporter) -> Any:
    """``model`` wrapped to run at ``options.precision`` (``auto`` resolved for ``device``), in
    channels_last (classifiers), and compiled with ``options.compile``.

    Detectors and segmenters (models that take ``geometry``) stay fp32 under ``auto`` and keep
    the contiguous layout they were written for.
    """
    if isinstance(model, Accelerated):
        return model
    plain = not getattr(model, "needs_geometry", False)
    precision = resolve_precision(options.precision, device, reduced_ok=plain)
    return Accelerated(model, precision, channels_last=plain, compile=options.compile, warn=reporter.warning)


@contextlib.contextmanager
def threads_restored() -> Iterator[None]:
    """Whatever the block sets torch's thread count to, this process gets its setting back after."""
    previous = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def check_expected(paths: Sequence[Path], expected_sha256: Sequence[str] | None) -> None:
    if expected_sha256 is not None and len(expected_sha256) != len(paths):
        raise ValueError(f"expected_sha256 has {len(expected_sha256)} entries for {len(paths)} paths")


ModelSource = Callable[[], OutputModel]


class Engine(Protocol):
    """Produces ``on_batch(indices, outputs, failures)`` batches for ``paths``; see ``run_model``.

    ``precision``: the number format the store key of the outputs was made for
    (``alselect.pipeline.with_precision``). ``recipe`` (optional) rebuilds ``model`` in another
    process (a checkpoint path and how to load
    it); an engine that runs the model elsewhere uses it rather than sending the object itself.
    """

    def run(
        self,
        model: OutputModel,
        paths: Sequence[Path],
        preprocess: Preprocess,
        on_batch: BatchSink,
        reporter: Reporter = NULL_REPORTER,
        *,
        expected_sha256: Sequence[str] | None = None,
        recipe: ModelSource | None = None,
        precision: str = "fp32",
    ) -> None: ...


class LocalEngine:
    """``run_model`` in this process (DataLoader decode workers, the model on ``options.device``)."""

    def __init__(self, options: EmbedOptions) -> None:
        self.options = options

    def run(
        self,
        model: OutputModel,
        paths: Sequence[Path],
        preprocess: Preprocess,
        on_batch: BatchSink,
        reporter: Reporter = NULL_REPORTER,
        *,
        expected_sha256: Sequence[str] | None = None,
        recipe: ModelSource | None = None,
        precision: str = "fp32",
    ) -> None:
        options = replace(self.options, precision=precision)
        run_model(model, paths, preprocess, options, on_batch, reporter, expected_sha256=expected_sha256)


@contextlib.contextmanager
def open_engine(options: EmbedOptions) -> Iterator[Engine]:
    """The engine ``options.engine`` names, for one command: a Ray engine connects on first use
    (or starts a local Ray instance) and lets go of Ray when the block ends."""
    options.check()
    if options.engine == "local":
        yield LocalEngine(options)
        return
    from alselect.ray_engine import RayEngine

    engine = RayEngine(options)
    try:
        yield engine
    finally:
        engine.close()
