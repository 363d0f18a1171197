"""Discriminative active learning (Gissin & Shalev-Shwartz 2019).

A small MLP learns to tell labeled from unlabeled images by their embeddings; the images it is most
sure are unlabeled are the ones least like anything labeled. The batch is built in sub-queries:
after each, the picked images move to the labeled side and the discriminator is trained again from
scratch, so later picks move away from earlier ones.

Pending images (exported, not labeled yet) sit on the labeled side: they will be labeled, and the
point is to find images unlike what the annotators will have. Labeled images from outside the
scored folder count too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from alselect.errors import DataError, UsageError
from alselect.strategies.base import (
    PoolInputs,
    Selection,
    Strategy,
    register,
    require_budget,
    require_embeddings,
)
from alselect.strategies.greedy import check_finite, resolve_torch_device, single_threaded_torch

if TYPE_CHECKING:
    import torch

HIDDEN = 256  # three hidden layers of this width, as in the paper
TARGET_ACCURACY = 0.98  # training stops once the epoch's class-balanced accuracy exceeds this
PREDICT_ROWS = 8192


@dataclass
class Discriminator:
    """MLP weights ``[(W, b), ...]``: D → 256 → 256 → 256 → 2, ReLU; inputs standardised first."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mean: torch.Tensor
    std: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        out = (x - self.mean) / self.std
        for index, (weight, bias) in enumerate(self.layers):
            out = torch.nn.functional.linear(out, weight, bias)
            if index < len(self.layers) - 1:
                out = torch.relu(out)
        return out


def init_discriminator(
    dims: int, generator: torch.Generator, mean: torch.Tensor, std: torch.Tensor
) -> Discriminator:
    """Fresh weights drawn from ``generator`` only (torch.nn.Linear's default init, without global RNG)."""
    import torch

    layers = []
    for fan_in, fan_out in ((dims, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 2)):
        weight = torch.empty(fan_out, fan_in)
        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(fan_in)
        bias = torch.empty(fan_out).uniform_(-bound, bound, generator=generator)
        layers.append((weight.to(mean.device).requires_grad_(), bias.to(mean.device).requires_grad_()))
    return Discriminator(layers, mean, std)


def train_discriminator(
    model: Discriminator,
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    generator: torch.Generator,
    lr: float = 3e-4,
    max_epochs: int = 100,
    batch_size: int = 64,
) -> list[float]:
    """Train ``model`` in place on ``features [n, D]`` / ``targets [n]`` (0 labeled, 1 unlabeled).

    Adam, cross-entropy weighted so both classes count equally; mini-batches shuffled with
    ``generator``. Returns each epoch's class-balanced training accuracy (mean of the two classes'
    accuracies, measured on the predictions made while training); stops after the first epoch
    above ``TARGET_ACCURACY`` or after ``max_epochs``. Runs torch single-threaded: the matrices are
    tiny, and thread barriers on a busy machine cost more than the arithmetic.
    """
    with single_threaded_torch():
        return _train(model, features, targets, generator, lr, max_epochs, batch_size)


def _train(
    model: Discriminator,
    features: torch.Tensor,
    targets: torch.Tensor,
    generator: torch.Generator,
    lr: float,
    max_epochs: int,
    batch_size: int,
) -> list[float]:
    import torch

    n = int(targets.shape[0])
    counts = torch.bincount(targets, minlength=2).to(torch.float32)
    class_weight = torch.where(counts > 0, n / (2.0 * counts.clamp(min=1)), torch.zeros_like(counts))
    params = [p for layer in model.layers for p in layer]
    optimizer = _Adam(params, lr)
    history: list[float] = []
    present = counts > 0
    for _ in range(max_epochs):
        correct = torch.zeros(2, device=features.device)
        order = torch.randperm(n, generator=generator).to(features.device)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            logits = model.logits(features[batch])
            loss = torch.nn.functional.cross_entropy(
                logits, targets[batch], weight=class_weight.to(logits.device)
            )
            for param in params:
                param.grad = None
            loss.backward()
            optimizer.step()
            hits = (logits.detach().argmax(dim=1) == targets[batch]).to(torch.float32)
            correct.index_add_(0, targets[batch], hits)
        accuracy = float((correct.cpu() / counts.clamp(min=1))[present].mean())
        history.append(accuracy)
        if accuracy > TARGET_ACCURACY:
            break
    return history


