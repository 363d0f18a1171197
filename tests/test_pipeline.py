"""Score → export → label through the library: incremental runs, exclusion, determinism."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from alselect.checkpoints import load_checkpoint
from alselect.labels import import_labels
from alselect.pipeline import ModelSpec, precision_key, prepare_model
from alselect.status import store_status
from alselect.store import Store
from tests.conftest import TINY_CLASSES, write_image
from tests.helpers import (
    FAST,
    MakeImages,
    assert_stored_as_direct_forward,
    cli,
    export_rows,
    export_text,
    score,
)


def test_first_run_embeds_all_and_second_run_embeds_none(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 9)
    first = score(store_path, tmp_path / "pool", tiny_checkpoint)
    assert (first.embed.embedded, first.embed.sync.new, first.selected) == (9, 9, 9)
    second = score(store_path, tmp_path / "pool", tiny_checkpoint)
    assert (second.embed.embedded, second.embed.already_embedded, second.embed.sync.new) == (0, 9, 0)
    assert second.selected == 9


def test_new_changed_renamed_and_vanished_files(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    pool = tmp_path / "pool"
    files = make_images(pool, 6)
    score(store_path, pool, tiny_checkpoint)

    write_image(files[0], seed=1000)  # changed content
    os.utime(files[0], ns=(1, 1))  # and a different mtime, as an edit would give
    files[1].rename(pool / "renamed.png")  # same content, new name
    files[2].unlink()  # vanished
    make_images(pool, 2, start=100)  # two new files
    result = score(store_path, pool, tiny_checkpoint)

    assert result.embed.embedded == 3  # changed + 2 new; the rename reuses its embedding
    sync = result.embed.sync
    assert (sync.new, sync.moved, sync.changed, sync.vanished) == (2, 1, 1, 1)
    paths = {row["path"] for row in export_rows(store_path)}
    assert "renamed.png" in paths and files[1].name not in paths
    assert files[2].name not in paths
    assert len(paths) == 7
    with Store.open(store_path) as store:
        status = dict(store.rows("SELECT relpath, status FROM images"))
    assert status[files[2].name] == "absent" and status["renamed.png"] == "present"


def test_stored_arrays_equal_direct_model_output(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    files = make_images(tmp_path / "pool", 5)
    # compared with the plain fp32 forward: on a CPU with native bf16, auto would pick bf16
    result = score(store_path, tmp_path / "pool", tiny_checkpoint, options=replace(FAST, precision="fp32"))
    key = result.embed.model_key
    assert_stored_as_direct_forward(store_path, tmp_path / "pool", key, tiny_checkpoint, files)


def test_exported_scores_are_entropy_of_stored_probs_in_descending_order(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 8)
    result = score(store_path, tmp_path / "pool", tiny_checkpoint)
    with Store.open(store_path) as store:
        pool = store.pool(str((tmp_path / "pool").resolve()), result.embed.model_key)
    expected = {
        path: -sum(p * math.log(p) for p in row if p > 0)
        for path, row in zip(pool.relpaths, pool.probs.astype(float).tolist(), strict=True)
    }
    rows = export_rows(store_path)
    assert [int(r["rank"]) for r in rows] == list(range(1, 9))
    for row in rows:
        assert float(row["score"]) == pytest.approx(expected[row["path"]], rel=1e-6)
        assert row["predicted_label"] in TINY_CLASSES
        assert row["strategy"] == "entropy"
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)


def test_export_skips_already_exported_unless_asked(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 7)
    score(store_path, tmp_path / "pool", tiny_checkpoint)
    first = [r["path"] for r in export_rows(store_path, top=3)]
    second = [r["path"] for r in export_rows(store_path, top=3)]
    assert len(first) == len(second) == 3 and not set(first) & set(second)
    # a new nightly run still never re-sends what went out before
    score(store_path, tmp_path / "pool", tiny_checkpoint)
    third = [r["path"] for r in export_rows(store_path)]
    assert sorted(first + second + third) == sorted(f"img_{i:04d}.png" for i in range(7))
    everything = [r["path"] for r in export_rows(store_path, include_exported=True)]
    assert len(everything) == 7


def test_dry_run_export_is_not_recorded(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 4)
    score(store_path, tmp_path / "pool", tiny_checkpoint)
    assert export_text(store_path, record=False) == export_text(store_path, record=False)
    assert len(export_rows(store_path)) == 4


def test_labeled_images_are_never_selected_or_exported(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 6)
    score(store_path, tmp_path / "pool", tiny_checkpoint)
    with Store.open(store_path, write=True) as store:
        result = import_labels(store, "img_0000.png\nimg_0003.png\nnot/there.png\n", "test")
    assert (result.newly_labeled, result.unknown) == (2, ["not/there.png"])
    # labeled after the run: export already skips them
    assert {r["path"] for r in export_rows(store_path, record=False)} == {
        "img_0001.png",
        "img_0002.png",
        "img_0004.png",
        "img_0005.png",
    }
    run = score(store_path, tmp_path / "pool", tiny_checkpoint)
    assert (run.labeled, run.selected) == (2, 4)


def test_label_an_export_csv_by_hash_survives_rename(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    pool = tmp_path / "pool"
    make_images(pool, 4)
    score(store_path, pool, tiny_checkpoint)
    batch = export_text(store_path, top=2)
    with Store.open(store_path, write=True) as store:
        assert import_labels(store, batch, "batch.csv").newly_labeled == 2
    sent = [r["path"] for r in export_rows(store_path, include_exported=True, record=False)]
    assert len(sent) == 2
    (pool / sent[0]).rename(pool / "moved.png")
    run = score(store_path, pool, tiny_checkpoint)
    assert run.labeled == 2 and run.selected == 2


def test_same_store_and_options_give_byte_identical_exports(
    tmp_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 10)
    outputs = []
    for name in ("a", "b"):
        score(tmp_path / name, tmp_path / "pool", tiny_checkpoint, strategy="random", seed=7)
        outputs.append(export_text(tmp_path / name, top=6))
    assert outputs[0] == outputs[1]
    score(tmp_path / "c", tmp_path / "pool", tiny_checkpoint, strategy="random", seed=8)
    assert export_text(tmp_path / "c", top=6) != outputs[0]


def test_duplicate_contents_are_embedded_and_ranked_once(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    files = make_images(tmp_path / "pool", 3)
    shutil.copy(files[0], tmp_path / "pool" / "copy_of_first.png")
    result = score(store_path, tmp_path / "pool", tiny_checkpoint)
    assert (result.embed.embedded, result.pool_size) == (3, 3)
    paths = [r["path"] for r in export_rows(store_path)]
    assert "copy_of_first.png" in paths and files[0].name not in paths  # first path in sort order


def test_budget_limits_the_run(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 6)
    assert score(store_path, tmp_path / "pool", tiny_checkpoint, budget=2).selected == 2
    assert len(export_rows(store_path)) == 2


def test_bad_files_are_recorded_skipped_and_not_retried(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    pool = tmp_path / "pool"
    good = make_images(pool, 3)
    (pool / "empty.png").write_bytes(b"")
    (pool / "text.jpg").write_text("definitely not an image")
    data = good[0].read_bytes()
    (pool / "truncated.png").write_bytes(data[: len(data) // 2])
    first = score(store_path, pool, tiny_checkpoint)
    assert first.selected == 3
    reasons = {Path(path).name: reason for path, reason in first.embed.failures}
    assert reasons["empty.png"] == "empty file"
    assert reasons["text.jpg"].startswith("not an image")
    assert reasons["truncated.png"].startswith("truncated or corrupt")
    summary = first.embed.failure_summary()
    assert summary is not None and summary.startswith("3 file(s) skipped") and "\n" not in summary
    second = score(store_path, pool, tiny_checkpoint)
    assert (second.embed.embedded, second.embed.failures) == (0, [])
    # fixing a file makes it eligible again
    shutil.copy(good[1], pool / "text.jpg")
    os.utime(pool / "text.jpg", ns=(5, 5))
    third = score(store_path, pool, tiny_checkpoint)
    assert third.embed.sync.changed == 1 and third.pool_size == 3  # same content as good[1]


HOSTILE_NAMES = [
    "a,b.png",
    'quote"d.png',
    "new\nline.png",
    "café ñ/日本.png",
    " spaced .png",
    "tab\there.png",
]


def test_hostile_filenames_round_trip_through_csv(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path
) -> None:
    pool = tmp_path / "pool"
    for seed, name in enumerate(HOSTILE_NAMES):
        write_image(pool / name, seed=seed)
    score(store_path, pool, tiny_checkpoint)
    rows = export_rows(store_path, absolute=True, record=False)
    assert sorted(r["path"] for r in rows) == sorted(str(pool.resolve() / n) for n in HOSTILE_NAMES)
    assert all(Path(r["path"]).is_file() for r in rows)
    relative = export_rows(store_path)
    assert sorted(r["path"] for r in relative) == sorted(HOSTILE_NAMES)
    batch = export_text(store_path, include_exported=True)
    with Store.open(store_path, write=True) as store:
        assert import_labels(store, batch, "x").newly_labeled == 6


def test_symlink_loops_terminate_and_aliases_are_deduplicated(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    pool = tmp_path / "pool"
    make_images(pool / "sub", 2)
    (pool / "sub" / "loop").symlink_to(pool, target_is_directory=True)
    (pool / "alias").symlink_to(pool / "sub", target_is_directory=True)
    result = score(store_path, pool, tiny_checkpoint)
    assert result.embed.sync.found == 4  # sub/* and alias/*, never through the loop
    assert result.pool_size == 2


def test_preprocessing_override_is_a_separate_model(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 3)
    default = score(store_path, tmp_path / "pool", tiny_checkpoint)
    bigger = score(
        store_path, tmp_path / "pool", tiny_checkpoint, spec=ModelSpec(tiny_checkpoint, image_size=24)
    )
    assert bigger.embed.embedded == 3 and bigger.embed.model_key != default.embed.model_key
    assert "+pp" in export_rows(store_path)[0]["model"]
    again = score(store_path, tmp_path / "pool", tiny_checkpoint)
    assert again.embed.embedded == 0


def test_budget_runs_do_not_reselect_images_already_sent(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 9)
    nights = []
    for _ in range(3):
        run = score(store_path, tmp_path / "pool", tiny_checkpoint, budget=3)
        assert run.selected == 3
        nights.append([r["path"] for r in export_rows(store_path, top=3)])
    assert all(len(night) == 3 for night in nights)
    assert len({p for night in nights for p in night}) == 9
    assert score(store_path, tmp_path / "pool", tiny_checkpoint, budget=3).selected == 0


class _NanForBrightImages(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([x.mean(dim=(1, 2, 3)), -x.mean(dim=(1, 2, 3))], dim=1)
        bright = (x.mean(dim=(1, 2, 3)) > 0).unsqueeze(1)
        return torch.where(bright, torch.full_like(logits, float("nan")), logits)


def test_non_finite_model_output_is_a_recorded_failure_not_a_crash(tmp_path: Path, store_path: Path) -> None:
    import warnings

    from PIL import Image

    pool = tmp_path / "pool"
    pool.mkdir()
    for i, level in enumerate([10, 20, 240, 250, 30]):
        Image.new("RGB", (8, 8), (level,) * 3).save(pool / f"img_{i}.png")
    path = tmp_path / "nan.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(
            torch.jit.script(_NanForBrightImages()),
            str(path),
            _extra_files={"alselect.json": '{"image_size": 8, "mean": [0.5], "std": [0.25]}'},
        )
    run = score(store_path, pool, path)
    reasons = dict(run.embed.failures)
    assert set(reasons) == {"img_2.png", "img_3.png"}
    assert all(r.startswith("model output not finite") for r in reasons.values())
    assert run.selected == 3
    assert score(store_path, pool, path).embed.embedded == 0  # not retried every night


def test_model_name_is_the_same_in_run_export_and_status(
    tmp_path: Path, store_path: Path, tiny_checkpoint: Path, make_images: MakeImages
) -> None:
    from alselect.status import store_status

    make_images(tmp_path / "pool", 2)
    run = score(
        store_path, tmp_path / "pool", tiny_checkpoint, spec=ModelSpec(tiny_checkpoint, image_size=20)
    )
    exported = export_rows(store_path)[0]["model"]
    with Store.open(store_path) as store:
        shown = store_status(store)["models"][0]["model"]
    assert run.embed.model_display == exported == shown
    assert exported.startswith(load_checkpoint(tiny_checkpoint).sha256[:12] + "+pp")


def test_status_says_what_each_derived_model_is_and_stores_absolute_checkpoint_paths(
    tmp_path: Path,
    store_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_images(tmp_path / "pool", 3)
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_checkpoint, tmp_path / "other.pt")  # the same weights under a relative name
    sha12 = load_checkpoint(tiny_checkpoint).sha256[:12]
    base = ["--store", str(store_path), "score", "pool", "-m", str(tiny_checkpoint), "--workers", "0"]
    runs = [
        ["-s", "bald", "--mc-samples", "4"],
        ["-s", "entropy", "--precision", "bf16"],
        ["-s", "entropy", "--precision", "fp16"],
        ["-s", "bald", "--mc-samples", "3", "--precision", "fp16"],
        ["-s", "entropy", "--image-size", "12", "--precision", "bf16"],
    ]
    for extra in runs:
        code, _, err = cli(capsys, *base, *extra, "--device", "cpu")
        assert code == 0, err
    code, _, err = cli(
        capsys, "--store", str(store_path), "score", "pool", "-m", "other.pt", "--embed-model", "other.pt",
        "-s", "coreset", "--budget", "2", "--workers", "0", "--precision", "fp32",
    )  # fmt: skip
    assert code == 0, err
    with Store.open(store_path) as store:
        models = {m["model"]: m for m in store_status(store)["models"]}
        pp_key = precision_key(prepare_model(ModelSpec(tiny_checkpoint, image_size=12)).key, "bf16")
        assert (
            store.model_names()[pp_key]
            == f"{sha12}+pp{prepare_model(ModelSpec(tiny_checkpoint, image_size=12)).key[:6]}+bf16"
        )
    expected = {
        sha12: ("fp32", None),
        f"{sha12}+mc4": ("fp32", 4),
        f"{sha12}+bf16": ("bf16", None),
        f"{sha12}+fp16": ("fp16", None),
        f"{sha12}+fp16+mc3": ("fp16", 3),
    }
    assert len(models) == 6, sorted(models)
    for name, (precision, samples) in expected.items():
        assert (models[name]["precision"], models[name]["mc_samples"]) == (precision, samples), sorted(models)
        assert (models[name]["dim"] is None) == (samples is not None)  # MC samples hold no embedding
    assert {m["checkpoint"] for m in models.values()} <= {str(tiny_checkpoint), str(tmp_path / "other.pt")}
    assert models[sha12]["checkpoint"] == str(tmp_path / "other.pt")  # absolute, though given relative
    code, out, _ = cli(capsys, "--store", str(store_path), "status")
    assert code == 0 and "None" not in out
    line = next(x for x in out.splitlines() if x.startswith(f"model:     {sha12}+fp16+mc3 "))
    assert "(3 classes, 3 MC-dropout samples per image, fp16) 3 embedded" in line
    line = next(x for x in out.splitlines() if x.startswith(f"model:     {sha12}+bf16 "))
    assert f"(3 classes, {models[f'{sha12}+bf16']['dim']}-d, bf16) 3 embedded" in line
    mc3 = f"{sha12}+fp16+mc3"
    code, out, err = cli(capsys, "--store", str(store_path), "gc", "--dry-run", "--model", mc3)
    assert code == 0 and f"{sha12}+fp16+mc3" in out, err  # gc takes the names status shows


def test_file_rewritten_between_hashing_and_decoding_is_not_stored_under_the_old_hash(
    tmp_path: Path,
    store_path: Path,
    tiny_checkpoint: Path,
    make_images: MakeImages,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import alselect.pipeline as pipeline

    pool = tmp_path / "pool"
    files = make_images(pool, 3)
    real_sync = pipeline.sync_folder

    def sync_then_edit(*args: object, **kwargs: object) -> object:
        synced = real_sync(*args, **kwargs)  # type: ignore[arg-type]
        write_image(files[0], seed=999)  # edited after hashing, before decoding
        os.utime(files[0], ns=(7, 7))
        return synced

    monkeypatch.setattr(pipeline, "sync_folder", sync_then_edit)
    first = score(store_path, pool, tiny_checkpoint)
    assert dict(first.embed.failures) == {files[0].name: "changed while reading"}
    assert first.embed.embedded == 2
    monkeypatch.setattr(pipeline, "sync_folder", real_sync)
    second = score(store_path, pool, tiny_checkpoint)  # the new content is picked up, not 'failed'
    assert (second.embed.sync.changed, second.embed.embedded, second.pool_size) == (1, 1, 3)
