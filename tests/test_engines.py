"""Engine choice and the Ray engine's pieces that need no running Ray: options, resource plans,
cluster addresses, model recipes, and the chunk data path (decode → model → unpack) by hand."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alselect.checkpoints import load_checkpoint
from alselect.embed import EmbedOptions, RayOptions, run_model
from alselect.errors import AlselectError, CheckpointError, UsageError
from alselect.images import CHANGED_WHILE_READING, load_image
from alselect.pipeline import ModelSpec, full_pass_model, prepare_model
from alselect.progress import Reporter
from alselect.ray_engine import (
    ModelActor,
    Shipped,
    check_reachable,
    chunk_tables,
    decode_chunks,
    guarded,
    plan_for,
    split_address,
    unpack,
)
from tests.conftest import write_image
from tests.helpers import cli, closed_port

# --- options ------------------------------------------------------------------------------------


def test_decode_workers_never_exceed_the_batches_and_warn_past_the_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from alselect import embed

    monkeypatch.setattr(embed, "usable_cpus", lambda: 2)
    said: list[str] = []

    class Collect(Reporter):
        def warning(self, message: str) -> None:
            said.append(message)

    many = EmbedOptions(device="cpu", batch_size=64, workers=200)
    assert embed.decode_workers(many, 4, Collect()) == 1 and said == []  # one batch: one process
    assert embed.decode_workers(EmbedOptions(device="cpu", batch_size=64, workers=2), 1000, Collect()) == 2
    assert said == []
    assert embed.decode_workers(many, 64 * 300, Collect()) == 200
    assert said == [
        "--workers: 200 decoding processes share the 2 CPU(s) this process may use; fewer are usually "
        "as fast unless the files come from slow storage"
    ]
    assert embed.decode_workers(EmbedOptions(device="cpu", workers=0), 1000, Collect()) == 0


def test_more_workers_than_cpus_give_no_raw_torch_warning(
    tmp_path: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    recwarn: pytest.WarningsRecorder,
) -> None:
    import os

    for i in range(3):
        write_image(tmp_path / "pool" / f"{i}.png", i)
    workers = str(len(os.sched_getaffinity(0)) + 1)  # more than torch suggests: it would warn
    code, _, err = cli(
        capsys, "--store", str(tmp_path / "s"), "embed", str(tmp_path / "pool"), "-m", str(tiny_checkpoint),
        "--workers", workers, "--batch-size", "1", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert not [w for w in recwarn if "DataLoader" in str(w.message)], [str(w.message) for w in recwarn]
    assert "UserWarning" not in err


def test_unknown_engine_and_bad_ray_options_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="--engine must be local or ray"):
        EmbedOptions(engine="spark")
    with pytest.raises(UsageError, match="--ray-actors"):
        RayOptions(actors=0)
    with pytest.raises(UsageError, match="--ray-gpus-per-actor"):
        RayOptions(gpus_per_actor=-1)
    with pytest.raises(UsageError, match="Ray gives actors GPUs"):
        EmbedOptions(device="cuda:1", engine="ray").check()
    with pytest.raises(UsageError, match="contradict"):
        EmbedOptions(device="cpu", engine="ray", ray=RayOptions(gpus_per_actor=1)).check()


def test_ray_engine_without_ray_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(AlselectError, match=r"pip install 'alselect\[ray\]'"):
        EmbedOptions(engine="ray").check()
    EmbedOptions(engine="local", device="cpu").check()  # the local engine does not care


def test_ray_options_without_the_ray_engine_are_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    (tmp_path / "pool").mkdir()
    store = str(tmp_path / "store")
    code, out, err = cli(
        capsys,
        "--store",
        store,
        "embed",
        str(tmp_path / "pool"),
        "--model",
        str(tiny_checkpoint),
        "--ray-actors",
        "2",
    )
    assert (code, out) == (2, "")
    assert (
        err.strip()
        == "alselect: error: --ray-address, --ray-actors and --ray-gpus-per-actor need --engine ray"
    )
    code, _, err = cli(
        capsys, "--store", store, "embed", str(tmp_path / "pool"), "-m", str(tiny_checkpoint), "--engine", "x"
    )
    assert code == 2 and "--engine must be local or ray" in err
    assert not (tmp_path / "store").exists()  # refused before a store was made


# --- resource plans -----------------------------------------------------------------------------


def test_plan_one_actor_per_gpu_or_half_the_cpus() -> None:
    cpu_cluster = {"CPU": 8.0}
    gpu_cluster = {"CPU": 32.0, "GPU": 4.0}
    plan = plan_for(EmbedOptions(engine="ray"), cpu_cluster)
    assert (plan.actors, plan.gpus, plan.decode_tasks) == (4, 0.0, 8)
    plan = plan_for(EmbedOptions(engine="ray"), gpu_cluster)
    assert (plan.actors, plan.gpus, plan.decode_tasks) == (4, 1.0, None)
    plan = plan_for(EmbedOptions(engine="ray", ray=RayOptions(gpus_per_actor=0.5)), gpu_cluster)
    assert (plan.actors, plan.gpus) == (8, 0.5)
    plan = plan_for(EmbedOptions(engine="ray", device="cpu", ray=RayOptions(actors=3)), gpu_cluster)
    assert (plan.actors, plan.gpus, plan.decode_tasks) == (3, 0.0, 32)
    assert plan_for(EmbedOptions(engine="ray"), {"CPU": 1.0}).actors == 1
    with pytest.raises(AlselectError, match="the Ray cluster has no GPUs"):
        plan_for(EmbedOptions(engine="ray", device="cuda"), cpu_cluster)
    with pytest.raises(AlselectError, match="needs 2 GPU"):
        plan_for(EmbedOptions(engine="ray", ray=RayOptions(gpus_per_actor=2)), {"CPU": 4.0, "GPU": 1.0})


# --- cluster addresses --------------------------------------------------------------------------


def test_addresses_parse_and_an_unreachable_one_fails_fast() -> None:
    assert split_address("10.1.2.3:6379") == ("10.1.2.3", 6379)
    assert split_address("ray://head.example:10001") == ("head.example", 10001)
    assert split_address("[::1]:6379") == ("::1", 6379)
    for bad in ("head", "head:port", ":6379"):
        with pytest.raises(UsageError, match="expected auto, HOST:PORT"):
            split_address(bad)
    port = closed_port()
    refused = rf"^cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused$"
    with pytest.raises(AlselectError, match=refused):
        check_reachable(f"127.0.0.1:{port}")


# --- model recipes ------------------------------------------------------------------------------


def test_a_recipe_rebuilds_the_same_model_and_refuses_a_different_file(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    prepared = prepare_model(ModelSpec(ckpt))
    assert prepared.recipe is not None and Path(prepared.recipe.checkpoint).is_absolute()
    image = write_image(tmp_path / "a.png", seed=4)
    import torch

    batch = torch.from_numpy(load_image(image, prepared.preprocess)[None]).float()
    rebuilt = prepared.recipe()
    for name, value in prepared.model.forward_outputs(batch).items():
        np.testing.assert_array_equal(rebuilt.forward_outputs(batch)[name].numpy(), value.numpy())
    mc = full_pass_model(prepared, 3)
    assert mc.recipe is not None and mc.recipe.mc_samples == 3
    assert mc.runner is not None
    np.testing.assert_array_equal(
        mc.recipe().forward_outputs(batch)["mc_probs"].numpy(),
        mc.runner.forward_outputs(batch)["mc_probs"].numpy(),
    )
    ckpt.write_bytes(ckpt.read_bytes() + b"\0")  # another file under the same path on some node
    with pytest.raises(CheckpointError, match="every node must see the same checkpoint"):
        prepared.recipe()


# --- the chunk data path, run by hand ------------------------------------------------------------


def test_chunks_decoded_and_run_as_the_ray_stages_do_match_the_local_engine(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    pytest.importorskip("pyarrow", reason="pyarrow comes with the ray extra: pip install 'alselect[ray]'")
    paths = [write_image(tmp_path / f"img_{i}.png", seed=i) for i in range(7)]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    paths[3:3] = [tmp_path / "empty.png"]
    paths.append(tmp_path / "text.jpg")
    model = load_checkpoint(tiny_checkpoint)
    size = 3

    shas = [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths]
    shas[5] = "0" * 64  # hashed as other content: "changed while reading"
    local: list[tuple[list[int], dict[str, np.ndarray], list[tuple[int, str]]]] = []
    options = EmbedOptions("cpu", size, 0)
    run_model(model, paths, model.preprocess, options, lambda *b: local.append(b), expected_sha256=shas)
    tables = chunk_tables(paths, shas, size)
    assert [t.num_rows for t in tables] == [1, 1, 1]  # one chunk per input block while there are few
    actor = ModelActor(Shipped(model), model.preprocess, use_gpu=False)
    results = [unpack(actor(decode_chunks(numpy_batch(table), model.preprocess, size))) for table in tables]
    assert len(results) == len(local)
    for (indices, outputs, failures), (want_indices, want_outputs, want_failures) in zip(
        results, local, strict=True
    ):
        assert (indices, failures) == (want_indices, want_failures)
        assert outputs.keys() == want_outputs.keys()
        for name in outputs:
            np.testing.assert_array_equal(outputs[name], want_outputs[name])  # the same batches: bitwise
    reasons = dict(failure for _, _, fs in results for failure in fs)
    assert reasons == {3: "empty file", 5: CHANGED_WHILE_READING, 8: "not an image (unrecognised format)"}


def numpy_batch(table: Any) -> dict[str, np.ndarray]:
    """An Arrow table in Ray Data's numpy batch format: list columns as object arrays of arrays."""
    batch: dict[str, np.ndarray] = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        if values and isinstance(values[0], list):
            column = np.empty(len(values), dtype=object)
            for row, value in enumerate(values):
                column[row] = np.array(value, dtype=str)
            batch[name] = column
        else:
            batch[name] = np.array(values)
    return batch


