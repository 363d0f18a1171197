"""``--embedding-dtype float16``: embeddings stored in half the bytes, under a model key of their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
from alselect.embed import EmbedOptions
from alselect.errors import NothingUsableError, UsageError
from alselect.models.small_cnn import SmallCNN
from alselect.pipeline import FLOAT16_RANGE, ModelSpec, embed_folder
from alselect.preprocess import Preprocess
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
    picked = {}
    for dtype in ("float32", "float16"):
        store_path = tmp_path / dtype
        run = score(store_path, FOLDER, SAMPLE_DATA / "model.pt", strategy, budget=8, options=options(dtype))
        assert run.selected == 8
        with Store.open(store_path) as store:
            records = store.ranking_records(run.run_id)
        assert records is not None
        picked[dtype] = set(records["image_id"][:8].tolist())
    assert len(picked["float32"] & picked["float16"]) >= 6, picked


def test_an_embedding_beyond_float16_range_fails_for_that_model_with_its_reason(
    tmp_path: Path, store_path: Path, make_images: MakeImages
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
