"""Training: the loss goes down, checkpoints carry what ``score`` needs, learning loss end to end."""

from __future__ import annotations

import csv
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alselect.checkpoints import load_checkpoint
from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
from alselect.datasets import csv_labels, image_folder, read_idx, store_labels
from alselect.errors import CheckpointError, DataError, UsageError
from alselect.models import build_model
from alselect.models.loss_prediction import (
    LossPredictionModule,
    find_stages,
    head_entry,
    pair_ranking_loss,
)
from alselect.models.small_cnn import SmallCNN
from alselect.preprocess import Preprocess
from alselect.store import Store
from alselect.strategies import PoolInputs, build_strategy
from alselect.train import (
    ArraySource,
    TrainConfig,
    augment,
    fit,
    load_matching,
    new_model,
    stratified_split,
)
from tests.helpers import cli, export_rows

PRE16 = Preprocess(image_size=16, resize_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)


def separable_arrays(n: int = 48, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes that differ in brightness: uint8 ``[n, 3, size, size]`` and labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    base = np.where(labels == 0, 50.0, 200.0)[:, None, None, None]
    images = np.clip(base + rng.normal(0, 20, (n, 3, size, size)), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def write_class_folder(root: Path, per_class: int = 12, size: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, level in (("bright", 205), ("dark", 45)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(level + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:02d}.png")
    return root


# -- loss prediction ---------------------------------------------------------------------------


def test_pair_loss_equals_hand_computed_value() -> None:
    # pairs (0, 2) and (1, 3); the fifth sample has no partner and is left out.
    predicted = torch.tensor([3.0, 1.0, 0.5, 2.0, 9.0], requires_grad=True)
    target = torch.tensor([1.0, 2.0, 0.5, 0.5, 7.0], requires_grad=True)
    # (0, 2): l0 > l2, sign +1, l̂0 − l̂2 = 2.5 → max(0, −2.5 + 1) = 0
    # (1, 3): l1 > l3, sign +1, l̂1 − l̂3 = −1  → max(0,  1 + 1) = 2      mean = 1
    loss = pair_ranking_loss(predicted, target, margin=1.0)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert target.grad is None  # the true losses are targets, not trained
    assert predicted.grad is not None
    assert predicted.grad.tolist() == pytest.approx([0.0, -0.5, 0.0, 0.5, 0.0])
    # equal true losses: the margin, whatever the predictions; a lone sample: 0
    assert pair_ranking_loss(
        torch.tensor([5.0, -3.0]), torch.tensor([2.0, 2.0]), 0.7
    ).item() == pytest.approx(0.7)
    assert pair_ranking_loss(torch.tensor([5.0]), torch.tensor([2.0])).item() == 0.0
    # reversed order of the true losses: the margin plus the wrong gap
    assert pair_ranking_loss(torch.tensor([0.0, 2.0]), torch.tensor([3.0, 1.0]), 1.0).item() == pytest.approx(
        3.0
    )


def test_loss_prediction_module_shapes_follow_the_paper() -> None:
    head = LossPredictionModule([4, 6])
    assert [fc.out_features for fc in head.stages] == [128, 128]
    assert head.out.in_features == 256 and head.out.out_features == 1
    out = head([torch.randn(5, 4, 8, 8), torch.randn(5, 6, 4, 4)])
    assert out.shape == (5,)


@pytest.mark.parametrize(
    ("arch", "stages", "channels"),
    [
        ("resnet18", ["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512]),
        ("resnet18_cifar", ["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512]),
        ("small_cnn", ["features.0", "features.1", "features.2"], [32, 64, 128]),
        ("mobilenet_v3_small", ["features.1", "features.3", "features.8", "features.12"], [16, 24, 48, 576]),
    ],
)
def test_stages_are_found_per_family(arch: str, stages: list[str], channels: list[int]) -> None:
    assert find_stages(build_model(arch, 3), 64) == (stages, channels)


def test_cifar_resnet_keeps_resolution_in_the_stem() -> None:
    model = build_model("resnet18_cifar", 10).eval()
    seen: dict[str, tuple[int, ...]] = {}

    def hook(_m: object, _i: object, out: torch.Tensor) -> None:
        seen["layer4"] = tuple(out.shape)

    model.layer4.register_forward_hook(hook)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert seen["layer4"] == (1, 512, 4, 4)


def planted_head_checkpoint(path: Path) -> None:
    """SmallCNN whose first conv block is a brightness filter and whose loss head predicts the mean
    activation of that block: by construction the brightest image has the largest predicted loss."""
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3)
    head = LossPredictionModule([32, 64, 128], hidden=2)
    with torch.no_grad():
        model.features[0][0].weight.fill_(1.0 / 27)  # 3×3×3 mean filter; batch norm is identity in eval
        for fc in head.stages:
            fc.weight.zero_()
            fc.bias.zero_()
        head.stages[0].weight[0].fill_(1.0 / 32)  # unit 0 of stage 1 = mean over its channels (≥ 0)
        head.out.weight.zero_()
        head.out.weight[0, 0] = 1.0
        head.out.bias.zero_()
    save_alselect_checkpoint(
        path,
        model,
        "small_cnn",
        3,
        ["a", "b", "c"],
        PRE16,
        heads={"loss_prediction": head_entry(["features.0", "features.1", "features.2"], head)},
    )


def test_learning_loss_ranks_the_planted_high_loss_image_first(tmp_path: Path) -> None:
    ckpt = tmp_path / "ll.pt"
    planted_head_checkpoint(ckpt)
    model = load_checkpoint(ckpt)
    assert model.output_names() == {"probs", "embedding", "loss_pred"}
    folder = tmp_path / "pool"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray((rng.random((16, 16, 3)) * 100).astype(np.uint8)).save(folder / f"img_{i}.png")
    Image.fromarray((155 + rng.random((16, 16, 3)) * 100).astype(np.uint8)).save(folder / "planted.png")

    # what the head computes, by hand from the first block, for each decoded image
    from alselect.images import load_image

    names = sorted(p.name for p in folder.iterdir())
    pixels = torch.from_numpy(np.stack([load_image(folder / n, PRE16) for n in names])).float() / 255
    x = (pixels - 0.5) / 0.25
    with torch.no_grad():
        expected = torch.relu(model.module.features[0](x).mean(dim=(2, 3)).mean(dim=1))
    outputs = model.forward_outputs(x)
    assert outputs["loss_pred"].shape == (9,)
    assert torch.allclose(outputs["loss_pred"], expected, atol=1e-5)

    from tests.helpers import score

    store = tmp_path / "store"
    score(store, folder, ckpt, strategy="learning-loss")
    with Store.open(store) as opened:
        pool = opened.pool_rows(str(folder.resolve()), [model.sha256])
        stored = opened.pool_array(pool, model.sha256, "loss_pred")
    assert stored.dtype == np.float32 and stored.shape == (9,)
    assert pool.relpaths == names
    assert np.allclose(stored, expected.numpy(), atol=1e-5)
    rows = export_rows(store)
    assert rows[0]["path"] == "planted.png"
    assert [r["path"] for r in rows] == [names[i] for i in np.argsort(-expected.numpy(), kind="stable")]


def test_learning_loss_strategy_constructed_case() -> None:
    probs = np.full((6, 2), 0.5, dtype=np.float32)
    loss = np.array([0.1, 0.3, 5.0, 0.2, 9.0, 0.4], dtype=np.float32)
    labeled = np.array([False, False, False, False, True, False])
    inputs = PoolInputs(probs=probs, labeled=labeled, arrays={"loss_pred": loss})
    chosen = build_strategy("learning-loss").select(3, inputs)
    assert chosen.indices.tolist() == [2, 5, 1]  # row 4 is labeled: never chosen
    # a random subset of 3 candidates (seeded): only those are ranked, by predicted loss
    subset = build_strategy("learning-loss", seed=7, params={"subset": "3"}).select(None, inputs)
    drawn = np.random.default_rng(7).choice(np.flatnonzero(~labeled), size=3, replace=False)
    assert sorted(subset.indices.tolist()) == sorted(drawn.tolist())
    assert subset.scores.tolist() == sorted(loss[drawn].astype(np.float64).tolist(), reverse=True)


def test_checkpoint_without_the_module_is_refused(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "pool"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "a.png")
    code, _, err = cli(
        capsys, "--store", str(tmp_path / "s"), "score", str(folder), "--model", str(tiny_checkpoint),
        "--strategy", "learning-loss", "--workers", "0",
    )  # fmt: skip
    assert code == 2
    assert "needs loss_pred" in err and "alselect train --loss-prediction" in err
    assert not (tmp_path / "s" / "alselect.db").exists() or "run" not in err


# -- training ----------------------------------------------------------------------------------


def test_training_reduces_the_loss_on_a_tiny_separable_set() -> None:
    images, labels = separable_arrays()
    config = TrainConfig(arch="small_cnn", epochs=6, lr=0.01, batch_size=8, device="cpu", val_fraction=0.0)
    module = new_model("small_cnn", 2, seed=0)
    result = fit(
        module, ArraySource(images), labels, np.arange(len(labels)), np.zeros(0, np.int64), PRE16, config
    )
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 6
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["train_accuracy"] == 1.0


def test_training_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    images, labels = separable_arrays(16)
    config = TrainConfig(
        arch="small_cnn", epochs=2, batch_size=4, device="cpu", val_fraction=0.0, loss_prediction=True
    )
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    runs = []
    for _ in range(2):
        module = new_model("small_cnn", 2, seed=3)
        fit(module, ArraySource(images), labels, np.arange(16), np.zeros(0, np.int64), PRE16, config)
        runs.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(torch.rand(1), before)


def test_stop_gradient_keeps_the_backbone_out_of_the_pair_loss() -> None:
    images, labels = separable_arrays(8)
    grads = {}
    for stop in (0.0, 1.0):
        config = TrainConfig(
            arch="small_cnn", epochs=1, batch_size=8, lr=1e-9, device="cpu", val_fraction=0.0,
            loss_prediction=True, lp_weight=1e6, lp_stop_fraction=stop, augment=False,
        )  # fmt: skip
        module = new_model("small_cnn", 2, seed=0)
        result = fit(module, ArraySource(images), labels, np.arange(8), np.zeros(0, np.int64), PRE16, config)
        grads[stop] = module.features[0][0].weight.grad.clone()  # type: ignore[union-attr]
        assert result.head is not None
    # stop at 0 % of the epochs: the huge pair-loss weight does not reach the first conv layer
    assert grads[0.0].abs().max() < 1.0 < grads[1.0].abs().max()


def test_augment_is_a_shifted_crop_possibly_flipped() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        windows = [
            w
            for dy in range(3)
            for dx in range(3)
            for w in (padded[i, :, dy : dy + 8, dx : dx + 8], padded[i, :, dy : dy + 8, dx : dx + 8].flip(2))
        ]
        assert any(torch.equal(out[i], w) for w in windows)


def test_stratified_split_holds_out_each_class() -> None:
    labels = np.array([0] * 10 + [1] * 4 + [2] * 1)
    train_idx, val_idx = stratified_split(labels, 0.25, seed=0)
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(15))
    assert [int((labels[val_idx] == c).sum()) for c in range(3)] == [2, 1, 0]
    assert stratified_split(labels, 0.25, seed=0)[1].tolist() == val_idx.tolist()


def test_train_cli_checkpoint_scores_and_reproduces_its_validation_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_class_folder(tmp_path / "data", per_class=10)
    ckpt = tmp_path / "model.pt"
    code, out, err = cli(
        capsys, "train", str(folder), "--arch", "small_cnn", "--image-size", "16", "--epochs", "3",
        "--batch-size", "8", "--val-fraction", "0.3", "--workers", "0", "--device", "cpu", "-o", str(ckpt),
    )  # fmt: skip
    assert code == 0, err
    assert out == ""
    assert "epoch 3/3" in err and "val accuracy" in err
    payload = torch.load(ckpt, weights_only=True)  # plain types only: no --trust-checkpoint needed
    training = payload["training"]
    assert [h["epoch"] for h in training["history"]] == [1, 2, 3]
    validation = training["validation"]
    assert validation["count"] == 6 and len(validation["files"]) == 6
    assert payload["classes"] == ["bright", "dark"]
    assert payload["preprocess"]["image_size"] == 16

    # score the validation images with the checkpoint: the same accuracy
    val_dir = tmp_path / "val"
    for file in validation["files"]:
        src = Path(file)
        (val_dir / src.parent.name).mkdir(parents=True, exist_ok=True)
        (val_dir / src.parent.name / src.name).write_bytes(src.read_bytes())
    store = tmp_path / "store"
    code, _, err = cli(
        capsys, "--store", str(store), "score", str(val_dir), "--model", str(ckpt), "--strategy", "entropy",
        "--workers", "0", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    rows = export_rows(store)
    correct = sum(r["predicted_label"] == r["path"].split("/")[0] for r in rows)
    assert len(rows) == 6
    assert correct / len(rows) == pytest.approx(validation["accuracy"])


def test_train_from_csv_and_from_store_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_class_folder(tmp_path / "data", per_class=4)
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for file in sorted(folder.rglob("*.png")):
            writer.writerow([file.relative_to(folder).as_posix(), file.parent.name])
        writer.writerow(["missing.png", "dark"])
    files = csv_labels(table, root=folder)
    assert files.classes == ["bright", "dark"] and len(files) == 8
    assert files.skipped == [("missing.png", "file not found")]
    assert image_folder(folder).labels.tolist() == files.labels.tolist()

    # store labels: the images registered by a sync, classes recorded by content
    store = tmp_path / "store"
    from alselect.sync import sync_folder

    with Store.open(store, write=True, create=True) as opened:
        sync_folder(opened, folder.resolve())
        with pytest.raises(DataError, match="no class labels"):
            store_labels(opened)
        shas = dict(opened.rows("SELECT relpath, sha256 FROM images"))
        opened.add_labels(shas.values(), "test", {sha: rel.split("/")[0] for rel, sha in shas.items()})
        from_store = store_labels(opened)
    assert from_store.classes == ["bright", "dark"]
    assert sorted(p.name for p in from_store.paths) == sorted(p.name for p in files.paths)
    ckpt = tmp_path / "m.pt"
    code, _, err = cli(
        capsys, "--store", str(store), "train", "--from-store", "--arch", "small_cnn", "--image-size", "16",
        "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "-o", str(ckpt),
    )  # fmt: skip
    assert code == 0, err
    assert load_checkpoint(ckpt).classes == ["bright", "dark"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_class_folder_reports_what_the_walk_skipped(tmp_path: Path) -> None:
    """A FIFO or a link to a device in a class folder is left out and said, not dropped silently;
    so is a folder that cannot be read (where permissions bind: not for root)."""
    folder = write_class_folder(tmp_path / "data", per_class=2)
    os.mkfifo(folder / "bright" / "pipe.png")
    (folder / "dark" / "null.jpg").symlink_to(os.devnull)
    locked = folder / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        files = image_folder(folder)
        readable = os.access(locked, os.R_OK)
    finally:
        locked.chmod(0o700)
    assert sorted(p.relative_to(folder).as_posix() for p in files.paths) == [
        "bright/bright_00.png", "bright/bright_01.png", "dark/dark_00.png", "dark/dark_01.png",
    ]  # fmt: skip
    special = "not a regular file (FIFO, socket, device)"
    expected = [("bright/pipe.png", special), ("dark/null.jpg", special)]
    assert files.skipped == expected + ([] if readable else [("locked/", "unreadable folder")])


def test_train_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "train", "-o", str(tmp_path / "m.pt"))
    assert code == 2 and "--from-store" in err
    code, _, err = cli(capsys, "train", str(tmp_path), "--schedule", "wild", "-o", str(tmp_path / "m.pt"))
    assert code == 2 and "--schedule" in err
    code, _, err = cli(capsys, "train", str(tmp_path), "-o", str(tmp_path / "m.pt"))
    assert code == 1 and "no images in class subfolders" in err


def test_fine_tuning_keeps_the_backbone_and_resets_another_classifier(tmp_path: Path) -> None:
    source = new_model("small_cnn", 5, seed=1)
    module = new_model("small_cnn", 3, seed=2)
    reset = load_matching(module, source.state_dict(), tmp_path / "x.pt")
    assert reset == ["fc.bias", "fc.weight"]
    assert torch.equal(module.features[0][0].weight, source.features[0][0].weight)
    with pytest.raises(CheckpointError, match="check --arch"):
        load_matching(build_model("resnet18", 3), source.state_dict(), tmp_path / "x.pt")


def test_fine_tune_cli_from_a_checkpoint_with_other_classes(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_class_folder(tmp_path / "data", per_class=4, size=16)
    ckpt = tmp_path / "ft.pt"
    code, _, err = cli(
        capsys, "train", str(folder), "--init", str(tiny_checkpoint), "--epochs", "1", "--batch-size", "4",
        "--workers", "0", "--device", "cpu", "-o", str(ckpt),
    )  # fmt: skip
    assert code == 0, err
    assert "start fresh (fc.bias, fc.weight)" in err
    loaded = load_checkpoint(ckpt)
    assert loaded.arch == "small_cnn" and loaded.preprocess == load_checkpoint(tiny_checkpoint).preprocess


# -- IDX ---------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    return (
        bytes([0, 0, 0x08, array.ndim])
        + b"".join(struct.pack(">I", d) for d in array.shape)
        + array.tobytes()
    )


def test_read_idx_plain_and_gzipped(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    (tmp_path / "b.gz").write_bytes(gzip.compress(idx_bytes(array)))
    assert np.array_equal(read_idx(tmp_path / "a"), array)
    assert np.array_equal(read_idx(tmp_path / "b.gz"), array)
    (tmp_path / "c").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "c")
    (tmp_path / "d").write_bytes(idx_bytes(array)[:-1])
    with pytest.raises(DataError, match="header says"):
        read_idx(tmp_path / "d")


def test_a_negative_training_seed_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"^--seed must be an integer from 0 to"):
        TrainConfig(arch="small_cnn", seed=-1).check()
    TrainConfig(arch="small_cnn", seed=0).check()
