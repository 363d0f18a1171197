"""``--embedding-dtype float16``: embeddings stored in half the bytes, under a model key of their own."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from alselect.checkpoints import load_checkpoint
from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
from alselect.embed import EmbedOptions
from alselect.errors import NothingUsableError, UsageError
from alselect.models.small_cnn import SmallCNN
from alselect.pipeline import (
    FLOAT16_RANGE,
    McDropout,
    ModelSpec,
    ScoreModels,
    embed_folder,
    precision_key,
    prepare_model,
    with_embedding_dtype,
)
from alselect.preprocess import Preprocess
from alselect.status import store_status
from alselect.store import Store
from tests.conftest import SAMPLE_DATA
from tests.helpers import MakeImages, cli, score

FOLDER = SAMPLE_DATA / "images"


def options(dtype: str) -> EmbedOptions:
    return EmbedOptions(device="cpu", batch_size=64, workers=0, precision="fp32", embedding_dtype=dtype)


def test_float16_embeddings_are_the_float32_ones_rounded_under_their_own_key(store_path: Path) -> None:
    runs = {
        dtype: score(store_path, FOLDER, SAMPLE_DATA / "model.pt", options=options(dtype))
        for dtype in ("float32", "float16")
    }
    key32, key16 = runs["float32"].embed.model_key, runs["float16"].embed.model_key
    assert key32 != key16
    assert runs["float16"].embed.embedded == 306  # not served from the float32 arrays
    with Store.open(store_path) as store:
        pool32, pool16 = store.pool(str(FOLDER.resolve()), key32), store.pool(str(FOLDER.resolve()), key16)
        record = store.model(key16)
        assert record is not None and record["outputs"]["embedding"]["dtype"] == "float16"
        assert record["outputs"]["probs"]["dtype"] == "float32"
        assert record["preprocess"]["embedding_dtype"] == "float16"
        assert record["preprocess"]["base_key"] == key32
    assert pool16.embeddings.dtype == np.float16 and pool32.embeddings.dtype == np.float32
    # the float16 array is exactly the float32 one rounded to nearest (same fp32 forward)
    np.testing.assert_array_equal(pool16.embeddings, pool32.embeddings.astype(np.float16))
    np.testing.assert_array_equal(pool16.probs, pool32.probs)
    assert runs["float16"].embed.model_display.endswith("+e16")


@pytest.mark.parametrize("strategy", ["coreset", "kmeans", "badge"])
def test_batch_strategies_pick_alike_from_float16_embeddings(tmp_path: Path, strategy: str) -> None:
    """Rounding to float16 (relative error <= 2^-11) barely moves a batch selection."""
    picked = {
        dtype: first_eight(tmp_path / dtype, SAMPLE_DATA / "model.pt", strategy, options=options(dtype))
        for dtype in ("float32", "float16")
    }
    assert len(picked["float32"] & picked["float16"]) >= 6, picked


def first_eight(store_path: Path, checkpoint: Path, strategy: str, **kwargs: Any) -> set[int]:
    """The image ids a ``--budget 8`` run over the sample folder picks."""
    run = score(store_path, FOLDER, checkpoint, strategy, budget=8, **kwargs)
    assert run.selected == 8
    with Store.open(store_path) as store:
        records = store.ranking_records(run.run_id)
    assert records is not None
    return set(records["image_id"][:8].tolist())


def test_an_embedding_beyond_float16_range_fails_for_that_model_with_its_reason(
    tmp_path: Path, store_path: Path, make_images: MakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3)
    with torch.no_grad():
        model.embed[1].bias.fill_(1e5)  # every embedding value ~1e5 > 65,504 (finite in float32)
    checkpoint = tmp_path / "wide.pt"
    save_alselect_checkpoint(
        checkpoint, model, "small_cnn", 3, preprocess=Preprocess(image_size=16, resize_size=16)
    )
    make_images(tmp_path / "pool", 4)
    with Store.open(store_path, write=True, create=True) as store:
        with pytest.raises(NothingUsableError):  # every image failed: the run says so (exit 3)
            embed_folder(store, tmp_path / "pool", ModelSpec(checkpoint), options("float16"))
        reasons = store.rows("SELECT reason FROM output_failures")
        assert reasons == [(FLOAT16_RANGE,)] * 4
        assert store.rows("SELECT status FROM images") == [("present",)] * 4  # the file is fine
        names = store.model_names()
    # the run said "'alselect status --failed' lists them": it does, with the model and the reason
    code, out, err = cli(capsys, "--store", str(store_path), "status", "--failed")
    assert code == 0, err
    root = str((tmp_path / "pool").resolve())
    (wide,) = [name for name in names.values() if name.endswith("+e16")]
    listed = sorted(line for line in out.splitlines() if line.startswith(root))
    assert listed == [f"{root}/img_{i:04d}.png\tmodel {wide}: {FLOAT16_RANGE}" for i in range(4)]
    info = json.loads(cli(capsys, "--store", str(store_path), "status", "--json", "--failed")[1])
    assert info["failed_images"] == []  # the files are fine: other models still read them
    assert [(item["path"], item["model"], item["reason"]) for item in info["failed_outputs"]] == [
        (f"img_{i:04d}.png", wide, FLOAT16_RANGE) for i in range(4)
    ]
    with Store.open(store_path, write=True) as store:
        plain = embed_folder(store, tmp_path / "pool", ModelSpec(checkpoint), options("float32"))
        assert plain.embedded == 4 and plain.failures == []


def test_embedding_dtype_is_checked_before_any_work(
    capsys: pytest.CaptureFixture[str], store_path: Path
) -> None:
    with pytest.raises(UsageError, match="--embedding-dtype must be float32 or float16"):
        EmbedOptions(embedding_dtype="float64")
    code, out, err = cli(
        capsys,
        "--store",
        str(store_path),
        "score",
        str(FOLDER),
        "--model",
        str(SAMPLE_DATA / "model.pt"),
        "-s",
        "entropy",
        "--embedding-dtype",
        "bf16",
    )
    assert code == 2 and out == "" and "--embedding-dtype must be float32 or float16, got 'bf16'" in err
    assert not (store_path / "alselect.db").exists()


def test_mc_dropout_samples_are_shared_by_float32_and_float16_embeddings(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    """MC-dropout samples hold no embedding: a float16 run reuses the float32 run's T passes per
    image instead of recomputing them under a second model named the same."""
    make_images(tmp_path / "pool", 4)
    spec = ScoreModels(task=[ModelSpec(tiny_checkpoint)], mc=McDropout(samples=3, mode="full"))
    runs = {
        dtype: score(
            store_path, tmp_path / "pool", tiny_checkpoint, "bald", spec=spec, options=options(dtype)
        )
        for dtype in ("float32", "float16")
    }
    mc32, mc16 = runs["float32"].embeds[-1], runs["float16"].embeds[-1]
    assert mc32.model_display.endswith("+mc3") and mc32.embedded == 4
    assert (mc16.model_key, mc16.embedded, mc16.already_embedded) == (mc32.model_key, 0, 4)
    with Store.open(store_path) as store:
        names = sorted(m["model"] for m in store_status(store)["models"])
        records = [store.ranking_records(run.run_id) for run in runs.values()]
    sha12 = mc32.model_display.split("+")[0]
    assert names == [sha12, f"{sha12}+e16", f"{sha12}+mc3"]
    assert records[0] is not None and records[1] is not None
    np.testing.assert_array_equal(records[0]["image_id"], records[1]["image_id"])  # bald reads mc_probs only


def test_status_says_the_embeddings_are_float16(
    tmp_path: Path,
    store_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_images(tmp_path / "pool", 3)
    for dtype in ("float32", "float16"):
        score(store_path, tmp_path / "pool", tiny_checkpoint, options=options(dtype))
    with Store.open(store_path) as store:
        models = {m["model"]: m for m in store_status(store)["models"]}
    (plain,) = [name for name in models if "+" not in name]
    assert models[plain]["embedding_dtype"] == "float32"
    assert models[f"{plain}+e16"]["embedding_dtype"] == "float16"
    code, out, err = cli(capsys, "--store", str(store_path), "status")
    assert code == 0, err
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("model:")}
    assert "(3 classes, 128-d float16, fp32) 3 embedded" in lines[f"{plain}+e16"]
    assert "(3 classes, 128-d, fp32) 3 embedded" in lines[plain]


def test_head_only_mc_dropout_allows_for_the_float16_rounding_of_the_stored_embedding(
    tmp_path: Path, store_path: Path
) -> None:
    """The head check reproduces the stored probabilities from the stored embedding: rounded to
    float16 (relative error up to 2^-11) the logits of a confident model move by more than the fp32
    tolerance, which is no reason to say the checkpoint has no final layer."""
    model = load_checkpoint(SAMPLE_DATA / "model.pt")
    with torch.no_grad():  # logits 30 times as large: ranges of a few hundred
        model.module.fc.weight.mul_(30.0)
        model.module.fc.bias.mul_(30.0)
    checkpoint = tmp_path / "confident.pt"
    save_alselect_checkpoint(
        checkpoint, model.module, "small_cnn", 10, model.classes, preprocess=model.preprocess
    )
    spec = ScoreModels(task=[ModelSpec(checkpoint)], mc=McDropout(samples=4, mode="head"))
    picked = {
        dtype: first_eight(store_path, checkpoint, "bald", spec=spec, options=options(dtype))
        for dtype in ("float32", "float16")
    }
    assert len(picked["float32"] & picked["float16"]) >= 6, picked


def test_auto_precision_keeps_the_fp32_forward_of_an_existing_pool_when_it_moves_to_float16(
    tmp_path: Path,
    store_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Adding ``--embedding-dtype float16`` to a store of fp32 outputs changes how embeddings are
    stored, not the forward: on a bf16-capable machine ``auto`` kept fp32 for the float32 pool and
    so keeps it for its float16 copy (the float32 values rounded, as the README says)."""
    from alselect import inference

    make_images(tmp_path / "pool", 3)

    def embed(store: Path, precision: str, dtype: str) -> tuple[str, str, int]:
        with Store.open(store, write=True, create=True) as opened:
            run = embed_folder(
                opened,
                tmp_path / "pool",
                ModelSpec(tiny_checkpoint),
                replace(options(dtype), precision=precision),
            )
        return run.model_key, run.model_display, run.embedded

    fp32_key, plain, _ = embed(store_path, "fp32", "float32")
    monkeypatch.setattr(inference, "cpu_bf16_native", lambda: True)  # now a bf16-capable CPU
    assert embed(store_path, "auto", "float32") == (fp32_key, plain, 0)
    e16_key = with_embedding_dtype(prepare_model(ModelSpec(tiny_checkpoint)), "float16").key
    assert embed(store_path, "auto", "float16") == (e16_key, f"{plain}+e16", 3)
    assert embed(store_path, "auto", "float16") == (e16_key, f"{plain}+e16", 0)
    fresh = embed(tmp_path / "fresh", "auto", "float16")  # a new store starts in the fast format
    assert fresh == (precision_key(e16_key, "bf16"), f"{plain}+bf16+e16", 3)