def test_ray_failures_surface_as_one_line_alselect_errors() -> None:
    class Wrapped(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__(f"task failed\nTraceback...\n{cause}")
            self.cause = cause

    def failing(exc: BaseException) -> Iterator[dict[str, np.ndarray]]:
        raise exc
        yield {}

    original = CheckpointError("checkpoint not found: /models/a.pt")
    with pytest.raises(CheckpointError) as caught:
        list(guarded(failing(Wrapped(original))))
    assert caught.value is original
    with pytest.raises(AlselectError, match=r"^the Ray engine failed: OSError: disk gone$"):
        list(guarded(failing(Wrapped(OSError("disk gone\nmore")))))
    # an actor that failed to start: Ray keeps only the worker's traceback, as text
    died = RuntimeError(
        "The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker()\x1b[39m\n"
        '  File "/x/pipeline.py", line 71, in __call__\n    raise CheckpointError(\n'
        "alselect.errors.CheckpointError: /m.pt on node2 has sha256 aaa, not bbb: every node must see it"
    )
    with pytest.raises(CheckpointError, match=r"^/m.pt on node2 has sha256 aaa, not bbb: every node must"):
        list(guarded(failing(died)))
    crashed = RuntimeError(
        'Traceback (most recent call last):\n  File "m.py", line 1\nZeroDivisionError: by zero'
    )
    with pytest.raises(AlselectError, match=r"^the Ray engine failed: ZeroDivisionError: by zero$"):
        list(guarded(failing(crashed)))
    with pytest.raises(AlselectError, match=r"^the Ray engine failed: RuntimeError: ray::W died$"):
        list(guarded(failing(RuntimeError("\x1b[36mray::W died\x1b[39m\ndetails"))))
