"""The model forward at speed: reduced precision, channels_last, ``torch.compile``, for any engine.

``accelerate(model, device, ...)`` wraps whatever ``run_model`` drives (a ``LoadedModel``, an
MC-dropout or detection/segmentation runner) so that every ``forward_outputs`` call runs

- under ``torch.autocast`` in bf16 or fp16 when asked (``--precision``); ``auto`` picks bf16 on
  CUDA devices with bf16 (fp16 on older ones) and on CPUs that compute bf16 in hardware
  (x86 AVX512-BF16 or AMX, Arm BF16), and stays fp32 elsewhere: on a CPU without them bf16 is
  emulated and several times slower than fp32 (measured in docs/benchmarks.md);
- with weights and input in ``channels_last`` memory (convolutions run without layout
  reorders in oneDNN and cuDNN);
- optionally through ``torch.compile`` (``--compile``).

Outputs come back as the fp32 forward would give them (bf16 never reaches the store), and a batch
whose reduced-precision outputs are not finite (an fp16 overflow) is run again in fp32, so a
number format never fails an image the fp32 model scores.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import torch

from alselect.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# x86 instruction sets that compute bf16 natively (torch's cpuinfo names and /proc/cpuinfo flags)
_X86_BF16 = ("avx512_bf16", "amx_bf16")


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch's ``No CUDA runtime is found, using CUDA_HOME=...`` log line: compiling on a CPU
    device looks for a CUDA toolkit it does not need, and the line (with its own timestamp format)
    only tells a user of a CPU-only machine what they know."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def quiet_cuda_home_notice() -> None:
    """Install ``_NoCudaRuntimeNotice`` on torch's C++-extension logger (once)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNotice())


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")


@cache
def cpu_bf16_native() -> bool:
    """True when this CPU computes bf16 in hardware: x86 with AVX512-BF16 or AMX-BF16, Arm with BF16.

    torch's own CPU report is asked first (cpuinfo, the library oneDNN uses to pick its kernels);
    ``/proc/cpuinfo`` is the fallback. oneDNN must be present: it runs CPU bf16 convolutions.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    report = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    if callable(report):
        with contextlib.suppress(Exception):
            caps = report()
            if isinstance(caps, dict) and any(name in caps for name in _X86_BF16):
                return any(bool(caps.get(name)) for name in _X86_BF16)
    return _cpuinfo_bf16(Path("/proc/cpuinfo"), platform.machine())


def _cpuinfo_bf16(cpuinfo: Path, machine: str) -> bool:
    """Whether the ``flags`` (x86) or ``Features`` (Arm) line of ``/proc/cpuinfo`` lists bf16."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    wanted = {"bf16"} if machine.lower() in ("aarch64", "arm64") else set(_X86_BF16)
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            return bool(wanted & set(value.split()))
    return False


def fast_precision(device: torch.device) -> str:
    """The reduced precision this device runs faster than fp32, or ``fp32`` when none."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu" and cpu_bf16_native():
        return "bf16"
    return "fp32"


def resolve_precision(precision: str, device: torch.device, *, reduced_ok: bool = True) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for a requested ``--precision``; ``auto`` uses ``fast_precision``
    unless ``reduced_ok`` is false (detectors and segmenters: their boxes and masks stay fp32)."""
    check_precision(precision)
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda":
            with torch.cuda.device(device):
                if not torch.cuda.is_bf16_supported(including_emulation=True):
                    raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16")
        return precision
    return fast_precision(device) if reduced_ok else "fp32"


class Accelerated:
    """``model`` run with ``precision`` (fp32, bf16, fp16), ``channels_last`` and ``compile``.

    Behaves as the wrapped model (``to``, ``forward_outputs``, ``needs_geometry``, any other
    attribute). ``warn`` receives one line when an optimisation is dropped: a program that cannot
    take ``channels_last`` input (a ``view`` in a TorchScript model) or a failed compilation falls
    back to the plain forward for the rest of the run, and that batch is run again.
    """

    def __init__(
        self,
        model: Any,
        precision: str = "fp32",
        *,
        channels_last: bool = True,
        compile: bool = False,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if precision not in ("fp32", *DTYPES):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.model = model
        self.precision = precision
        self.channels_last = channels_last
        self.compile = compile
        self.warn = warn or (lambda _line: None)
        self.device = torch.device("cpu")
        self.fallbacks = 0  # batches run again in fp32 because reduced precision overflowed
        self._compiled = False

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def needs_geometry(self) -> bool:
        return bool(getattr(self.model, "needs_geometry", False))

    @property
    def module(self) -> torch.nn.Module | None:
        module = getattr(self.model, "module", None)
        return module if isinstance(module, torch.nn.Module) else None

    def to(self, device: torch.device) -> Accelerated:
        self.model.to(device)
        self.device = device
        module = self.module
        if self.channels_last and module is not None:
            with contextlib.suppress(Exception):  # a module whose weights cannot change layout keeps them
                module.to(memory_format=torch.channels_last)
        if self.compile and not self._compiled and module is not None:
            quiet_cuda_home_notice()
            module.compile()  # compiles on the first call; ``forward_outputs`` falls back if that fails
            self._compiled = True
        return self

    def forward_outputs(self, batch: torch.Tensor, *geometry: torch.Tensor) -> dict[str, torch.Tensor]:
        """The wrapped model's outputs for ``batch`` (and ``geometry``, for detection/segmentation)."""
        try:
            outputs = self._forward(batch, geometry, self.precision, self.channels_last)
        except Exception as exc:
            if not self._drop_optimisation(exc):
                raise
            outputs = self._forward(batch, geometry, self.precision, self.channels_last)
        if self.precision != "fp32":
            bad = _non_finite_rows(outputs, len(batch))
            if bad is not None:
                self.fallbacks += 1
                exact = self._forward(batch, geometry, "fp32", self.channels_last)
                outputs = {name: _replace_rows(value, exact[name], bad) for name, value in outputs.items()}
        return outputs

    def _forward(
        self, batch: torch.Tensor, geometry: tuple[torch.Tensor, ...], precision: str, channels_last: bool
    ) -> dict[str, torch.Tensor]:
        if batch.ndim == 4:  # decoded batches arrive channels_last; others get the layout they expect
            batch = batch.contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format
            )
        with _autocast(self.device, precision):
            outputs = self.model.forward_outputs(batch, *geometry)
        # bf16 is never a storage type: outputs are what the fp32 forward gives (float32)
        return {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in outputs.items()}

    def _drop_optimisation(self, exc: Exception) -> bool:
        """Turn off ``compile`` or ``channels_last`` after ``exc``, the first that may have caused it."""
        module = self.module
        if self._compiled and module is not None and _is_compile_error(exc):
            self.warn(f"--compile: compiling the model failed ({_first_line(exc)}); running it uncompiled")
            _uncompile(module)
            self._compiled = self.compile = False
            return True
        if self.channels_last and isinstance(exc, RuntimeError) and "view" in str(exc):
            self.channels_last = False
            if module is not None:
                with contextlib.suppress(Exception):
                    module.to(memory_format=torch.contiguous_format)
            return True
        return False


