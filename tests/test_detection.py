"""Detection: per-box components, stored arrays, torchvision detectors, TorchScript fakes, pipeline,
export (CSV count, Label Studio rectangles)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
from alselect.errors import CheckpointError, UsageError
from alselect.pipeline import ModelSpec, prepare_model
from alselect.progress import NULL_REPORTER
from alselect.store import Store
from alselect.tasks import DETECTION_ARRAYS, Reduction, default_preprocess
from alselect.tasks.boxes import ImageDetections, box_components, pack_detections
from alselect.tasks.detection import detections_from
from alselect.tasks.export import (
    StoredDetections,
    detection_config,
    detection_role,
    label_studio_prediction,
    rectangle_results,
    stored_detections,
)
from tests.helpers import FAST, cli, export_rows, score

LN2 = math.log(2.0)
CLASSES = ["background", "cat", "dog"]


class FakeDetector(nn.Module):
    """One box per image in the lower-left quarter of the input, scored by the mean of the red
    channel; class probabilities from the image's mean colour (red, green, blue shares). An image
    whose red mean is below 0.01 has no detection."""

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out: list[dict[str, torch.Tensor]] = []
        side = float(x.shape[-1])
        for i in range(x.shape[0]):
            colour = x[i].mean(dim=(1, 2))
            score = colour[0].clamp(0.0, 0.999)
            if float(score) < 0.01:
                boxes = torch.zeros(0, 4)
                scores = torch.zeros(0)
                labels = torch.zeros(0, dtype=torch.long)
                probs = torch.zeros(0, 3)
            else:
                boxes = torch.tensor([[0.0, 0.5 * side, 0.25 * side, side]])
                scores = score.reshape(1)
                labels = torch.ones(1, dtype=torch.long)
                probs = (colour / colour.sum()).reshape(1, 3)
            out.append({"boxes": boxes, "scores": scores, "labels": labels, "probs": probs})
        return out


def save_fake(path: Path, *, side: int = 32, **meta: object) -> Path:
    info = {"task": "detection", "classes": CLASSES, "image_size": side, "mean": [0, 0, 0], "std": [1, 1, 1]}
    info.update(meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still common
        torch.jit.save(
            torch.jit.script(FakeDetector()), str(path), _extra_files={"alselect.json": json.dumps(info)}
        )
    return path


def solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# --- per-box components and stored arrays ------------------------------------------------------


def test_box_components_with_and_without_distribution() -> None:
    top1, top2, entropy = box_components(torch.tensor([0.7]), torch.tensor([[2.0, 1.0, 1.0]]))  # renormalised
    assert (float(top1[0]), float(top2[0])) == pytest.approx((0.5, 0.25))
    assert float(entropy[0]) == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    top1, top2, entropy = box_components(torch.tensor([0.5, 1.0]), None)
    assert top1.tolist() == [0.5, 1.0] and top2.tolist() == [0.5, 0.0]
    assert entropy.tolist() == pytest.approx([LN2, 0.0])


def test_pack_keeps_top_k_by_score_and_normalises_to_the_image() -> None:
    det = ImageDetections(
        boxes=torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 2.0, 12.0, 30.0], [1.0, 1.0, 2.0, 2.0]]),
        scores=torch.tensor([0.2, 0.9, 0.6]),
        labels=torch.tensor([1, 2, 1]),
    )
    # a 40 x 20 (w x h) image letterboxed to 32: it fills 32 x 16 (w x h) of the input
    geometry = torch.tensor([[20, 40, 16, 32]])
    out = pack_detections([det], geometry, 32, max_detections=2)
    assert set(out) == set(DETECTION_ARRAYS)
    assert out["det_count"].tolist() == [2] and out["det_scores"][0].tolist() == pytest.approx([0.9, 0.6])
    np.testing.assert_allclose(out["det_boxes"][0, 0], [4 / 32, 2 / 16, 12 / 32, 1.0])  # y2 30/16 clipped
    np.testing.assert_allclose(out["det_boxes"][0, 1], [1 / 32, 1 / 16, 2 / 32, 2 / 16])
    assert out["det_labels"][0].tolist() == [2, 1] and out["det_classes"].tolist() == [0]
    empty = pack_detections(
        [ImageDetections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0))], geometry, 32, 3
    )
    assert empty["det_count"].tolist() == [0] and empty["det_labels"][0].tolist() == [-1, -1, -1]
    assert all(torch.isfinite(v.float()).all() for v in empty.values())


def test_padded_batch_outputs_and_bad_outputs() -> None:
    raw = {
        "boxes": torch.ones(2, 3, 4),
        "scores": torch.tensor([[0.9, 0.5, 0.0], [0.7, 0.0, 0.0]]),
        "labels": torch.tensor([[1, 2, -1], [1, -1, -1]]),
        "embedding": torch.ones(2, 5),
    }
    images, embedding = detections_from(raw, 2)
    assert [len(d.scores) for d in images] == [2, 1] and embedding is not None
    counted, _ = detections_from(dict(raw, num_detections=torch.tensor([1, 0])), 2)
    assert [len(d.scores) for d in counted] == [1, 0]
    scripted, _ = detections_from(
        ({}, [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}]), 1
    )
    assert len(scripted) == 1
    with pytest.raises(CheckpointError, match="boxes"):
        detections_from([{"scores": torch.zeros(1), "labels": torch.zeros(1)}], 1)
    with pytest.raises(CheckpointError, match="2 results"):
        detections_from([{}, {}], 3)
    with pytest.raises(CheckpointError, match="not a list"):
        detections_from(torch.zeros(2, 5), 2)


# --- torchvision detectors ------------------------------------------------------------------------


def tv_checkpoint(tmp_path: Path, arch: str) -> Path:
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = tvm.get_model(arch, weights=None, weights_backbone=None, num_classes=3)
    path = tmp_path / f"{arch}.pt"
    save_alselect_checkpoint(
        path, model, arch, 3, CLASSES, default_preprocess("detection", {"image_size": 64}, model)
    )
    return path


def test_faster_rcnn_boxes_carry_their_class_distribution(tmp_path: Path) -> None:
    prepared = prepare_model(ModelSpec(tv_checkpoint(tmp_path, "fasterrcnn_mobilenet_v3_large_320_fpn")))
    assert prepared.task == "detection" and prepared.preprocess.resize == "letterbox"
    assert prepared.preprocess.mean == (0.0, 0.0, 0.0)  # torchvision detectors normalise inside
    torch.manual_seed(1)
    batch = torch.rand(2, 3, 64, 64)
    out = prepared.runner.forward_outputs(batch, torch.tensor([[64, 64, 64, 64], [30, 60, 32, 64]]))
    count = int(out["det_count"][0])
    assert count > 0 and out["det_classes"].tolist() == [3, 3]
    scores, top1, top2 = out["det_scores"][0, :count], out["det_top1"][0, :count], out["det_top2"][0, :count]
    # the box's score is its class's probability in its distribution, so it is at most top1
    assert bool((scores <= top1 + 1e-6).all()) and bool((top1 + top2 <= 1 + 1e-6).all())
    assert float(out["det_entropy"][0, :count].min()) > 0
    assert out["embedding"].shape[0] == 2 and torch.isfinite(out["embedding"]).all()
    # an image's outputs do not depend on the other images of its batch
    alone = prepared.runner.forward_outputs(batch[:1], torch.tensor([[64, 64, 64, 64]]))
    torch.testing.assert_close(alone["det_entropy"][0], out["det_entropy"][0])
    torch.testing.assert_close(alone["embedding"][0], out["embedding"][0], rtol=1e-4, atol=1e-5)


def test_state_dict_detector_without_distribution_scores_boxes_by_score(tmp_path: Path, make_images) -> None:
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = tvm.get_model("retinanet_resnet50_fpn", weights=None, weights_backbone=None, num_classes=3)
    path = tmp_path / "retina_state.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    spec = ModelSpec(path, arch="retinanet_resnet50_fpn", num_classes=3, image_size=64, task="detection")
    prepared = prepare_model(spec)
    prepared.model.module.score_thresh = 0.0  # random weights: keep every candidate
    out = prepared.runner.forward_outputs(torch.rand(1, 3, 64, 64), torch.tensor([[64, 64, 64, 64]]))
    count = int(out["det_count"][0])
    assert count == 100 and out["det_classes"].tolist() == [0]  # K = 100 of the many candidates
    s = out["det_scores"][0, :count]
    torch.testing.assert_close(out["det_top1"][0, :count], s)
    torch.testing.assert_close(out["det_top2"][0, :count], 1 - s)
    assert out["embedding"].shape == (1, 5 * 256)  # every FPN level, pooled and concatenated
    make_images(tmp_path / "pool", 2)
    result = score(tmp_path / "store", tmp_path / "pool", path, spec=spec)
    assert result.selected == 2
    with Store.open(tmp_path / "store") as store:
        layout = store.model(result.embed.model_key)["outputs"]
    assert set(layout) == {*DETECTION_ARRAYS, "embedding"} and layout["det_boxes"]["shape"] == [100, 4]
    with pytest.raises(UsageError, match="is a detection model"):
        prepare_model(ModelSpec(path, arch="retinanet_resnet50_fpn", num_classes=3, task="segmentation"))


@pytest.mark.slow
def test_ssd_boxes_carry_their_class_distribution(tmp_path: Path) -> None:
    prepared = prepare_model(ModelSpec(tv_checkpoint(tmp_path, "ssdlite320_mobilenet_v3_large")))
    out = prepared.runner.forward_outputs(torch.rand(1, 3, 64, 64), torch.tensor([[64, 64, 64, 64]]))
    count = int(out["det_count"][0])
    assert count > 0 and out["det_classes"].tolist() == [3]
    assert bool((out["det_scores"][0, :count] <= out["det_top1"][0, :count] + 1e-6).all())


# --- the pipeline with a TorchScript fake ---------------------------------------------------------


def test_ambiguous_box_outranks_confident_and_empty_rule(tmp_path: Path) -> None:
    ckpt = save_fake(tmp_path / "fake.pt")
    pool = tmp_path / "pool"
    solid(pool / "a_confident.png", (255, 0, 0))  # p = (1, 0, 0): entropy 0, score 0.999
    solid(pool / "b_ambiguous.png", (255, 255, 0))  # p = (0.5, 0.5, 0): entropy ln 2
    solid(pool / "c_empty.png", (0, 0, 255))  # no detection
    store = tmp_path / "store"
    result = score(store, pool, ckpt, "entropy", budget=None)
    assert result.embed.embedded == 3
    rows = export_rows(store, include_exported=True)
    assert [r["path"] for r in rows] == ["b_ambiguous.png", "a_confident.png", "c_empty.png"]
    assert float(rows[0]["score"]) == pytest.approx(LN2, abs=1e-6)
    assert float(rows[1]["score"]) == pytest.approx(0.0, abs=1e-6)
    assert rows[2]["score"] == "0" and rows[2]["predicted_label"] == "" and rows[2]["confidence"] == ""
    assert rows[0]["predicted_label"] == "cat"  # the dominant class of its detections
    assert [r["detections"] for r in rows] == ["1", "1", "0"]
    # changing the empty-image rule re-scores without running the model
    again = score(store, pool, ckpt, "entropy", reduction=Reduction(empty_score="max"))
    assert again.embed.embedded == 0
    rows = export_rows(store, include_exported=True)
    assert rows[0]["path"] == "c_empty.png" and float(rows[0]["score"]) == pytest.approx(math.log(3))
    # a detection threshold above the boxes' scores: no detections counted, no dominant class
    score(store, pool, ckpt, "least-confidence", reduction=Reduction(detection_threshold=1.0))
    rows = export_rows(store, include_exported=True)
    assert {r["detections"] for r in rows} == {"0"} and {r["predicted_label"] for r in rows} == {""}
    with Store.open(store) as opened:
        role = detection_role(opened.latest_run())
    assert role is not None and role["reduce"] == "max" and role["detection_threshold"] == 1.0


def score_cli(
    capsys: pytest.CaptureFixture[str], store: str, pool: Path, ckpt: Path, *extra: str
) -> tuple[int, str, str]:
    return cli(capsys, "--store", store, "score", str(pool), "--model", str(ckpt), "--workers", "0", *extra)


def test_cli_detection_run_and_classification_csv_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_checkpoint: Path, make_images
) -> None:
    ckpt = save_fake(tmp_path / "fake.pt")
    pool = tmp_path / "pool"
    solid(pool / "a.png", (200, 100, 0))
    solid(pool / "b.png", (255, 0, 0))
    store = str(tmp_path / "store")
    code, _, err = score_cli(
        capsys, store, pool, ckpt, "-s", "margin", "--task", "detection", "--reduce", "sum"
    )
    assert code == 0, err
    code, out, _ = cli(capsys, "--store", store, "export", "--format", "csv")
    header = out.splitlines()[0].split(",")
    assert header[-1] == "detections" and header[-4:-1] == ["sha256", "folder", "uri"]  # appended last
    code, _, err = score_cli(capsys, store, pool, ckpt, "-s", "entropy", "--reduce", "topq")
    assert code == 2 and "does not apply to detection" in err
    code, _, err = score_cli(capsys, store, pool, ckpt, "-s", "entropy", "--task", "segmentation")
    assert code == 2 and "is a detection model" in err, err
    other = tmp_path / "cls"
    make_images(other, 2)
    score_cli(capsys, str(tmp_path / "s2"), other, tiny_checkpoint, "-s", "entropy")
    code, out, _ = cli(capsys, "--store", str(tmp_path / "s2"), "export", "--format", "csv")
    assert out.splitlines()[0].split(",")[-1] == "uri"  # classification runs keep their columns


def test_diversity_needs_an_embedding_the_fake_does_not_give(tmp_path: Path, tiny_checkpoint: Path) -> None:
    ckpt = save_fake(tmp_path / "fake.pt")
    pool = tmp_path / "pool"
    solid(pool / "a.png", (200, 100, 0))
    from alselect.pipeline import pool_inputs
    from alselect.strategies import Strategy

    class NeedsEmbeddings(Strategy):
        name = "needs-embeddings-test"
        needs = frozenset({"probs", "embeddings"})

    with Store.open(tmp_path / "store", write=True, create=True) as store:
        from alselect.pipeline import embed_synced, register
        from alselect.sync import sync_folder

        prepared = prepare_model(ModelSpec(ckpt))
        register(store, prepared)
        root = pool.resolve()
        embed_synced(store, root, sync_folder(store, root), prepared, FAST, NULL_REPORTER)
        rows = store.pool_rows(str(root), [prepared.key])
        with pytest.raises(UsageError, match="--embed-model"):
            pool_inputs(store, rows, NeedsEmbeddings(), [prepared], None, budgeted=False)


# --- export: Label Studio rectangles ---------------------------------------------------------------


def test_rectangles_in_percent_of_the_image_hand_computed() -> None:
    det = StoredDetections(
        boxes=np.array([[0.1, 0.2, 0.35, 0.9]], dtype=np.float32),
        scores=np.array([0.875], dtype=np.float32),
        labels=np.array([2], dtype=np.int32),
        height=480,
        width=640,
    )
    (result,) = rectangle_results(det, CLASSES, from_name="bbox", to_name="img")
    assert result["type"] == "rectanglelabels" and (result["from_name"], result["to_name"]) == ("bbox", "img")
    assert (result["original_width"], result["original_height"]) == (640, 480)
    value = result["value"]
    assert value["x"] == pytest.approx(10.0) and value["y"] == pytest.approx(20.0)
    assert value["width"] == pytest.approx(25.0) and value["height"] == pytest.approx(70.0)
    assert value["rectanglelabels"] == ["dog"] and result["score"] == 0.875
    unnamed = rectangle_results(det, None)
    assert unnamed[0]["value"]["rectanglelabels"] == ["2"]


def test_detection_labeling_config_names_every_class() -> None:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(detection_config(["cat", 'a "quoted" & <odd> name'], from_name="bbox"))
    image, rectangles = list(root)
    assert (image.tag, image.get("name"), image.get("value")) == ("Image", "image", "$image")
    assert (rectangles.tag, rectangles.get("name"), rectangles.get("toName")) == (
        "RectangleLabels",
        "bbox",
        "image",
    )
    assert [label.get("value") for label in rectangles] == ["cat", 'a "quoted" & <odd> name']


def test_exif_rotated_image_boxes_map_to_the_displayed_image(tmp_path: Path) -> None:
    ckpt = save_fake(tmp_path / "fake.pt")
    pool = tmp_path / "pool"
    pool.mkdir()
    img = Image.new("RGB", (40, 20), (255, 0, 0))  # stored 40 x 20, shown rotated: 20 wide, 40 high
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(pool / "rotated.jpg", exif=exif)
    store = tmp_path / "store"
    result = score(store, pool, ckpt, "entropy", reduction=Reduction(detection_threshold=0.01))
    with Store.open(store) as opened:
        sha = opened.rows("SELECT sha256 FROM images")[0][0]
        found = stored_detections(opened, result.embed.model_key, [sha], 0.01)
    det = found[sha]
    assert (det.width, det.height) == (20, 40)
    # letterboxed to 32: the image fills 16 x 32 (w x h); the fake's box (0, 16, 8, 32) in input pixels
    np.testing.assert_allclose(det.boxes[0], [0.0, 0.5, 0.5, 1.0])
    value = rectangle_results(det, CLASSES)[0]["value"]
    assert (value["x"], value["y"], value["width"], value["height"]) == (0.0, 50.0, 50.0, 50.0)


def test_label_studio_sdk_accepts_the_rectangles() -> None:
    """Label Studio's own validator (label-studio-sdk, optional) accepts the predictions against
    the generated config, and rejects them when the labels do not belong to it."""
    sdk = pytest.importorskip("label_studio_sdk.label_interface")
    det = StoredDetections(
        boxes=np.array([[0.1, 0.2, 0.35, 0.9], [0.5, 0.5, 1.0, 1.0]], dtype=np.float32),
        scores=np.array([0.875, 0.6], dtype=np.float32),
        labels=np.array([2, 1], dtype=np.int32),
        height=480,
        width=640,
    )
    interface = sdk.LabelInterface(detection_config(CLASSES))
    good = label_studio_prediction(det, CLASSES, model_version="abc", score=0.0)
    assert interface.validate_prediction(good, return_errors=True) == []
    wrong = label_studio_prediction(det, ["x", "y", "z"], model_version="abc", score=0.0)
    assert len(interface.validate_prediction(wrong, return_errors=True)) == 2