class _Adam:
    """Adam (Kingma & Ba 2015; β = 0.9, 0.999, ε = 1e-8), as torch.optim.Adam computes it.

    Written out because importing ``torch.optim`` pulls in ``torch.distributed`` (seconds on a busy
    2-core machine) for a dozen lines of arithmetic.
    """

    def __init__(
        self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999)
    ) -> None:
        import torch

        self.params = params
        self.lr = lr
        self.betas = betas
        self.first = [torch.zeros_like(p) for p in params]
        self.second = [torch.zeros_like(p) for p in params]
        self.steps = 0

    def step(self) -> None:
        import torch

        beta1, beta2 = self.betas
        self.steps += 1
        correction1 = 1.0 - beta1**self.steps
        correction2 = 1.0 - beta2**self.steps
        with torch.no_grad():
            for param, first, second in zip(self.params, self.first, self.second, strict=True):
                if param.grad is None:
                    continue
                grad = param.grad
                first.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                second.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = (second / correction2).sqrt_().add_(1e-8)
                param.addcdiv_(first, denom, value=-self.lr / correction1)


def _split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` sizes differing by at most one, larger first; no empty part."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _moments(embeddings: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (float64, chunked) of ``embeddings[rows]``; std floored at 1e-6."""
    total = np.zeros(embeddings.shape[1])
    square = np.zeros(embeddings.shape[1])
    for start in range(0, rows.size, 65536):
        block = np.asarray(embeddings[rows[start : start + 65536]], dtype=np.float64)
        total += block.sum(axis=0)
        square += (block * block).sum(axis=0)
    mean = total / max(rows.size, 1)
    std = np.sqrt(np.maximum(square / max(rows.size, 1) - mean * mean, 0.0))
    return mean, np.maximum(std, 1e-6)


@register
class DiscriminativeAL(Strategy):
    """Labeled-vs-unlabeled discriminator on ``embeddings [N, D]``; needs a labeled (or pending) image.

    Per sub-query (``sub_queries`` of them, sizes within one of each other): the labeled side is the
    labeled and pending images plus earlier picks; the unlabeled side is the remaining candidates,
    a seeded sample of ``unlabeled_ratio ×`` the labeled side when larger. A new MLP (3 × 256 ReLU,
    2 outputs, inputs standardised with the pool's mean and std) is trained with Adam (``lr``,
    ``batch_size``) until its class-balanced training accuracy exceeds 98 % or ``max_epochs``; the
    candidates with the highest P(unlabeled) are picked (ranked by the logit margin, which does not
    round to 1.0; ties in row order). Cost: about ``sub_queries × max_epochs × 11|L| / batch_size``
    optimiser steps when the 98 % is not reached (usual: the labeled side is small and the classes
    overlap), plus one forward pass over the candidates per sub-query. All randomness comes from
    ``seed`` (a ``torch.Generator`` and a numpy Generator); the global RNGs are untouched.
    """

    name = "dal"
    summary = "discriminative AL: an MLP tells labeled from unlabeled; pick the most 'unlabeled' images"
    needs = frozenset({"embeddings"})
    score_meaning = (
        "P(unlabeled) from the sub-query's discriminator when the image was picked, in [0, 1]; "
        "capped by the previous score (running minimum) so it never increases along the pick order"
    )
    batch_aware = True

    def __init__(
        self,
        *,
        seed: int = 0,
        sub_queries: int = 10,
        max_epochs: int = 50,
        lr: float = 3e-4,
        batch_size: int = 128,
        unlabeled_ratio: float = 10.0,
        device: str = "auto",
    ) -> None:
        self.seed = seed
        self.sub_queries = sub_queries
        self.max_epochs = max_epochs
        self.lr = lr
        self.batch_size = batch_size
        self.unlabeled_ratio = unlabeled_ratio
        self.device = device

    def _validate(self) -> None:
        for key in ("sub_queries", "max_epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise UsageError(f"strategy 'dal': {key} must be at least 1, got {getattr(self, key)}")
        if not self.lr > 0 or not self.unlabeled_ratio > 0:
            raise UsageError("strategy 'dal': lr and unlabeled_ratio must be positive")

    def select(self, budget: int | None, inputs: PoolInputs) -> Selection:
        count = require_budget(self.name, budget)
        self._validate()
        embeddings = require_embeddings(self.name, inputs)
        known = inputs.excluded  # labeled, and pending (soon labeled)
        if not known.any():
            raise DataError(
                "strategy 'dal' needs at least one labeled image: its discriminator learns labeled vs "
                "unlabeled. Mark annotated images with 'alselect label FILE', or start with a strategy "
                "that needs no labels (coreset, kmeans, random)"
            )
        candidates = np.flatnonzero(~known)
        count = min(count, candidates.size)
        if count == 0:
            return Selection(indices=np.zeros(0, dtype=np.int64), scores=np.zeros(0))
        import torch

        device = resolve_torch_device(self.device)
        mean, std = _moments(embeddings, np.arange(inputs.size))
        mean_t = torch.from_numpy(mean.astype(np.float32)).to(device)
        std_t = torch.from_numpy(std.astype(np.float32)).to(device)
        generator = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        side = known.copy()
        picks: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        for size in _split(count, self.sub_queries):
            labeled_rows = np.flatnonzero(side)
            remaining = np.flatnonzero(~side)
            train_unlabeled = remaining
            cap = max(1, int(self.unlabeled_ratio * labeled_rows.size))
            if remaining.size > cap:
                train_unlabeled = np.sort(rng.choice(remaining, cap, replace=False))
            rows = np.concatenate([labeled_rows, train_unlabeled])
            features = torch.from_numpy(np.asarray(embeddings[rows], dtype=np.float32)).to(device)
            check_finite(features.sum(dim=1).cpu().numpy())
            targets = torch.cat(
                [
                    torch.zeros(labeled_rows.size, dtype=torch.long),
                    torch.ones(train_unlabeled.size, dtype=torch.long),
                ]
            ).to(device)
            model = init_discriminator(embeddings.shape[1], generator, mean_t, std_t)
            train_discriminator(
                model,
                features,
                targets,
                generator=generator,
                lr=self.lr,
                max_epochs=self.max_epochs,
                batch_size=self.batch_size,
            )
            margin = _predict(model, embeddings, remaining, device)
            order = np.argsort(-margin, kind="stable")[:size]
            picks.append(remaining[order])
            scores.append(1.0 / (1.0 + np.exp(-margin[order].astype(np.float64))))
            side[remaining[order]] = True
        all_scores = np.concatenate(scores).astype(np.float64)
        return Selection(indices=np.concatenate(picks), scores=np.minimum.accumulate(all_scores))


def _predict(
    model: Discriminator, embeddings: np.ndarray, rows: np.ndarray, device: torch.device
) -> np.ndarray:
    """Logit margin ``z_unlabeled − z_labeled`` ``[len(rows)]`` float32, in chunks.

    Ranking by the margin rather than by P(unlabeled) = sigmoid(margin) keeps the order where the
    probability rounds to exactly 1.0 for many images (a confident discriminator).
    """
    import torch

    out = np.empty(rows.size, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, rows.size, PREDICT_ROWS):
            block = torch.from_numpy(
                np.asarray(embeddings[rows[start : start + PREDICT_ROWS]], dtype=np.float32)
            )
            logits = model.logits(block.to(device))
            out[start : start + block.shape[0]] = (logits[:, 1] - logits[:, 0]).cpu().numpy()
    return out
