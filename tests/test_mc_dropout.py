"""MC dropout: the same T masks for every image, batch norm in eval mode, head-only passes."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from alselect.checkpoints import load_checkpoint
from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
from alselect.embed import EmbedOptions
from alselect.errors import UsageError
from alselect.images import load_image
from alselect.mc_dropout import MASK_SEED, head_mc_probs
from alselect.pipeline import McDropout, ModelSpec, ScoreModels
from alselect.preprocess import Preprocess
from alselect.store import Store
from alselect.strategies import PoolInputs, Selection, Strategy, top_k
from tests.helpers import MakeImages, score

PRE = Preprocess(image_size=16, resize_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)


class NeedsMc(Strategy):
    name = "needs-mc"
    summary = "test"
    needs: ClassVar[frozenset[str]] = frozenset({"probs", "mc_probs"})

    def __init__(self) -> None:
        self.seen: list[PoolInputs] = []

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        self.seen.append(inputs)
        return top_k(np.zeros(inputs.size), inputs.excluded, budget)


def mc_run(store_path: Path, folder: Path, spec: ModelSpec, mc: McDropout, batch_size: int = 4) -> np.ndarray:
    from alselect.pipeline import score_folder

    strategy = NeedsMc()
    with Store.open(store_path, write=True, create=True) as store:
        score_folder(
            store,
            folder,
            ScoreModels(task=[spec], mc=mc),
            strategy,
            # the references below are fp32 computations (auto picks bf16 on CPUs that have it)
            options=EmbedOptions(device="cpu", batch_size=batch_size, workers=0, precision="fp32"),
        )
    (seen,) = strategy.seen
    assert seen.mc_probs is not None
    return seen.mc_probs


def small_cnn_with_dropout(tmp_path: Path) -> tuple[Path, nn.Module]:
    """SmallCNN (dropout 0.2 before its classifier) with batch-norm statistics that matter."""
    from alselect.models.small_cnn import SmallCNN

    torch.manual_seed(3)
    model = SmallCNN(num_classes=3)
    with torch.no_grad():  # make batch-norm statistics matter, so train mode would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "drop.pt"
    save_alselect_checkpoint(path, model, arch="small_cnn", num_classes=3, preprocess=PRE)
    return path, model


def test_full_passes_use_the_same_masks_for_every_image_and_keep_batch_norm_in_eval(
    tmp_path: Path, make_images: MakeImages
) -> None:
    files = make_images(tmp_path / "pool", 5)
    path, _ = small_cnn_with_dropout(tmp_path)
    mc = McDropout(samples=6, mode="full")
    got = mc_run(tmp_path / "s1", tmp_path / "pool", ModelSpec(path), mc, batch_size=2)
    assert got.shape == (5, 6, 3)
    # the same images in batches of one give the same samples: masks and batch norm do not depend on
    # the batch (train-mode batch norm, or per-sample masks, would change them)
    alone = mc_run(tmp_path / "s2", tmp_path / "pool", ModelSpec(path), mc, batch_size=1)
    np.testing.assert_allclose(alone, got, atol=2e-3)
    # reference: the embedding times pass t's fixed mask, then the classifier
    loaded = load_checkpoint(path)
    pixels = torch.from_numpy(np.stack([load_image(f, PRE) for f in files])).float()
    x = (pixels - 127.5) / 63.75
    module = loaded.module
    assert isinstance(module, nn.Module) and not module.training
    rate = module.dropout.p
    assert rate == 0.2
    with torch.no_grad():
        features = module.embed(module.pool(module.features(x)))
        for t in range(6):
            keep = torch.rand((128,), generator=torch.Generator().manual_seed(MASK_SEED + t)) >= rate
            expected = torch.softmax(module.fc(features * keep.float() / (1 - rate)), dim=1)
            np.testing.assert_allclose(got[:, t], expected.numpy(), atol=2e-3)
    assert not np.allclose(got[:, 0], got[:, 1])  # the passes do differ


def test_full_passes_are_cached_across_runs(
    tmp_path: Path, store_path: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 3)
    path, _ = small_cnn_with_dropout(tmp_path)
    spec = ScoreModels(task=[ModelSpec(path)], mc=McDropout(samples=4))
    first = score(store_path, tmp_path / "pool", path, strategy=NeedsMc(), spec=spec)
    assert [e.embedded for e in first.embeds] == [3, 3]
    make_images(tmp_path / "pool", 1, start=10)
    second = score(store_path, tmp_path / "pool", path, strategy=NeedsMc(), spec=spec)
    assert [e.embedded for e in second.embeds] == [1, 1]
    with Store.open(store_path) as store:
        roles = [m["role"] for m in store.latest_run()["models"]]
    assert roles == ["task", "mc-dropout-full"]


def test_head_mode_equals_dropout_on_the_stored_embedding(tmp_path: Path, make_images: MakeImages) -> None:
    make_images(tmp_path / "pool", 4)
    path, module = small_cnn_with_dropout(tmp_path)
    got = mc_run(
        tmp_path / "s", tmp_path / "pool", ModelSpec(path), McDropout(samples=5, mode="head", rate=0.3)
    )
    with Store.open(tmp_path / "s") as store:
        key = store.rows("SELECT key FROM models")[0][0]
        pool = store.pool(str((tmp_path / "pool").resolve()), key)
    masks = (np.random.default_rng(MASK_SEED).random((5, 128)) >= 0.3) / 0.7
    weight, bias = module.fc.weight.detach().numpy(), module.fc.bias.detach().numpy()
    for t in range(5):
        logits = (pool.embeddings * masks[t]) @ weight.T + bias
        expected = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(got[:, t], expected / expected.sum(1, keepdims=True), atol=1e-5)
    zero = head_mc_probs(pool.embeddings, weight, bias, samples=3, rate=0.0)
    np.testing.assert_allclose(zero, np.repeat(pool.probs[:, None], 3, axis=1), atol=1e-5)


def test_models_without_dropout_get_head_dropout(tmp_path: Path, make_images: MakeImages) -> None:
    import torchvision

    make_images(tmp_path / "pool", 3)
    model = torchvision.models.resnet18(num_classes=3)
    path = tmp_path / "r18.pt"
    save_alselect_checkpoint(path, model, arch="resnet18", num_classes=3, preprocess=PRE)
    got = mc_run(tmp_path / "s", tmp_path / "pool", ModelSpec(path), McDropout(samples=3))
    assert got.shape == (3, 3, 3) and np.allclose(got.sum(-1), 1, atol=1e-5)
    with Store.open(tmp_path / "s") as store:
        assert store.latest_run()["models"][-1]["role"] == "mc-dropout-head"
    with pytest.raises(UsageError, match="needs a model with dropout layers"):
        mc_run(tmp_path / "s", tmp_path / "pool", ModelSpec(path), McDropout(samples=3, mode="full"))


class LogitsOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class WithFeatures(LogitsOnly):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        features = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.fc(features), features


def test_torchscript_head_is_found_only_when_the_embedding_feeds_it(
    tmp_path: Path, make_images: MakeImages
) -> None:
    make_images(tmp_path / "pool", 3)
    meta = {"alselect.json": '{"image_size": 16, "mean": [0.5], "std": [0.25]}'}
    paths = {}
    for cls in (WithFeatures, LogitsOnly):
        torch.manual_seed(0)
        paths[cls.__name__] = tmp_path / f"{cls.__name__}.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.script(cls()), str(paths[cls.__name__]), _extra_files=meta)
    got = mc_run(tmp_path / "a", tmp_path / "pool", ModelSpec(paths["WithFeatures"]), McDropout(samples=4))
    assert got.shape == (3, 4, 3)
    with pytest.raises(UsageError, match="final linear layer"):
        mc_run(tmp_path / "b", tmp_path / "pool", ModelSpec(paths["LogitsOnly"]), McDropout(samples=4))


def test_mc_options_are_checked() -> None:
    for bad in ({"samples": 0}, {"mode": "half"}, {"rate": 1.0}):
        with pytest.raises(UsageError):
            McDropout(**bad)  # type: ignore[arg-type]
