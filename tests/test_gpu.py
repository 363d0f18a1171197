"""GPU path: same store contents on CUDA as on CPU. Skipped where CUDA is unavailable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from alselect.embed import EmbedOptions
from alselect.pipeline import ModelSpec, embed_folder
from alselect.store import Store

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_embeddings_match_cpu(
    tmp_path: Path, tiny_checkpoint: Path, make_images: Callable[..., list[Path]]
) -> None:
    make_images(tmp_path / "pool", 20)
    pools = []
    for device in ("cpu", "cuda"):
        with Store.open(tmp_path / device, write=True, create=True) as store:
            result = embed_folder(
                store,
                tmp_path / "pool",
                ModelSpec(tiny_checkpoint),
                EmbedOptions(device=device, batch_size=8, workers=2),
            )
            assert result.embedded == 20
            pools.append(store.pool(str((tmp_path / "pool").resolve()), result.model_key))
    cpu, cuda = pools
    assert cpu.relpaths == cuda.relpaths
    np.testing.assert_allclose(cuda.probs, cpu.probs, atol=1e-4)
    np.testing.assert_allclose(cuda.embeddings, cpu.embeddings, rtol=1e-3, atol=1e-3)


def test_batchbald_on_cuda_matches_cpu() -> None:
    from alselect.strategies.batchbald import batchbald

    rng = np.random.default_rng(0)
    mc = rng.dirichlet(np.full(6, 0.5), size=(3000, 16))
    excluded = np.zeros(3000, dtype=bool)
    cpu = batchbald(mc, excluded, 12, num_samples=2000, seed=1, device="cpu")
    cuda = batchbald(mc, excluded, 12, num_samples=2000, seed=1, device="cuda")
    assert cuda.indices.tolist() == cpu.indices.tolist()
    np.testing.assert_allclose(cuda.gains, cpu.gains, rtol=1e-9, atol=1e-12)
