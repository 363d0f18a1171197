"""Discriminative active learning: the discriminator trains, and the picks follow from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alselect.errors import DataError
from alselect.strategies import PoolInputs, make_strategy
from alselect.strategies.dal import _Adam, _split, init_discriminator, train_discriminator

FAST = {"max_epochs": 20, "sub_queries": 3}


def three_blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, 16)) * 5
    blob = np.arange(n) % 3
    return (centres[blob] + rng.standard_normal((n, 16))).astype(np.float32), blob


def test_discriminator_really_trains() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((100, 8)) + 3, rng.standard_normal((300, 8)) - 3]).astype(
        np.float32
    )
    features = torch.from_numpy(x)
    targets = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(300, dtype=torch.long)])
    generator = torch.Generator().manual_seed(0)
    model = init_discriminator(8, generator, features.mean(dim=0), features.std(dim=0))
    before = [w.detach().clone() for w, _ in model.layers]
    with torch.no_grad():
        initial = (model.logits(features).argmax(dim=1) == targets).float().mean().item()
    history = train_discriminator(model, features, targets, generator=generator, max_epochs=50, batch_size=32)
    with torch.no_grad():
        final = (model.logits(features).argmax(dim=1) == targets).float().mean().item()
    assert history[-1] > 0.98 and len(history) < 50  # stopped early on reaching the target
    assert final > initial and final > 0.98
    assert all(not torch.equal(b, w) for b, (w, _) in zip(before, model.layers, strict=True))


def test_training_accuracy_rises_on_a_hard_task() -> None:
    # overlapping classes: the accuracy cannot reach 98 % quickly, but it must rise
    rng = np.random.default_rng(1)
    x = rng.standard_normal((600, 6)).astype(np.float32)
    y = (x[:, 0] + 0.8 * rng.standard_normal(600) > 0.8).astype(np.int64)
    features, targets = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(1)
    model = init_discriminator(6, generator, features.mean(dim=0), features.std(dim=0))
    history = train_discriminator(model, features, targets, generator=generator, max_epochs=8, batch_size=32)
    assert len(history) == 8
    assert history[-1] > history[0] + 0.1


def test_adam_matches_torch_optim() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(20, 4, generator=generator)
    mine = [torch.randn(4, 3, generator=generator).requires_grad_()]
    theirs = [mine[0].detach().clone().requires_grad_()]
    ours = _Adam(mine, 0.01)
    reference = torch.optim.Adam(theirs, lr=0.01)
    for _ in range(5):
        for params in (mine, theirs):
            params[0].grad = None
            ((x @ params[0]) ** 2).sum().backward()
        ours.step()
        reference.step()
    torch.testing.assert_close(mine[0], theirs[0], rtol=1e-6, atol=1e-7)


def test_split_sizes() -> None:
    assert _split(10, 3) == [4, 3, 3]
    assert _split(2, 10) == [1, 1]
    assert _split(7, 1) == [7]


def test_picks_come_from_the_cluster_nobody_labeled() -> None:
    x, blob = three_blobs(600, seed=2)
    labeled = (blob < 2) & (np.arange(600) % 5 == 0)  # blobs 0 and 1 partly labeled, blob 2 never
    inputs = PoolInputs(probs=np.zeros((600, 2)), labeled=labeled, embeddings=x)
    selection = make_strategy("dal", seed=0, **FAST).select(30, inputs)
    assert (blob[selection.indices] == 2).all()
    assert not labeled[selection.indices].any()
    assert np.all(np.diff(selection.scores) <= 0) and (selection.scores > 0.5).all()


def test_pending_images_sit_on_the_labeled_side() -> None:
    x, blob = three_blobs(600, seed=3)
    labeled = (blob == 0) & (np.arange(600) % 5 == 0)
    pending = (blob == 1) & (np.arange(600) % 5 == 0)  # blob 1 is in flight; blob 2 is untouched
    inputs = PoolInputs(probs=np.zeros((600, 2)), labeled=labeled, embeddings=x, pending=pending)
    selection = make_strategy("dal", seed=0, **FAST).select(30, inputs)
    assert (blob[selection.indices] == 2).all()
    assert not (labeled | pending)[selection.indices].any()


def test_no_labeled_image_is_an_actionable_error() -> None:
    x, _ = three_blobs(60, seed=4)
    inputs = PoolInputs(probs=np.zeros((60, 2)), labeled=np.zeros(60, dtype=bool), embeddings=x)
    with pytest.raises(DataError, match=r"at least one labeled image.*alselect label"):
        make_strategy("dal").select(5, inputs)


def test_later_sub_queries_move_away_from_earlier_picks() -> None:
    # two unlabeled blobs: with one sub-query per pick, the picks cannot all come from one blob
    x, blob = three_blobs(300, seed=5)
    labeled = (blob == 0) & (np.arange(300) % 3 == 0)
    inputs = PoolInputs(probs=np.zeros((300, 2)), labeled=labeled, embeddings=x)
    selection = make_strategy("dal", seed=0, max_epochs=20, sub_queries=6).select(6, inputs)
    assert set(blob[selection.indices].tolist()) == {1, 2}
