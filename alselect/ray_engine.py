"""The Ray engine: images decoded in Ray tasks and the model run in an actor pool, across a cluster.

Only embedding spreads out; this process (the driver) keeps the store. It cuts the to-do list into
chunks of ``batch_size`` images (the batches the local engine would run) and Ray Data streams them
through two stages:

1. **decode** (Ray tasks, 1 CPU each): ``decode_file`` on every image of a chunk, as locally: the
   chunk's pixels, and its failures with their reasons.
2. **model** (an actor pool: one actor per ``gpus_per_actor`` GPUs, or CPU actors): each actor
   builds the model once (``recipe``: the checkpoint loaded from its path and checked against the
   driver's sha256; or the model object itself, sent with cloudpickle) and runs it on the chunk's
   decoded images with ``BatchForward``, as locally.

A chunk stays one row from start to end, so the model sees exactly the batches the local engine
gives it and the arrays are the same. Results arrive as they finish, in no particular order, and
go to ``on_batch`` at once: the caller hands them to its writer thread (``alselect.store.writer``,
a few batches waiting at most), so the driver holds only Ray's small output buffer, never the pool.

Retries are Ray Data's defaults: a decode task whose worker process dies is retried, and a model
actor that dies (node lost, OOM killer, segfault) is restarted and its unfinished chunks retried,
without limit. An exception raised by the model or by loading it (e.g. a checkpoint a worker
cannot read) is not retried: the run stops with that error and keeps what was registered.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import socket
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alselect import errors
from alselect.embed import (
    RAY_INSTALL_HINT,
    BatchForward,
    BatchSink,
    EmbedOptions,
    ModelSource,
    OutputModel,
    check_expected,
    decode_file,
    resolve_device,
)
from alselect.errors import AlselectError, UsageError
from alselect.inference import Accelerated
from alselect.limits import DEFAULT_MAX_PIXELS
from alselect.preprocess import Preprocess
from alselect.progress import NULL_REPORTER, Reporter

MAX_INPUT_BLOCKS = 4096  # chunks are grouped into at most this many input blocks (Ray Data's unit)
PROBE_TIMEOUT_S = 5.0  # a cluster address that accepts no connection within this is unreachable
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the worker names in its messages


def import_ray() -> Any:
    """``ray`` with Ray Data, or an error that says how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise AlselectError(f"--engine ray needs Ray with Ray Data ({exc}): {RAY_INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class Plan:
    """How many model actors, GPUs per actor, and the cap on concurrent decode tasks (None: none)."""

    actors: int
    gpus: float
    decode_tasks: int | None

    def describe(self) -> str:
        where = f"{self.gpus:g} GPU each" if self.gpus else "on CPU"
        return f"{self.actors} model actor(s) ({where}), decoding in Ray tasks"


def plan_for(options: EmbedOptions, resources: dict[str, float]) -> Plan:
    """Actors and GPUs for the cluster's ``resources`` (``ray.cluster_resources()``)."""
    cpus = float(resources.get("CPU", 0.0))
    cluster_gpus = float(resources.get("GPU", 0.0))
    wanted = options.ray.gpus_per_actor
    if options.device == "cpu":
        gpus = 0.0
    elif wanted is not None:
        gpus = float(wanted)
    else:
        gpus = 1.0 if cluster_gpus >= 1 else 0.0
    if options.device == "cuda" and not cluster_gpus:
        raise AlselectError("--device cuda: the Ray cluster has no GPUs")
    if options.device == "cuda" and not gpus:
        raise UsageError("--device cuda needs --ray-gpus-per-actor above 0")
    if gpus > cluster_gpus:
        raise AlselectError(f"each model actor needs {gpus:g} GPU(s); the Ray cluster has {cluster_gpus:g}")
    if options.ray.actors is not None:
        actors = options.ray.actors
    elif gpus:
        actors = max(1, int(cluster_gpus // gpus))
    else:
        actors = max(1, int(cpus // 2))
    # Ray Data fuses a task stage into the actor stage after it unless the task stage's cap differs
    # from the pool size; capping decoding at the cluster's CPUs keeps it in its own tasks (where
    # the actors take every CPU, decoding runs inside them: there is nowhere else for it).
    decode_tasks = None if gpus else max(1, int(cpus))
    return Plan(actors=actors, gpus=gpus, decode_tasks=decode_tasks)


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``ray://HOST:PORT`` → (host, port)."""
    bare = address.removeprefix("ray://")
    host, sep, port = bare.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--ray-address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    return host, int(port)


def check_reachable(address: str) -> None:
    """Fail in seconds, with one line, where ``ray.init`` would retry an unreachable address forever."""
    target = address
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die
        except ImportError:  # a Ray without the helper: let ray.init look
            return
        try:
            target = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError:
            raise AlselectError(
                "--ray-address auto: no running Ray cluster found from this machine "
                "(start one with 'ray start --head', or give its address)"
            ) from None
    host, port = split_address(target)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        where = address if target == address else f"{address} ({host}:{port})"
        raise AlselectError(f"cannot reach the Ray cluster at {where}: {reason}") from None


def first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception behind Ray's wrappers (``RayTaskError.cause``, ``__cause__``; Ray
    Data's empty ``SystemException`` marker is not a cause)."""
    seen = {id(exc)}
    while True:
        inner = getattr(exc, "cause", None)
        if not isinstance(inner, BaseException):
            inner = exc.__cause__
        if (
            not isinstance(inner, BaseException)
            or type(inner).__name__ == "SystemException"
            or id(inner) in seen
        ):
            return exc
        seen.add(id(inner))
        exc = inner


def quiet_ray_data(ray: Any) -> None:
    """Nothing from Ray Data on stderr but warnings: alselect reports progress itself, and turns a
    failure into one line (Ray Data's tracebacks stay in its log file under the Ray session)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_auto_log_stats = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(lambda record: record.levelno == logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    # Errors that matter reach alselect through the dataset it iterates; "unhandled" ones come from
    # Ray Data's own fire-and-forget calls (its stats actor), as tracebacks on stderr
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    # a small to-do list has fewer chunks than the decode cap: nothing to act on
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)


class Shipped:
    """A model object sent to the workers as is (for models that no checkpoint recipe rebuilds)."""

    def __init__(self, model: OutputModel) -> None:
        self.model = model

    def __call__(self) -> OutputModel:
        return self.model


def chunk_tables(paths: Sequence[Path], expected_sha256: Sequence[str] | None, size: int) -> list[Any]:
    """The to-do list as Arrow tables of chunk rows: ``start`` index, ``paths``, ``sha256`` (lists).

    One chunk per table (so decoding starts on every CPU at once and each chunk streams on to the
    model as soon as it is decoded) up to ``MAX_INPUT_BLOCKS`` chunks; beyond, tables grow.
    """
    import pyarrow as pa

    chunks = -(-len(paths) // size)
    per_block = -(-chunks // MAX_INPUT_BLOCKS) * size
    names = pa.list_(pa.string())
    tables = []
    for first in range(0, len(paths), per_block):
        starts = range(first, min(first + per_block, len(paths)), size)
        files = [[os.path.abspath(p) for p in paths[s : s + size]] for s in starts]
        shas = [list(expected_sha256[s : s + size]) if expected_sha256 else [] for s in starts]
        columns = {"start": pa.array(starts, pa.int64()), "paths": pa.array(files, names)}
        tables.append(pa.table({**columns, "sha256": pa.array(shas, names)}))
    return tables


def decode_chunks(
    batch: dict[str, np.ndarray], preprocess: Preprocess, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, np.ndarray]:
    """Ray task: decode each chunk row into ``pixels [size, 3, S, S]`` and ``geometry [size, 4]``
    (zeros where nothing decoded) plus ``failures``, a JSON list of ``[offset, reason]``."""
    rows = len(batch["start"])
    side = preprocess.image_size
    pixels = np.zeros((rows, size, 3, side, side), dtype=np.uint8)
    geometry = np.zeros((rows, size, 4), dtype=np.int32)
    counts = np.zeros(rows, dtype=np.int64)
    failures = []
    for row in range(rows):
        paths, shas = batch["paths"][row], batch["sha256"][row]
        failed = []
        for offset, path in enumerate(paths):
            expected = str(shas[offset]) if len(shas) else None
            array, reason, shape = decode_file(Path(str(path)), preprocess, expected, max_pixels)
            if array is None:
                failed.append([offset, reason])
            else:
                pixels[row, offset] = array
                if shape is not None:
                    geometry[row, offset] = shape
        counts[row] = len(paths)
        failures.append(json.dumps(failed))
    return {
        "start": batch["start"],
        "count": counts,
        "pixels": pixels,
        "geometry": geometry,
        "failures": np.array(failures),
    }


def decoded_offsets(count: int, failures_json: str) -> list[int]:
    failed = {offset for offset, _ in json.loads(failures_json)}
    return [offset for offset in range(count) if offset not in failed]


class ModelActor:
    """Ray actor: builds the model once, then runs it on each chunk's decoded images."""

    def __init__(self, source: ModelSource, preprocess: Preprocess, use_gpu: bool) -> None:
        model = source()
        # fp32 in the local engine's memory layout (channels_last for classifiers), so both engines
        # run the same kernels and store the same arrays
        plain = not getattr(model, "needs_geometry", False)
        fp32 = Accelerated(model, "fp32", channels_last=plain)
        self.forward = BatchForward(fp32, preprocess, resolve_device("cuda" if use_gpu else "cpu"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = []
        for row in range(len(batch["start"])):
            ok = decoded_offsets(int(batch["count"][row]), str(batch["failures"][row]))
            outputs = self.forward(batch["pixels"][row][ok], batch["geometry"][row][ok]) if ok else {}
            payloads.append(pickle.dumps(outputs, protocol=pickle.HIGHEST_PROTOCOL))
        return {
            "start": batch["start"],
            "count": batch["count"],
            "failures": batch["failures"],
            "payload": np.array(payloads, dtype=object),
        }


def unpack(batch: dict[str, np.ndarray]) -> tuple[list[int], dict[str, np.ndarray], list[tuple[int, str]]]:
    """One ``on_batch`` call's worth from result rows: indices, outputs in index order, failures."""
    indices: list[int] = []
    failures: list[tuple[int, str]] = []
    parts: list[dict[str, np.ndarray]] = []
    for row in range(len(batch["start"])):
        start = int(batch["start"][row])
        reasons = str(batch["failures"][row])
        ok = decoded_offsets(int(batch["count"][row]), reasons)
        indices += [start + offset for offset in ok]
        failures += [(start + int(offset), str(reason)) for offset, reason in json.loads(reasons)]
        if ok:
            parts.append(pickle.loads(batch["payload"][row]))
    if not parts:
        return indices, {}, failures
    outputs = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    return indices, outputs, failures


class RayEngine:
    """Embeds through Ray Data; connects (or starts a local Ray instance) on first use.

    A Ray already initialised in this process (a library caller, a test) is used as it is and left
    running; one this engine started is shut down by ``close``. A cluster address is checked at
    once, so an unreachable cluster fails before the folder is hashed.
    """

    def __init__(self, options: EmbedOptions) -> None:
        self.options = options
        self._ray: Any = None
        self._owns = False
        if options.ray.address:
            check_reachable(options.ray.address)

    def _connect(self, reporter: Reporter) -> Any:
        if self._ray is not None:
            return self._ray
        ray = import_ray()
        if not ray.is_initialized():
            address = self.options.ray.address
            settings: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
            if address:
                check_reachable(address)
                try:
                    ray.init(address=address, **settings)
                except Exception as exc:
                    reason = first_line(exc)
                    raise AlselectError(f"cannot join the Ray cluster at {address}: {reason}") from exc
            else:
                reporter.info("starting a local Ray instance (--ray-address to join a cluster)")
                try:
                    ray.init(address="local", include_dashboard=False, **settings)
                except Exception as exc:
                    raise AlselectError(f"cannot start a local Ray instance: {first_line(exc)}") from exc
                self._owns = True
        quiet_ray_data(ray)
        self._ray = ray
        return ray

    def close(self) -> None:
        """Shut down the local Ray instance this engine started, if any."""
        if self._owns and self._ray is not None:
            self._ray.shutdown()
        self._owns = False
        self._ray = None

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
        """As ``run_model``, but batches come back in completion order, several chunks at a time.
        Models run in fp32 here: ``precision`` must be ``fp32``."""
        if precision != "fp32":
            raise ValueError(f"the Ray engine runs models in fp32, not {precision}")
        check_expected(paths, expected_sha256)
        total = len(paths)
        if not total:
            return
        ray = self._connect(reporter)
        plan = plan_for(self.options, ray.cluster_resources())
        source: ModelSource = recipe if recipe is not None else Shipped(model)
        if recipe is None:
            try:
                ray.cloudpickle.dumps(source)
            except Exception as exc:
                raise AlselectError(
                    f"this model cannot be sent to Ray workers ({type(exc).__name__}: {first_line(exc)}); "
                    "give a recipe that loads it from a checkpoint file every node can read"
                ) from None
        size = self.options.batch_size
        dataset = (
            ray.data.from_arrow(chunk_tables(paths, expected_sha256, size))
            .map_batches(
                decode_chunks,
                batch_size=1,
                fn_kwargs={"preprocess": preprocess, "size": size, "max_pixels": self.options.max_pixels},
                compute=ray.data.TaskPoolStrategy(size=plan.decode_tasks),
                num_cpus=1,
            )
            .map_batches(
                ModelActor,
                batch_size=1,
                fn_constructor_kwargs={"source": source, "preprocess": preprocess, "use_gpu": plan.gpus > 0},
                compute=ray.data.ActorPoolStrategy(size=plan.actors),
                num_cpus=1,
                num_gpus=plan.gpus or None,
            )
        )
        reporter.info(f"Ray: {plan.describe()}")
        reporter.progress("embed", 0, total)
        handed = 0
        for batch in guarded(dataset.iter_batches(batch_size=None, batch_format="numpy")):
            indices, outputs, failures = unpack(batch)
            on_batch(indices, outputs, failures)
            handed += len(indices) + len(failures)
            reporter.progress("embed", handed, total)
        if handed != total:
            raise AlselectError(f"Ray returned {handed} of {total} images; run again to embed the rest")


def guarded(source: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Ray's batches; its failures as one-line errors (an alselect error from a worker as itself)."""
    batches = iter(source)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except AlselectError:
            raise
        except Exception as exc:
            cause = root_cause(exc)
            if isinstance(cause, AlselectError):
                raise cause from None
            raise worker_error(cause) from exc
        yield batch


_ALSELECT_ERROR = re.compile(r"^alselect\.errors\.(\w+): (.+)$")


def worker_error(exc: BaseException) -> AlselectError:
    """One line for an exception Ray reports as text (an actor that failed to start carries only
    the worker's traceback): the alselect error it ends with, as itself, or its last line."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).strip().splitlines() if line.strip()]
    if lines:
        raised = _ALSELECT_ERROR.match(lines[-1])
        kind = getattr(errors, raised.group(1), None) if raised else None
        if raised and isinstance(kind, type) and issubclass(kind, AlselectError):
            return kind(raised.group(2))
        if any(line.startswith('File "') for line in lines):  # a worker's traceback: what it raised
            return AlselectError(f"the Ray engine failed: {lines[-1]}")
    return AlselectError(f"the Ray engine failed: {type(exc).__name__}: {lines[0] if lines else '?'}")
