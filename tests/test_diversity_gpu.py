"""CUDA backends of the diversity strategies agree with the exact CPU path. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alselect.strategies import PoolInputs, make_strategy
from alselect.strategies.greedy import greedy_centres
from tests.test_diversity import clustered, engine_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("badge", [False, True])
def test_cuda_picks_equal_exact(dtype: type, badge: bool) -> None:
    x, candidates, options = engine_case(4000, 64, 50, badge, seed=1, dtype=dtype)
    exact = greedy_centres(x, candidates, 80, rng=np.random.default_rng(0), precision="exact", **options)
    cuda = greedy_centres(
        x, candidates, 80, rng=np.random.default_rng(0), precision="fast", device="cuda", **options
    )
    assert cuda.picks.tolist() == exact.picks.tolist()
    np.testing.assert_allclose(cuda.dists, exact.dists, rtol=1e-4)


@pytest.mark.parametrize("name", ["coreset", "badge", "kmeans", "diverse-minibatch", "dal"])
def test_strategies_run_on_cuda(name: str) -> None:
    x, _ = clustered(3000, 32, 12, seed=2)
    probs = np.random.default_rng(2).dirichlet(np.ones(3), 3000).astype(np.float32)
    labeled = np.zeros(3000, dtype=bool)
    labeled[::40] = True
    inputs = PoolInputs(probs=probs, labeled=labeled, embeddings=x)
    params = {"max_epochs": 10, "sub_queries": 2} if name == "dal" else {}
    selection = make_strategy(name, seed=0, device="cuda", **params).select(40, inputs)
    assert len(set(selection.indices.tolist())) == 40
    assert not labeled[selection.indices].any()
    assert np.all(np.diff(selection.scores) <= 0)
