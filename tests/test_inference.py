"""The model-forward layer: precision choice and detection, autocast, channels_last, fallbacks, keys."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import alselect.inference as inference
from alselect.checkpoints import load_checkpoint
from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
from alselect.embed import EmbedOptions
from alselect.errors import UsageError
from alselect.inference import Accelerated, ThreadTuner, _cpuinfo_bf16, resolve_precision
from alselect.models.small_cnn import SmallCNN
from alselect.pipeline import ModelSpec, embed_folder, precision_key
from alselect.preprocess import Preprocess
from alselect.store import Store
from tests.conftest import SAMPLE_DATA
from tests.helpers import FAST, cli, score

CPU = torch.device("cpu")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (no ties expected in continuous scores)."""
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


# -- which precision --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "line", "expected"),
    [
        ("x86_64", "flags\t\t: fpu sse avx2 avx512f avx512bw", False),
        ("x86_64", "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni", True),
        ("x86_64", "flags\t\t: fpu avx2 amx_tile amx_bf16 amx_int8", True),
        ("aarch64", "Features\t: fp asimd sve i8mm bf16", True),
        ("aarch64", "Features\t: fp asimd crc32", False),
        ("aarch64", "flags\t: avx512_bf16", False),  # an x86 name means nothing on Arm
    ],
)
def test_cpuinfo_bf16(tmp_path: Path, machine: str, line: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\n{line}\n\nprocessor\t: 1\n{line}\n")
    assert _cpuinfo_bf16(cpuinfo, machine) is expected
    assert _cpuinfo_bf16(tmp_path / "missing", machine) is False


def test_torch_and_proc_cpuinfo_agree_on_this_machine() -> None:
    flags = Path("/proc/cpuinfo")
    if not flags.exists():
        pytest.skip("no /proc/cpuinfo")
    import platform

    assert inference.cpu_bf16_native() is (
        _cpuinfo_bf16(flags, platform.machine()) and torch.backends.mkldnn.is_available()
    )


def test_resolve_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_precision(explicit, CPU) == explicit
        assert resolve_precision(explicit, CPU, reduced_ok=False) == explicit  # asked for: given
    monkeypatch.setattr(inference, "cpu_bf16_native", lambda: True)
    assert resolve_precision("auto", CPU) == "bf16"
    assert resolve_precision("auto", CPU, reduced_ok=False) == "fp32"  # detectors, segmenters
    monkeypatch.setattr(inference, "cpu_bf16_native", lambda: False)
    assert resolve_precision("auto", CPU) == "fp32"  # emulated bf16 is slower than fp32
    with pytest.raises(UsageError, match="--precision must be"):
        resolve_precision("half", CPU)
    with pytest.raises(UsageError, match="--precision must be"):
        EmbedOptions(precision="tf32")


# -- the wrapper --------------------------------------------------------------------------------


def loaded_small_cnn(tmp_path: Path, size: int = 16) -> Any:
    torch.manual_seed(0)
    path = tmp_path / "cnn.pt"
    save_alselect_checkpoint(
        path,
        SmallCNN(num_classes=4),
        "small_cnn",
        4,
        preprocess=Preprocess(image_size=size, resize_size=size),
    )
    return load_checkpoint(path)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_outputs_are_float32_and_close(tmp_path: Path, precision: str) -> None:
    model = loaded_small_cnn(tmp_path)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    exact = Accelerated(model, "fp32", channels_last=False).to(CPU).forward_outputs(x)
    fast = Accelerated(model, precision, channels_last=True).to(CPU).forward_outputs(x)
    assert set(fast) == {"probs", "embedding"}
    for name in fast:
        assert fast[name].dtype == torch.float32 == exact[name].dtype
        assert fast[name].shape == exact[name].shape
    # bf16 keeps 8 significant bits, fp16 11: differences of that order, not of another model
    tolerance = 0.05 if precision == "bf16" else 0.01
    assert (fast["probs"] - exact["probs"]).abs().max() < tolerance
    assert not torch.equal(fast["embedding"], exact["embedding"])  # it did run in reduced precision


def test_channels_last_changes_layout_not_results(tmp_path: Path) -> None:
    model = loaded_small_cnn(tmp_path)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    plain = Accelerated(model, "fp32", channels_last=False).to(CPU).forward_outputs(x)
    fast = Accelerated(model, "fp32", channels_last=True).to(CPU)
    conv = model.module.features[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    seen: list[torch.Tensor] = []
    handle = model.module.features.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    out = fast.forward_outputs(x)
    handle.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    for name in out:
        torch.testing.assert_close(out[name], plain[name], rtol=1e-5, atol=1e-6)


class Overflows(nn.Module):
    """Logits of about ±1e5 for inputs whose first pixel is positive: inf in fp16, fine in fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.weight.fill_(0.0)
            self.conv.weight[:, 0] = 1.0
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[300.0] * 4, [-300.0] * 4, [0.0] * 4]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).amax(dim=(2, 3)))


def test_fp16_overflow_rows_are_run_again_in_fp32() -> None:
    from alselect.checkpoints.base import LoadedModel

    model = LoadedModel(Overflows().eval(), "test", None, 3, None, Preprocess(8, 8))
    x = torch.full((4, 3, 8, 8), 0.01)
    x[1, 0, 0, 0] = 100.0  # 4 channels × 100 × 300 = 1.2e5 > 65504: inf logits in fp16
    exact = Accelerated(model, "fp32").to(CPU).forward_outputs(x)
    fast = Accelerated(model, "fp16").to(CPU)
    out = fast.forward_outputs(x)
    assert fast.fallbacks == 1
    assert torch.isfinite(out["probs"]).all() and torch.isfinite(out["embedding"]).all()
    torch.testing.assert_close(out["probs"][1], exact["probs"][1])
    torch.testing.assert_close(out["embedding"][1], exact["embedding"][1])


class Flattens(nn.Module):
    """A program written for contiguous input: ``view`` fails on a channels_last tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_model_that_cannot_take_channels_last_runs_contiguous() -> None:
    from alselect.checkpoints.base import LoadedModel

    torch.manual_seed(0)
    scripted = torch.jit.script(Flattens().eval())
    model = LoadedModel(scripted, "torchscript", None, 3, None, Preprocess(8, 8))
    x = torch.randn(2, 3, 8, 8)
    plain = Accelerated(model, "fp32", channels_last=False).to(CPU).forward_outputs(x)
    fast = Accelerated(model, "fp32", channels_last=True).to(CPU)
    out = fast.forward_outputs(x)
    assert fast.channels_last is False
    torch.testing.assert_close(out["probs"], plain["probs"])
    fast.forward_outputs(x)  # and stays that way


class CompileFailure(Exception):
    """Stands in for torch._dynamo's errors (a missing C++ compiler, an unsupported op)."""


CompileFailure.__module__ = "torch._dynamo.exc"


def test_a_failed_compilation_falls_back_to_the_plain_forward(tmp_path: Path) -> None:
    model = loaded_small_cnn(tmp_path)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    plain = Accelerated(model, "fp32").to(CPU).forward_outputs(x)
    warnings: list[str] = []
    fast = Accelerated(model, "fp32", compile=True, warn=warnings.append).to(CPU)

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise CompileFailure("no working C++ compiler")

    model.module._compiled_call_impl = broken  # what module.compile() installed, failing
    out = fast.forward_outputs(x)
    assert len(warnings) == 1 and "running it uncompiled" in warnings[0] and "C++ compiler" in warnings[0]
    assert model.module._compiled_call_impl is None
    torch.testing.assert_close(out["probs"], plain["probs"])


def test_compile_keeps_torchs_no_cuda_runtime_line_off_stderr(tmp_path: Path) -> None:
    """Compiling on a CPU-only machine with a CUDA_HOME makes torch log ``No CUDA runtime is found``
    (its own format, on stderr); ``--compile`` drops that line and nothing else."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    Accelerated(loaded_small_cnn(tmp_path), "fp32", compile=True).to(CPU)  # compiles lazily: cheap
    logger.addHandler(handler)
    try:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("another notice")
    finally:
        logger.removeHandler(handler)
    assert seen == ["another notice"]


@pytest.mark.slow
def test_compiled_model_gives_the_eager_outputs(tmp_path: Path) -> None:
    model = loaded_small_cnn(tmp_path)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    plain = Accelerated(model, "fp32").to(CPU).forward_outputs(x)
    warnings: list[str] = []
    compiled = Accelerated(model, "fp32", compile=True, warn=warnings.append).to(CPU)
    out = compiled.forward_outputs(x)
    assert warnings == []
    assert model.module._compiled_call_impl is not None
    for name in out:
        torch.testing.assert_close(out[name], plain[name], rtol=1e-4, atol=1e-5)


# -- precision in the store ------------------------------------------------------------------------


def test_bf16_rankings_agree_with_fp32_on_sample_data(tmp_path: Path) -> None:
    """The acceptance check of reduced precision: entropy rankings of sample_data, bf16 vs fp32."""
    results = {}
    for precision in ("fp32", "bf16"):
        store_path = tmp_path / precision
        options = EmbedOptions(device="cpu", batch_size=64, workers=0, precision=precision)
        run = score(store_path, SAMPLE_DATA / "images", SAMPLE_DATA / "model.pt", options=options)
        with Store.open(store_path) as store:
            pool = store.pool(str((SAMPLE_DATA / "images").resolve()), run.embed.model_key)
            record = store.model(run.embed.model_key)
        assert record is not None
        assert record["preprocess"].get("precision") == (None if precision == "fp32" else "bf16")
        entropy = -(pool.probs * np.log(np.clip(pool.probs, 1e-12, None))).sum(1)
        results[precision] = (run.embed.model_key, pool, entropy)
    (key32, pool32, h32), (key16, pool16, h16) = results["fp32"], results["bf16"]
    assert key16 == precision_key(key32, "bf16") != key32
    assert pool32.relpaths == pool16.relpaths and len(h32) == 306
    assert spearman(h32, h16) >= 0.99
    assert (pool32.probs.argmax(1) == pool16.probs.argmax(1)).mean() >= 0.97
    assert 0 < np.abs(pool32.probs - pool16.probs).max() < 0.05


def tiny_pool(tmp_path: Path, make_images: Callable[..., list[Path]], n: int = 6) -> Path:
    make_images(tmp_path / "pool", n)
    return tmp_path / "pool"


def test_auto_keeps_an_existing_fp32_pool_and_explicit_precision_moves_it(
    tmp_path: Path,
    tiny_checkpoint: Path,
    make_images: Callable[..., list[Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = tiny_pool(tmp_path, make_images)
    store_path = tmp_path / "store"
    spec = ModelSpec(tiny_checkpoint)

    def embed(precision: str) -> tuple[str, int]:
        with Store.open(store_path, write=True, create=True) as store:
            result = embed_folder(store, pool, spec, replace(FAST, precision=precision))
        return result.model_key, result.embedded

    fp32_key, embedded = embed("fp32")  # an existing store, made before bf16 machines
    assert embedded == 6
    monkeypatch.setattr(inference, "cpu_bf16_native", lambda: True)  # now a bf16-capable CPU
    assert embed("auto") == (fp32_key, 0)  # nothing re-embedded, nothing mixed
    make_images(pool, 2, start=100)
    assert embed("auto") == (fp32_key, 2)  # new images join the fp32 pool
    bf16_key, embedded = embed("bf16")  # moving it is explicit: every image, under its own key
    assert (bf16_key, embedded) == (precision_key(fp32_key, "bf16"), 8)
    assert embed("auto") == (bf16_key, 0)  # from then on auto uses it
    fresh = tmp_path / "fresh"
    shutil.copytree(pool, fresh)
    with Store.open(tmp_path / "store2", write=True, create=True) as store:
        result = embed_folder(store, fresh, spec, replace(FAST, precision="auto"))
    assert result.model_key == bf16_key  # a new store starts in the fast format


def test_head_mc_dropout_finds_the_layer_of_bf16_outputs(tmp_path: Path) -> None:
    """bf16 outputs come from a bf16 final layer: the fp32 recomputation that identifies the layer
    differs by more than the fp32 tolerance, and must still find it."""
    from alselect.mc_dropout import HEAD_CHECK_TOLERANCE, softmax
    from alselect.pipeline import McDropout, ScoreModels

    pool = tmp_path / "pool"
    pool.mkdir()
    for image in sorted((SAMPLE_DATA / "images" / "fashion").glob("*.png"))[:100]:
        shutil.copy(image, pool / image.name)
    checkpoint = SAMPLE_DATA / "model.pt"
    models = ScoreModels(task=[ModelSpec(checkpoint)], mc=McDropout(samples=4, mode="head"))
    options = replace(FAST, batch_size=50, precision="bf16")
    run = score(tmp_path / "store", pool, checkpoint, "bald", spec=models, options=options)
    assert run.pool_size == 100
    with Store.open(tmp_path / "store") as store:
        stored = store.pool(str(pool.resolve()), run.embed.model_key)
    fc = load_checkpoint(checkpoint).module.fc
    again = softmax(stored.embeddings @ fc.weight.detach().numpy().T + fc.bias.detach().numpy())
    assert np.abs(again - stored.probs).max() > HEAD_CHECK_TOLERANCE


def test_cli_precision_options(
    tmp_path: Path,
    tiny_checkpoint: Path,
    make_images: Callable[..., list[Path]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    pool = tiny_pool(tmp_path, make_images, n=3)
    store = tmp_path / "store"
    base = ["--store", str(store), "embed", str(pool), "-m", str(tiny_checkpoint), "--device", "cpu"]
    code, _, err = cli(capsys, *base, "--precision", "half")
    assert code == 2 and "--precision must be auto, fp32, bf16 or fp16" in err
    code, _, err = cli(capsys, *base, "--precision", "bf16", "--threads", "1", "--workers", "0")
    assert code == 0, err
    with Store.open(store) as opened:
        ((key, settings),) = opened.rows("SELECT key, preprocess FROM models")
    assert '"precision": "bf16"' in settings and len(key) == 64


def test_a_decoded_batch_is_channels_last_uint8_equal_to_the_decoded_images(
    tmp_path: Path, make_images: Callable[..., list[Path]]
) -> None:
    from alselect.embed import _ImageFiles, collate
    from alselect.images import load_image_geometry

    paths = make_images(tmp_path / "pool", 4)
    (tmp_path / "pool" / "bad.png").write_bytes(b"not an image")
    paths.insert(2, tmp_path / "pool" / "bad.png")
    pre = Preprocess(image_size=12, resize_size=14)
    files = _ImageFiles(paths, pre)
    batch = collate([files[i] for i in range(len(paths))])
    assert batch.indices == [0, 1, 3, 4] and batch.count == 5
    assert [i for i, _ in batch.failures] == [2] and "not an image" in batch.failures[0][1]
    assert batch.pixels is not None and batch.geometry is not None
    assert batch.pixels.shape == (4, 3, 12, 12) and batch.pixels.dtype == torch.uint8
    assert batch.pixels.is_contiguous(memory_format=torch.channels_last)
    for row, index in enumerate(batch.indices):
        pixels, geometry = load_image_geometry(paths[index], pre)
        assert pixels.flags["C_CONTIGUOUS"]  # the public function's layout is unchanged
        np.testing.assert_array_equal(batch.pixels[row].numpy(), pixels)
        np.testing.assert_array_equal(batch.geometry[row].numpy(), geometry)
    empty = collate([files[2]])
    assert empty.pixels is None and empty.indices == [] and empty.count == 1


def test_thread_tuner_keeps_the_fastest_setting_it_measured() -> None:
    now = [0.0]
    applied: list[int] = []
    seconds_per_image = {1: 0.010, 2: 0.025}  # two threads lose here (a shared, busy machine)
    tuner = ThreadTuner([1, 2], per_candidate=2, clock=lambda: now[0], set_threads=applied.append)

    def run_batch(images: int) -> None:
        with tuner.batch(images):
            now[0] += images * seconds_per_image[applied[-1]]

    run_batch(8)  # warm-up, not counted
    assert tuner.chosen is None
    for _ in range(4):
        run_batch(8)
    assert tuner.chosen == 1 and applied == [1, 2, 1, 2, 1]
    run_batch(8)
    assert applied[-1] == 1  # fixed for the rest of the run
    seconds_per_image.update({1: 0.02, 2: 0.011})  # and the other way round
    applied.clear()
    tuner = ThreadTuner([1, 2], per_candidate=1, clock=lambda: now[0], set_threads=applied.append)
    for images in (8, 0, 8, 8):  # an empty batch (all files failed) tells nothing
        run_batch(images)
    assert tuner.chosen == 2 and applied == [1, 2]
    assert ThreadTuner([3], set_threads=applied.append).chosen == 3  # one candidate: nothing to try


def test_thread_tuner_counts_the_wait_for_decoded_batches() -> None:
    """Two threads run the model faster but take the decoding worker's core: the time between
    batches (waiting for pixels) makes one thread the faster pipeline."""
    now = [0.0]
    applied: list[int] = []
    model_seconds = {1: 0.010, 2: 0.006}
    wait_seconds = {1: 0.0, 2: 0.010}  # per image, before the batch arrives
    tuner = ThreadTuner([1, 2], per_candidate=2, clock=lambda: now[0], set_threads=applied.append)
    for _ in range(5):
        now[0] += 8 * wait_seconds[applied[-1]]
        with tuner.batch(8):
            now[0] += 8 * model_seconds[applied[-1]]
    assert tuner.chosen == 1  # 0.010 s per image against 0.016