@contextlib.contextmanager
def _autocast(device: torch.device, precision: str) -> Iterator[None]:
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=DTYPES[precision]):
        yield


def _non_finite_rows(outputs: dict[str, torch.Tensor], rows: int) -> torch.Tensor | None:
    """A ``[rows]`` bool mask of the rows with a NaN or infinity in any float output, or None."""
    bad = None
    for value in outputs.values():
        if value.is_floating_point() and value.ndim >= 1 and len(value) == rows:
            row_bad = ~torch.isfinite(value.reshape(rows, -1)).all(dim=1)
            bad = row_bad if bad is None else bad | row_bad
    return bad if bad is not None and bool(bad.any()) else None


def _replace_rows(value: torch.Tensor, exact: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    if value.ndim == 0 or len(value) != len(rows) or value.shape[1:] != exact.shape[1:]:
        return value
    value = value.clone()
    value[rows.to(value.device)] = exact[rows.to(exact.device)].to(value.dtype)
    return value


def _is_compile_error(exc: Exception) -> bool:
    module = type(exc).__module__
    return (
        module.startswith(("torch._dynamo", "torch._inductor"))
        or "BackendCompilerFailed" in type(exc).__name__
    )


def _uncompile(module: torch.nn.Module) -> None:
    """Undo ``nn.Module.compile``: the module's calls go to its plain forward again."""
    with contextlib.suppress(AttributeError):
        module._compiled_call_impl = None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


class ThreadTuner:
    """Picks the model's torch thread count from the first batches of a run, by measuring them.

    Whether a CPU model runs faster on all cores or on the cores the decoding workers leave
    depends on the model (a large one gains from every core; a small one loses more to workers
    and to other processes preempting its threads than it gains) and on what else runs on the
    machine. The tuner tries each of ``candidates`` on ``per_candidate`` batches, in turns, after
    one warm-up batch, then keeps the one with the least time per image for the rest of the run.
    A batch's time runs from the end of the previous batch to its own end, so it includes waiting
    for the decoding workers: threads that starve the workers of a core lose the comparison.
    ``clock`` and ``set_threads`` are injectable (tests).
    """

    def __init__(
        self,
        candidates: list[int],
        per_candidate: int = 1,
        *,
        clock: Callable[[], float] | None = None,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        import time

        self.candidates = list(dict.fromkeys(c for c in candidates if c >= 1)) or [1]
        self.schedule = [c for _ in range(per_candidate) for c in self.candidates]
        self.clock = clock or time.perf_counter
        self.set_threads = set_threads
        self.seconds = dict.fromkeys(self.candidates, 0.0)
        self.images = dict.fromkeys(self.candidates, 0)
        self.chosen: int | None = self.candidates[0] if len(self.candidates) == 1 else None
        self._batches = 0
        self._measured = 0
        self._current = self.candidates[0]
        self._last_end: float | None = None
        self.set_threads(self._current)

    @contextlib.contextmanager
    def batch(self, images: int) -> Iterator[None]:
        """Time the block (one batch of ``images``) and move on to the next setting to try."""
        if self.chosen is not None:
            yield
            return
        start = self.clock()
        yield
        end = self.clock()
        elapsed = end - (start if self._last_end is None else self._last_end)
        self._last_end = end
        self._batches += 1
        if self._batches == 1 or images == 0:  # warm-up (allocator, kernel selection), empty batch
            return
        self.seconds[self._current] += elapsed
        self.images[self._current] += images
        self._measured += 1
        if self._measured < len(self.schedule):
            self._use(self.schedule[self._measured])
            return
        rate = {c: self.seconds[c] / self.images[c] for c in self.candidates if self.images[c]}
        self.chosen = min(rate, key=lambda c: (rate[c], c))
        self._use(self.chosen)

    def _use(self, threads: int) -> None:
        if threads != self._current:
            self.set_threads(threads)
            self._current = threads
