"""Scoring with several models: failures per model, embedding models, ensembles, labeled folders,
cron safeguards, and strategy options from the command line."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from alselect.errors import NothingUsableError, UsageError
from alselect.pipeline import ModelSpec, Safeguards, ScoreModels
from alselect.store import Store
from alselect.strategies import PoolInputs, Selection, Strategy, build_strategy, parse_params, top_k
from tests.conftest import write_image
from tests.helpers import MakeImages, cli, score
from tests.test_pipeline import _NanForBrightImages


class Recorder(Strategy):
    """Entropy order, remembering the inputs it was given."""

    name = "recorder"
    summary = "test"
    needs: ClassVar[frozenset[str]] = frozenset({"probs", "embeddings"})

    def __init__(self) -> None:
        self.seen: list[PoolInputs] = []

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        self.seen.append(inputs)
        return top_k(np.zeros(inputs.size), inputs.excluded, budget)


@pytest.fixture
def other_checkpoint(tmp_path: Path) -> Path:
    """Another 3-class SmallCNN (different weights), same preprocessing as ``tiny_checkpoint``."""
    from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
    from alselect.models.small_cnn import SmallCNN
    from alselect.preprocess import Preprocess

    torch.manual_seed(7)
    path = tmp_path / "other.pt"
    save_alselect_checkpoint(
        path,
        SmallCNN(num_classes=3),
        arch="small_cnn",
        num_classes=3,
        classes=["ant", "bee", "cat"],
        preprocess=Preprocess(image_size=16, resize_size=16, mean=(0.5,) * 3, std=(0.25,) * 3),
    )
    return path


def nan_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "nan.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(
            torch.jit.script(_NanForBrightImages()),
            str(path),
            _extra_files={"alselect.json": '{"image_size": 8, "mean": [0.5], "std": [0.25]}'},
        )
    return path


def grey_pool(folder: Path, levels: list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, level in enumerate(levels):
        Image.new("RGB", (8, 8), (level,) * 3).save(folder / f"img_{i}.png")


def test_a_models_non_finite_output_fails_the_image_for_that_model_only(
    tmp_path: Path, store_path: Path, other_checkpoint: Path
) -> None:
    grey_pool(tmp_path / "pool", [10, 20, 240, 250, 30])
    nan = nan_checkpoint(tmp_path)
    first = score(store_path, tmp_path / "pool", nan)
    assert first.selected == 3 and len(first.embed.failures) == 2
    # another model scores every image: the failure was the first model's, not the files'
    good = score(store_path, tmp_path / "pool", other_checkpoint)
    assert (good.embed.embedded, good.pool_size, good.selected) == (5, 5, 5)
    again = score(store_path, tmp_path / "pool", nan)
    assert (again.embed.embedded, again.embed.failures, again.embed.failed_before) == (0, [], 2)
    assert "2 that failed before not retried (--retry-failed)" in (again.embed.failure_summary() or "")
    retried = score(store_path, tmp_path / "pool", nan, retry_failed=True)
    assert (retried.embed.embedded, len(retried.embed.failures), retried.pool_size) == (0, 2, 3)
    with Store.open(store_path) as store:
        assert store.scalar("SELECT COUNT(*) FROM images WHERE status = 'failed'") == 0
        assert store.scalar("SELECT COUNT(*) FROM output_failures") == 2


def test_retry_failed_decodes_failed_files_again(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 2)
    (tmp_path / "pool" / "bad.png").write_bytes(b"not an image")
    assert score(store_path, tmp_path / "pool", tiny_checkpoint).pool_size == 2
    assert score(store_path, tmp_path / "pool", tiny_checkpoint).embed.failures == []  # not retried
    retried = score(store_path, tmp_path / "pool", tiny_checkpoint, retry_failed=True)
    assert [path for path, _ in retried.embed.failures] == ["bad.png"]


def test_vanished_folder_is_exit_3_and_changes_nothing(
    tmp_path: Path,
    store_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_images(tmp_path / "pool", 4)
    first = score(store_path, tmp_path / "pool", tiny_checkpoint, safeguards=Safeguards())
    shutil.move(tmp_path / "pool", tmp_path / "elsewhere")
    (tmp_path / "pool").mkdir()  # the mount point, disk not mounted
    with pytest.raises(NothingUsableError, match="is the disk mounted"):
        score(store_path, tmp_path / "pool", tiny_checkpoint, safeguards=Safeguards())
    with Store.open(store_path) as store:
        assert store.scalar("SELECT COUNT(*) FROM images WHERE status = 'present'") == 4
        assert store.latest_run()["id"] == first.run_id
    code, _, err = cli(
        capsys, "--store", str(store_path), "score", str(tmp_path / "pool"), "-m", str(tiny_checkpoint),
        "-s", "entropy", "--workers", "0",
    )  # fmt: skip
    assert code == 3 and err.count("\n") == 1 and "--allow-empty" in err
    accepted = score(store_path, tmp_path / "pool", tiny_checkpoint, safeguards=Safeguards(allow_empty=True))
    assert accepted.selected == 0


def test_all_new_images_failing_or_too_many_failing_is_exit_3(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    (tmp_path / "broken").mkdir()
    for i in range(3):
        (tmp_path / "broken" / f"b{i}.jpg").write_bytes(b"\xff\xd8 truncated %d" % i)
    with pytest.raises(NothingUsableError, match=r"all 3 image.*none is usable"):
        score(store_path, tmp_path / "broken", tiny_checkpoint, safeguards=Safeguards())
    with Store.open(store_path) as store:
        assert store.latest_run() is None
    make_images(tmp_path / "mixed", 3)
    (tmp_path / "mixed" / "bad.png").write_bytes(b"")
    with pytest.raises(NothingUsableError, match=r"1 of 4 image\(s\) failed .*25.0% > --max-failed 10.0%"):
        score(store_path, tmp_path / "mixed", tiny_checkpoint, safeguards=Safeguards(max_failed=0.10))
    assert (
        score(
            store_path, tmp_path / "mixed", tiny_checkpoint, safeguards=Safeguards(max_failed=0.25)
        ).selected
        == 3
    )


def test_embedding_model_supplies_the_embeddings_the_strategy_uses(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, other_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 6)
    recorder = Recorder()
    models = ScoreModels(task=[ModelSpec(tiny_checkpoint)], embed=ModelSpec(other_checkpoint))
    result = score(store_path, tmp_path / "pool", tiny_checkpoint, strategy=recorder, spec=models)
    assert [e.embedded for e in result.embeds] == [6, 6]
    (seen,) = recorder.seen
    with Store.open(store_path) as store:
        root = str((tmp_path / "pool").resolve())
        task_pool = store.pool(root, result.embeds[0].model_key)
        embed_pool = store.pool(root, result.embeds[1].model_key)
        run = store.latest_run()
    assert seen.embeddings is not None
    np.testing.assert_array_equal(seen.embeddings, embed_pool.embeddings)
    assert not np.allclose(seen.embeddings, task_pool.embeddings)
    np.testing.assert_array_equal(seen.probs, task_pool.probs)  # probabilities stay the task model's
    assert [m["role"] for m in run["models"]] == ["task", "embedding"]


def test_ensemble_probs_are_the_members_mean_and_members_are_stacked(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, other_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 5)

    class Members(Recorder):
        needs: ClassVar[frozenset[str]] = frozenset({"probs", "mc_probs"})

    recorder = Members()
    models = ScoreModels(task=[ModelSpec(tiny_checkpoint), ModelSpec(other_checkpoint)])
    result = score(store_path, tmp_path / "pool", tiny_checkpoint, strategy=recorder, spec=models)
    (seen,) = recorder.seen
    with Store.open(store_path) as store:
        root = str((tmp_path / "pool").resolve())
        a, b = (store.pool(root, e.model_key).probs for e in result.embeds)
        assert [m["role"] for m in store.latest_run()["models"]] == ["member", "member"]
    assert seen.mc_probs is not None and seen.mc_probs.shape == (5, 2, 3)
    np.testing.assert_array_equal(seen.mc_probs[:, 0], a)
    np.testing.assert_array_equal(seen.mc_probs[:, 1], b)
    np.testing.assert_allclose(seen.probs, (a + b) / 2, rtol=1e-6)
    single = Members()  # one model: MC-dropout samples instead of members (tests/test_mc_dropout.py)
    score(store_path, tmp_path / "pool", tiny_checkpoint, strategy=single)
    assert single.seen[0].mc_probs is not None and single.seen[0].mc_probs.shape == (5, 20, 3)


def test_labeled_folder_rows_are_labeled_context_never_candidates(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 4)
    make_images(tmp_path / "train", 3, start=10)
    write_image(tmp_path / "train" / "same_as_pool.png", seed=0)  # content also in the pool
    recorder = Recorder()
    result = score(
        store_path, tmp_path / "pool", tiny_checkpoint, strategy=recorder, labeled_dirs=[tmp_path / "train"]
    )
    (seen,) = recorder.seen
    assert seen.size == 7 and seen.labeled.tolist() == [False] * 4 + [True] * 3
    assert (result.pool_size, result.labeled, result.selected) == (7, 3, 4)


def test_batch_aware_strategies_need_a_budget(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path
) -> None:
    class Batch(Recorder):
        batch_aware = True

    with pytest.raises(UsageError, match="--budget"):
        score(store_path, tmp_path, tiny_checkpoint, strategy=Batch())


def test_strategy_params_from_the_command_line() -> None:
    assert parse_params(["beta=10", "max-iter = 3", "name=a=b"]) == {
        "beta": "10",
        "max_iter": "3",
        "name": "a=b",
    }
    for bad in (["beta"], ["=3"], ["9x=1"]):
        with pytest.raises(UsageError, match="KEY=VALUE"):
            parse_params(bad)
    random = build_strategy("random", seed=4, params={})
    assert random.get_params() == {"seed": 4}
    assert build_strategy("random", params={"seed": "9"}).get_params() == {"seed": 9}
    with pytest.raises(UsageError, match="no parameter 'beta'"):
        build_strategy("entropy", params={"beta": "1"})
    with pytest.raises(UsageError, match="--param seed=x"):
        build_strategy("random", params={"seed": "x"})


SEEDED = ["random", "coreset", "kmeans", "diverse-minibatch", "dal", "badge", "entropy"]


@pytest.mark.parametrize("name", SEEDED)
def test_a_negative_or_huge_seed_is_a_usage_error_naming_the_option(name: str) -> None:
    for bad in (-1, 2**63):
        with pytest.raises(UsageError, match=r"^--seed must be an integer from 0 to"):
            build_strategy(name, seed=bad)
    if "seed" in build_strategy(name).get_params():
        with pytest.raises(UsageError, match=rf"^--param seed for strategy '{name}' must be an integer"):
            build_strategy(name, params={"seed": "-1"})
        assert build_strategy(name, params={"seed": str(2**63 - 1)}).get_params()["seed"] == 2**63 - 1


def test_a_negative_seed_on_the_command_line_is_exit_2_before_any_work(
    tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    make_images(tmp_path / "pool", 3)
    base = ["--store", str(tmp_path / "store"), "score", str(tmp_path / "pool"), "-m", str(tiny_checkpoint)]
    for extra, needle in (
        (["-s", "random", "--seed", "-1"], "--seed must be"),
        (["-s", "coreset", "--budget", "2", "--seed", "-1"], "--seed must be"),
        (["-s", "kmeans", "--budget", "2", "--param", "seed=-1"], "--param seed for strategy 'kmeans'"),
    ):
        code, out, err = cli(capsys, *base, *extra)
        assert (code, out) == (2, ""), err
        assert len(err.strip().splitlines()) == 1 and needle in err, err
        assert not (tmp_path / "store").exists()


DEVICE_STRATEGIES = ["coreset", "badge", "kmeans", "diverse-minibatch", "dal", "batchbald"]


@pytest.mark.parametrize("name", DEVICE_STRATEGIES)
def test_a_strategy_device_is_checked_alike_when_the_strategy_is_built(name: str) -> None:
    from alselect.errors import AlselectError

    assert "device" in build_strategy(name).get_params()
    for bad in ("tpu", "cuda:x", "CPU", "cuda:0:1", ""):
        with pytest.raises(UsageError, match=r"^--param device=.*: use auto, cpu, cuda or cuda:N$"):
            build_strategy(name, params={"device": bad})
    assert build_strategy(name, params={"device": "cpu"}).get_params()["device"] == "cpu"
    if not torch.cuda.is_available():
        for missing in ("cuda", "cuda:0"):
            with pytest.raises(AlselectError, match=r"^--param device=cuda(:0)?: CUDA is not available"):
                build_strategy(name, params={"device": missing})
    else:
        with pytest.raises(AlselectError, match=r"CUDA device\(s\) present"):
            build_strategy(name, params={"device": f"cuda:{torch.cuda.device_count()}"})


@pytest.mark.parametrize(("value", "code"), [("tpu", 2), ("cuda", 1)])
def test_a_strategy_device_on_the_command_line_is_one_line_before_any_work(
    value: str,
    code: int,
    tmp_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    make_images(tmp_path / "pool", 3)
    base = ["--store", str(tmp_path / "store"), "score", str(tmp_path / "pool"), "-m", str(tiny_checkpoint)]
    for name in ("coreset", "kmeans"):
        got, out, err = cli(capsys, *base, "-s", name, "--budget", "2", "--param", f"device={value}")
        assert (got, out) == (code, ""), err
        assert err.strip().splitlines() == [
            f"alselect: error: --param device={value}: "
            + ("use auto, cpu, cuda or cuda:N" if code == 2 else "CUDA is not available on this machine")
        ]
        assert not (tmp_path / "store").exists()


def test_an_unknown_device_names_the_accepted_values_only(
    tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    make_images(tmp_path / "pool", 2)
    got, _, err = cli(
        capsys, "--store", str(tmp_path / "s"), "embed", str(tmp_path / "pool"), "-m", str(tiny_checkpoint),
        "--device", "tpu",
    )  # fmt: skip
    assert got == 2 and err.strip() == "alselect: error: --device tpu: use auto, cpu, cuda or cuda:N", err


def test_a_prefilter_smaller_than_the_budget_says_so_once(
    tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    make_images(tmp_path / "pool", 6)
    base = ["--store", str(tmp_path / "store"), "score", str(tmp_path / "pool"), "-m", str(tiny_checkpoint)]
    code, out, err = cli(capsys, *base, "-s", "entropy", "--prefilter", "margin:2", "--budget", "5")
    assert (code, out) == (0, ""), err
    notes = [line for line in err.splitlines() if "--prefilter" in line]
    assert notes == [
        "warning: --prefilter margin:2 keeps 2 candidate(s), fewer than --budget 5: the run ranks at most 2"
    ]
    assert "ranked 2 of 6" in err
    for quiet in (["--budget", "2"], []):  # TOP covers the budget, or no budget at all
        code, _, err = cli(capsys, *base, "-s", "entropy", "--prefilter", "margin:2", *quiet)
        assert code == 0 and "keeps 2 candidate(s)" not in err, err
