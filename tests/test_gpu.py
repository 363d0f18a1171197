"""GPU path: same store contents on CUDA as on CPU. Skipped where CUDA is unavailable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from alselect.checkpoints import load_checkpoint
from alselect.embed import EmbedOptions
from alselect.inference import Accelerated
from alselect.pipeline import ModelSpec, embed_folder
from alselect.store import Store
from tests.conftest import SAMPLE_DATA
from tests.helpers import score
from tests.test_inference import spearman

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


@pytest.mark.parametrize(
    ("precision", "decode", "stored"),
    [("auto", "gpu", "bf16"), ("auto", "cpu", "bf16"), ("fp16", "gpu", "fp16")],
)
def test_cuda_reduced_precision_rankings_agree_with_cpu_fp32(
    tmp_path: Path, precision: str, decode: str, stored: str
) -> None:
    """The acceptance check of the GPU path: sample_data's entropy ranking under autocast on CUDA
    (bf16 by default, fp16 on request; JPEGs decoded by nvJPEG or by the CPU workers) against the
    CPU's fp32 ranking."""
    folder = SAMPLE_DATA / "images"
    runs = {
        "cpu": EmbedOptions(device="cpu", batch_size=64, workers=2, precision="fp32"),
        "cuda": EmbedOptions(device="cuda", batch_size=64, workers=2, precision=precision, decode=decode),
    }
    entropy, pools = {}, {}
    for device, options in runs.items():
        run = score(tmp_path / device, folder, SAMPLE_DATA / "model.pt", options=options)
        with Store.open(tmp_path / device) as store:
            pools[device] = pool = store.pool(str(folder.resolve()), run.embed.model_key)
            record = store.model(run.embed.model_key)
        assert record is not None
        assert record["preprocess"].get("precision") == (None if device == "cpu" else stored)
        entropy[device] = -(pool.probs * np.log(np.clip(pool.probs, 1e-12, None))).sum(1)
    assert pools["cpu"].relpaths == pools["cuda"].relpaths and len(entropy["cpu"]) == 306
    assert spearman(entropy["cpu"], entropy["cuda"]) >= 0.99
    assert (pools["cpu"].probs.argmax(1) == pools["cuda"].probs.argmax(1)).mean() >= 0.97


def test_compiled_model_on_cuda_gives_the_eager_outputs() -> None:
    model = load_checkpoint(SAMPLE_DATA / "model.pt")
    x = torch.randn(32, 3, 28, 28, generator=torch.Generator().manual_seed(0)).cuda()
    eager = Accelerated(model, "bf16", channels_last=True).to(torch.device("cuda")).forward_outputs(x)
    warnings: list[str] = []
    compiled = Accelerated(model, "bf16", channels_last=True, compile=True, warn=warnings.append)
    out = compiled.to(torch.device("cuda")).forward_outputs(x)
    assert warnings == []
    for name in out:
        torch.testing.assert_close(out[name], eager[name], rtol=2e-2, atol=2e-2)
