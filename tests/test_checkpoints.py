"""Checkpoint formats: torch.export, TorchScript, alselect dicts, state_dicts, pickled modules.

Every loader is checked against the original ``nn.Module``: ``predict`` must return exactly the
softmax of the module's logits and the penultimate (pre-classifier) features the module computes.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from alselect.checkpoints import CheckpointOptions, LoadedModel, load_checkpoint
from alselect.checkpoints.alselect_dict import save_alselect_checkpoint
from alselect.errors import CheckpointError, UsageError
from alselect.models import build_model
from alselect.models.small_cnn import SmallCNN
from alselect.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, parse_triple

ATOL = 1e-5
TINY_CLASSES = ["ant", "bee", "cat"]  # the classes of conftest.tiny_checkpoint
META = {
    "classes": ["ant", "bee", "cat", "dog"],
    "image_size": 48,
    "resize_size": 56,
    "mean": [0.1, 0.2, 0.3],
    "std": [0.4, 0.5, 0.6],
}
META_PREPROCESS = Preprocess(image_size=48, resize_size=56, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))


# --- model classes (module top level, so that torch.save(model) can be unpickled) -------------


class TinyNet(nn.Module):
    """conv -> relu -> global pool -> 6-d features -> linear: returns logits only."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(x))


class TupleNet(TinyNet):
    """Returns ``(logits, embedding)`` with a 6-d embedding."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        feats = self.trunk(x)
        return self.fc(feats), feats


class DictNet(TinyNet):
    """Returns ``{"logits": ..., "embedding": ...}``; the embedding is scaled so it is distinctive."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        feats = self.trunk(x)
        return {"logits": self.fc(feats), "embedding": feats * 3.0 + 1.0}


class ProbNet(TinyNet):
    """Emits probabilities (softmax inside the model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(self.trunk(x)), dim=1)


class ConvHeadNet(nn.Module):
    """A classifier whose head is a 1×1 convolution (squeezenet-style): no Linear to read C from."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Conv2d(3, 8, 3)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.trunk(x))).mean(dim=(2, 3))


class OpaqueConfig:
    """An arbitrary user class: not allowed by ``torch.load(weights_only=True)``."""

    def __init__(self) -> None:
        self.lr = 0.1


# --- helpers ------------------------------------------------------------------------------------


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build a module with seeded weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = factory()
    gen = torch.Generator().manual_seed(seed + 1)
    for sub in model.modules():
        if isinstance(sub, nn.BatchNorm2d):
            sub.running_mean.copy_(torch.rand(sub.running_mean.shape, generator=gen) - 0.5)
            sub.running_var.copy_(torch.rand(sub.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def load(path: Path, **options: Any) -> LoadedModel:
    return load_checkpoint(path, CheckpointOptions(**options))


def message_without_path(exc: pytest.ExceptionInfo[BaseException], path: Path) -> str:
    """The error message with the (digit-laden) temp path removed, for number checks."""
    return str(exc.value).replace(str(path), "<path>")


def mentions(text: str, number: int) -> bool:
    return re.search(rf"(?<![\d.]){number}(?![\d.])", text) is not None


def assert_probs_match(loaded: LoadedModel, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``predict(x)`` probabilities equal softmax(model(x)); returns the loaded embedding."""
    probs, embedding = loaded.predict(x)
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1)
    assert probs.shape == expected.shape
    torch.testing.assert_close(probs, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(x.shape[0]), atol=1e-5, rtol=0)
    assert embedding.shape[0] == x.shape[0]
    return embedding


def jit_save(module: torch.jit.ScriptModule, path: Path, meta: dict[str, Any] | None) -> Path:
    extra = {"alselect.json": json.dumps(meta)} if meta is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(module, str(path), _extra_files=extra)
    return path


def jit_script(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(model)


def jit_trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(model, example)


# --- torch.export -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path]:
    """TinyNet exported once with dynamic batch and image size, saved with and without alselect.json."""
    model = seeded(TinyNet)
    dim, side = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("side", min=4, max=512)
    program = torch.export.export(model, (batch(2, 8),), dynamic_shapes=({0: dim, 2: side, 3: side},))
    folder = tmp_path_factory.mktemp("export")
    with_meta, bare = folder / "with_meta.pt2", folder / "bare.pt2"
    torch.export.save(program, str(with_meta), extra_files={"alselect.json": json.dumps(META)})
    torch.export.save(program, str(bare))
    return model, with_meta, bare


def test_torch_export_predicts_softmax_for_any_batch_and_reads_metadata(
    exported: tuple[nn.Module, Path, Path],
) -> None:
    model, path, _ = exported
    loaded = load(path)
    assert loaded.kind == "torch.export"
    assert loaded.classes == META["classes"]
    assert loaded.num_classes == 4
    assert loaded.preprocess == META_PREPROCESS
    for n, seed in ((1, 1), (5, 2)):  # exported with batch 2: the batch dim must be dynamic
        x = batch(n, 8, seed)
        embedding = assert_probs_match(loaded, model, x)
        with torch.no_grad():  # no features exposed: the embedding is the logits
            torch.testing.assert_close(embedding, model(x), atol=ATOL, rtol=0)


def test_torch_export_without_metadata_uses_imagenet_defaults(exported: tuple[nn.Module, Path, Path]) -> None:
    model, _, bare = exported
    loaded = load(bare)
    assert loaded.kind == "torch.export"
    assert loaded.classes is None
    assert loaded.preprocess.image_size == 224
    assert loaded.preprocess.resize_size == 224
    assert loaded.preprocess.mean == pytest.approx((0.485, 0.456, 0.406))
    assert loaded.preprocess.std == pytest.approx((0.229, 0.224, 0.225))
    assert_probs_match(loaded, model, batch(3, 8, seed=3))


def test_torch_export_metadata_class_count_conflicts_with_num_classes(
    exported: tuple[nn.Module, Path, Path],
) -> None:
    _, path, _ = exported
    with pytest.raises(CheckpointError) as exc:
        load(path, num_classes=3)
    text = message_without_path(exc, path)
    assert mentions(text, 4) and mentions(text, 3), text


# --- TorchScript --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["trace", "script"])
def test_torchscript_logits_only_embedding_falls_back_to_logits(tmp_path: Path, how: str) -> None:
    model = seeded(TinyNet)
    x = batch(3, 8, seed=4)
    module = jit_trace(model, x) if how == "trace" else jit_script(model)
    path = jit_save(module, tmp_path / "logits.pt", META)
    loaded = load(path)
    assert loaded.kind == "torchscript"
    assert loaded.classes == META["classes"]
    assert loaded.preprocess == META_PREPROCESS
    embedding = assert_probs_match(loaded, model, x)
    with torch.no_grad():
        assert torch.equal(embedding, module(x))


@pytest.mark.parametrize("net", [TupleNet, DictNet], ids=["tuple", "dict"])
def test_torchscript_embedding_is_the_modules_own_second_output(
    tmp_path: Path, net: Callable[[], nn.Module]
) -> None:
    model = seeded(net)
    module = jit_script(model)
    path = jit_save(module, tmp_path / "two_outputs.pt", {"classes": META["classes"]})
    loaded = load(path)
    assert loaded.kind == "torchscript"
    x = batch(4, 8, seed=5)
    probs, embedding = loaded.predict(x)
    with torch.no_grad():
        raw = module(x)
    logits, expected_embedding = (raw["logits"], raw["embedding"]) if isinstance(raw, dict) else raw
    torch.testing.assert_close(probs, torch.softmax(logits, dim=1), atol=ATOL, rtol=0)
    assert embedding.shape == (4, 6)
    assert torch.equal(embedding, expected_embedding)
    with torch.no_grad():
        features = model.trunk(x)
    torch.testing.assert_close(
        embedding, features * 3.0 + 1.0 if net is DictNet else features, atol=1e-6, rtol=0
    )


def test_torchscript_probabilities_output_is_not_softmaxed_again(tmp_path: Path) -> None:
    model = seeded(ProbNet)
    module = jit_script(model)
    x = batch(3, 8, seed=6)
    with torch.no_grad():
        expected = module(x)
    as_probs = load(jit_save(module, tmp_path / "probs.pt", {"outputs": "probabilities"}))
    probs, _ = as_probs.predict(x)
    assert as_probs.outputs == "probabilities"
    assert torch.equal(probs, expected)
    # Without the declaration the same archive is treated as logits and softmaxed a second time.
    as_logits = load(jit_save(module, tmp_path / "logits.pt", None))
    probs_twice, _ = as_logits.predict(x)
    torch.testing.assert_close(probs_twice, torch.softmax(expected, dim=1), atol=ATOL, rtol=0)
    assert (probs_twice - expected).abs().max() > 0.01
    assert as_logits.preprocess == Preprocess()


def test_torchscript_rejects_unknown_outputs_declaration(tmp_path: Path) -> None:
    path = jit_save(jit_script(seeded(TinyNet)), tmp_path / "bad.pt", {"outputs": "log_softmax"})
    with pytest.raises(CheckpointError, match="outputs"):
        load(path)


# --- alselect's own format ----------------------------------------------------------------------


def test_alselect_dict_round_trip_with_fc_input_embedding(tmp_path: Path) -> None:
    model = seeded(lambda: SmallCNN(num_classes=5))
    preprocess = Preprocess(image_size=24, resize_size=28, mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3))
    path = tmp_path / "model.pt"
    classes = ["a", "b", "c", "d", "e"]
    save_alselect_checkpoint(
        path, model, arch="small_cnn", num_classes=5, classes=classes, preprocess=preprocess
    )
    loaded = load(path)
    assert (loaded.kind, loaded.arch, loaded.num_classes) == ("alselect", "small_cnn", 5)
    assert loaded.classes == classes
    assert loaded.preprocess == preprocess
    assert not loaded.module.training
    x = batch(3, 24, seed=7)
    embedding = assert_probs_match(loaded, model, x)
    with torch.no_grad():
        expected = model.embed(model.pool(model.features(x)))
    assert embedding.shape == (3, 128)
    torch.testing.assert_close(embedding, expected, atol=1e-6, rtol=0)


def test_alselect_dict_fixture_checkpoint(tiny_checkpoint: Path) -> None:
    loaded = load(tiny_checkpoint)
    assert loaded.classes == TINY_CLASSES
    assert loaded.preprocess == Preprocess(image_size=16, resize_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert loaded.sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert loaded.path == str(tiny_checkpoint)
    probs, embedding = loaded.predict(batch(2, 16))
    assert probs.shape == (2, 3) and embedding.shape == (2, 128)


def test_alselect_dict_wrong_num_classes_names_both_counts(tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError) as exc:
        load(tiny_checkpoint, num_classes=7)
    text = message_without_path(exc, tiny_checkpoint)
    assert mentions(text, 3) and mentions(text, 7), text


# --- plain state_dicts --------------------------------------------------------------------------


def wrap(state: dict[str, torch.Tensor], wrapper: str, prefix: str) -> dict[str, Any]:
    prefixed = {prefix + key: value for key, value in state.items()}
    if wrapper == "raw":
        return prefixed
    if wrapper == "state_dict_ema":  # EMA weights win over the plain ones stored beside them
        decoy = {key: torch.zeros_like(value) for key, value in prefixed.items()}
        return {"state_dict": decoy, "state_dict_ema": prefixed, "epoch": 12}
    return {wrapper: prefixed, "epoch": 3, "optimizer": {"lr": 0.01, "momentum": [0.9]}}


@pytest.mark.parametrize(
    ("wrapper", "prefix"),
    [
        ("raw", ""),
        ("raw", "module."),
        ("state_dict", ""),
        ("state_dict", "_orig_mod."),
        ("model", "module."),
        ("model", "module._orig_mod."),
        ("state_dict_ema", "_orig_mod."),
    ],
)
def test_small_cnn_state_dict_wrappers_and_prefixes(tmp_path: Path, wrapper: str, prefix: str) -> None:
    model = seeded(lambda: SmallCNN(num_classes=3), seed=11)
    path = tmp_path / "sd.pth"
    torch.save(wrap(model.state_dict(), wrapper, prefix), path)
    loaded = load(path, arch="small_cnn", num_classes=3)
    assert (loaded.kind, loaded.arch, loaded.num_classes) == ("state_dict", "small_cnn", 3)
    assert loaded.preprocess == Preprocess()
    x = batch(2, 16, seed=8)
    embedding = assert_probs_match(loaded, model, x)
    with torch.no_grad():
        expected = model.embed(model.pool(model.features(x)))
    torch.testing.assert_close(embedding, expected, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, Path]:
    """A seeded 4-class resnet18, saved raw and as ``{"model": {"module._orig_mod.*": ...}}``."""
    model = seeded(lambda: torchvision.models.resnet18(weights=None, num_classes=4), seed=21)
    folder = tmp_path_factory.mktemp("resnet")
    raw, wrapped = folder / "raw.pth", folder / "wrapped.pth"
    torch.save(model.state_dict(), raw)
    torch.save(wrap(model.state_dict(), "model", "module._orig_mod."), wrapped)
    return model, raw, wrapped


@pytest.mark.parametrize("which", [1, 2], ids=["raw", "wrapped-prefixed"])
def test_resnet18_state_dict_probs_and_512d_fc_input(
    resnet18: tuple[nn.Module, Path, Path], which: int
) -> None:
    model, path = resnet18[0], resnet18[which]
    loaded = load(path, arch="resnet18", num_classes=4)
    assert (loaded.kind, loaded.arch, loaded.num_classes) == ("state_dict", "resnet18", 4)
    captured: list[torch.Tensor] = []
    handle = model.fc.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    try:
        x = batch(2, 32, seed=9)
        embedding = assert_probs_match(loaded, model, x)
    finally:
        handle.remove()
    assert embedding.shape == (2, 512)
    torch.testing.assert_close(embedding, captured[0], atol=ATOL, rtol=0)
    with torch.no_grad():  # and by running the trunk by hand
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        h = model.layer4(model.layer3(model.layer2(model.layer1(h))))
        trunk = torch.flatten(model.avgpool(h), 1)
    torch.testing.assert_close(embedding, trunk, atol=ATOL, rtol=0)


@pytest.fixture
def small_state_dict(tmp_path: Path) -> Path:
    path = tmp_path / "small.pth"
    torch.save(seeded(lambda: SmallCNN(num_classes=3)).state_dict(), path)
    return path


def test_state_dict_without_arch_asks_for_arch(small_state_dict: Path) -> None:
    with pytest.raises(CheckpointError, match="--arch"):
        load(small_state_dict, num_classes=3)
    with pytest.raises(CheckpointError, match="--num-classes"):
        load(small_state_dict, arch="small_cnn")


def test_state_dict_wrong_num_classes_names_both_counts(small_state_dict: Path) -> None:
    with pytest.raises(CheckpointError) as exc:
        load(small_state_dict, arch="small_cnn", num_classes=5)
    text = message_without_path(exc, small_state_dict)
    assert "classes" in text
    assert mentions(text, 3) and mentions(text, 5), text


def test_state_dict_unknown_arch(small_state_dict: Path) -> None:
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load(small_state_dict, arch="resnet_9000", num_classes=3)


def test_state_dict_wrong_arch_points_at_arch_not_class_count(small_state_dict: Path) -> None:
    # SmallCNN weights (fc.weight 3x128) loaded as a 3-class resnet18 (fc.weight 3x512): the
    # class counts agree, the architecture does not.
    with pytest.raises(CheckpointError) as exc:
        load(small_state_dict, arch="resnet18", num_classes=3)
    text = message_without_path(exc, small_state_dict)
    assert "--arch" in text, text
    assert "classes but --num-classes" not in text, text


# --- weights_only and --trust-checkpoint --------------------------------------------------------


def test_custom_class_inside_dict_needs_trust(tmp_path: Path) -> None:
    model = seeded(lambda: SmallCNN(num_classes=3))
    path = tmp_path / "with_config.pth"
    torch.save({"state_dict": model.state_dict(), "config": OpaqueConfig()}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load(path, arch="small_cnn", num_classes=3)
    loaded = load(path, arch="small_cnn", num_classes=3, trust_checkpoint=True)
    assert loaded.kind == "state_dict"
    assert_probs_match(loaded, model, batch(2, 16, seed=10))


def test_pickled_whole_module_refused_then_loaded_with_trust(tmp_path: Path) -> None:
    model = seeded(TinyNet, seed=5)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load(path)
    loaded = load(path, trust_checkpoint=True)
    assert loaded.kind == "pickled-module"
    assert loaded.num_classes == 4
    assert loaded.preprocess == Preprocess()
    x = batch(3, 8, seed=12)
    embedding = assert_probs_match(loaded, model, x)
    with torch.no_grad():
        torch.testing.assert_close(embedding, model.trunk(x), atol=ATOL, rtol=0)


# --- unreadable files ---------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load(tmp_path)


@pytest.mark.parametrize("trust", [False, True])
def test_empty_file(tmp_path: Path, trust: bool) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load(path, trust_checkpoint=trust)


@pytest.mark.parametrize(
    ("content", "trust"),
    [
        (b"not a checkpoint\n", False),
        (b"not a checkpoint\n", True),
        (b"name,label\nimg1.jpg,cat\n", False),
        (b"I like cheese\n", True),  # INT opcode: ValueError inside pickle
        (b"hello world\n", False),  # BINGET: KeyError in the weights_only unpickler
        (b"this is not a checkpoint\n", False),  # TUPLE on an empty stack: IndexError
        (b"r\n", False),  # LONG_BINPUT with no argument: struct.error
        (b"class Foo:\n    pass\n", True),  # GLOBAL: ModuleNotFoundError when trusted
    ],
    ids=["text", "text-trusted", "csv", "int-opcode-trusted", "keyerror", "indexerror", "struct", "import"],
)
def test_text_file_is_a_checkpoint_error(tmp_path: Path, content: bytes, trust: bool) -> None:
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load(path, arch="small_cnn", num_classes=3, trust_checkpoint=trust)


def test_truncated_archives(tmp_path: Path, exported: tuple[nn.Module, Path, Path]) -> None:
    sources = {
        "state_dict.pt": tmp_path / "full.pt",
        "program.pt2": exported[1],
        "script.pt": tmp_path / "s.pt",
    }
    torch.save(seeded(lambda: SmallCNN(num_classes=3)).state_dict(), sources["state_dict.pt"])
    jit_save(jit_script(seeded(TinyNet)), sources["script.pt"], META)
    for name, source in sources.items():
        data = source.read_bytes()
        for cut in (len(data) // 2, len(data) - 30):
            path = tmp_path / f"cut_{cut}_{name}"
            path.write_bytes(data[:cut])
            for trust in (False, True):
                with pytest.raises(CheckpointError):
                    load(path, arch="small_cnn", num_classes=3, trust_checkpoint=trust)


def test_sha256_is_the_file_digest(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_alselect_checkpoint(path, seeded(lambda: SmallCNN(num_classes=2)), arch="small_cnn", num_classes=2)
    loaded = load(path)
    assert re.fullmatch(r"[0-9a-f]{64}", loaded.sha256)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# --- models and preprocessing -------------------------------------------------------------------


def test_build_model_known_and_unknown_names() -> None:
    small = build_model("small_cnn", 7)
    assert isinstance(small, SmallCNN) and small.fc.out_features == 7
    resnet = build_model("resnet18", 7)
    assert isinstance(resnet, torchvision.models.ResNet) and resnet.fc.out_features == 7
    with pytest.raises(CheckpointError, match="unknown architecture"):
        build_model("no_such_net", 7)
    with pytest.raises(CheckpointError, match="unknown architecture"):  # Mask R-CNN is not supported
        build_model("maskrcnn_resnet50_fpn", 7)
    with pytest.raises(CheckpointError, match="unknown detection architecture"):
        build_model("fasterrcnn_resnet12_fpn", 7)
    with pytest.raises(CheckpointError, match="at least 1"):
        build_model("small_cnn", 0)


def test_override_keeps_resize_ratio() -> None:
    base = Preprocess(image_size=224, resize_size=256)
    assert base.override(image_size=112) == Preprocess(image_size=112, resize_size=128)
    assert base.override(image_size=448) == Preprocess(image_size=448, resize_size=512)
    assert base.override() == base
    changed = base.override(mean=[0.5], std=[0.1, 0.2, 0.3])
    assert changed == Preprocess(image_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.1, 0.2, 0.3))
    assert Preprocess().mean == IMAGENET_MEAN and Preprocess().std == IMAGENET_STD


@pytest.mark.parametrize(
    "kwargs", [{"image_size": 0}, {"image_size": -5}, {"mean": [0.1, 0.2]}, {"std": [0.1, 0.0, 0.2]}]
)
def test_override_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        Preprocess().override(**kwargs)


def test_parse_triple_accepts_one_or_three_numbers() -> None:
    assert parse_triple(None, "--mean") is None
    assert parse_triple("0.1,0.2,0.3", "--mean") == (0.1, 0.2, 0.3)
    assert parse_triple(" 0.1, 0.2 ,0.3 ", "--mean") == (0.1, 0.2, 0.3)
    assert parse_triple("0.5", "--std") == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("1,2", "--mean"),
        ("1,2,3,4", "--mean"),
        ("a,b,c", "--mean"),
        ("", "--mean"),
        ("0.2,0,0.2", "--std"),
        ("-1", "--std"),
    ],
)
def test_parse_triple_rejects_bad_triples(text: str, what: str) -> None:
    with pytest.raises(UsageError):
        parse_triple(text, what)


def test_from_metadata_reads_and_validates() -> None:
    assert Preprocess.from_metadata(None) == Preprocess()
    assert Preprocess.from_metadata(META) == META_PREPROCESS
    # resize_size defaults to image_size and is never below it
    assert Preprocess.from_metadata({"image_size": 64}) == Preprocess(image_size=64, resize_size=64)
    assert Preprocess.from_metadata({"image_size": 64, "resize_size": 32}).resize_size == 64
    for bad in ({"image_size": "big"}, {"mean": "abc"}, {"std": 0.5}):
        with pytest.raises(CheckpointError):
            Preprocess.from_metadata(bad)


@pytest.mark.parametrize(
    "bad", [{"mean": [0.5, 0.5]}, {"std": [0.2, 0.0, 0.2]}], ids=["mean-len", "std-zero"]
)
def test_bad_metadata_triple_in_checkpoint_is_a_checkpoint_error(tmp_path: Path, bad: dict[str, Any]) -> None:
    path = jit_save(jit_script(seeded(TinyNet)), tmp_path / "bad_meta.pt", bad)
    with pytest.raises(CheckpointError):
        load(path)


def test_pickled_conv_head_module_learns_classes_and_pools_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ConvHeadNet().eval()
    path = tmp_path / "convhead.pt"
    torch.save(model, path)
    loaded = load_checkpoint(path, CheckpointOptions(trust_checkpoint=True))
    assert loaded.num_classes is None  # not inferable from a conv head: learnt from the output
    x = torch.randn(3, 3, 12, 12)
    probs, embedding = loaded.predict(x)
    with torch.no_grad():
        features = torch.relu(model.trunk(x))
        torch.testing.assert_close(probs, torch.softmax(model.head(features).mean(dim=(2, 3)), dim=1))
        torch.testing.assert_close(embedding, features.mean(dim=(2, 3)))


class DictProbsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyNet()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"probs": torch.softmax(self.inner(x), dim=1)}


def test_dict_probs_output_is_not_softmaxed_twice(tmp_path: Path) -> None:
    model = seeded(DictProbsNet).eval()
    path = jit_save(jit_script(model), tmp_path / "dictprobs.pt", META)
    x = torch.randn(4, 3, 8, 8)
    probs, _ = load(path).predict(x)
    with torch.no_grad():
        torch.testing.assert_close(probs, model(x)["probs"])


# --- messages that say what is wrong: damaged vs untrusted, static exports, not-a-checkpoint --------


def flip_bit(path: Path, member_suffix: str, offset: int = 0) -> Path:
    """Flip one bit ``offset`` bytes into a zip member's stored data (as a bad disk or download would)."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    assert info.compress_type == zipfile.ZIP_STORED
    data = bytearray(path.read_bytes())
    start = (
        info.header_offset
        + 30
        + int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    )
    start += int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    data[start + offset] ^= 0x04
    damaged = path.with_name("damaged-" + path.name)
    damaged.write_bytes(bytes(data))
    return damaged


@pytest.mark.parametrize(
    ("member", "offset"),
    [("data.pkl", 40), ("data/0", 5)],  # the pickle (an opcode or a name), a weight
    ids=["pickle", "weights"],
)
def test_bit_flipped_state_dict_is_damaged_not_untrusted(tmp_path: Path, member: str, offset: int) -> None:
    path = tmp_path / "sd.pt"
    torch.save(seeded(lambda: SmallCNN(num_classes=3)).state_dict(), path)
    damaged = flip_bit(path, member, offset)
    for trust in (False, True):
        with pytest.raises(CheckpointError) as exc:
            load(damaged, arch="small_cnn", num_classes=3, trust_checkpoint=trust)
        text = str(exc.value)
        assert "is damaged" in text and "fails its checksum" in text, text
        assert "trust" not in text, text


def test_damaged_legacy_pickle_does_not_advise_trust(tmp_path: Path) -> None:
    """Files from torch.save(..., _use_new_zipfile_serialization=False) have no checksums."""
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    at = data.index(b"\x80\x02", 2)  # the second pickle (the object itself): damage its first opcode
    data[at + 2] = 0x9F  # not a pickle opcode
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as exc:
        load(path)
    assert "is damaged or not a PyTorch checkpoint" in str(exc.value)
    assert "trust" not in str(exc.value)


def test_untrusted_pickle_names_the_class_and_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "with_config.pth"
    torch.save(
        {"state_dict": seeded(lambda: SmallCNN(num_classes=3)).state_dict(), "config": OpaqueConfig()}, path
    )
    with pytest.raises(CheckpointError) as exc:
        load(path, arch="small_cnn", num_classes=3)
    text = str(exc.value)
    assert f"class {OpaqueConfig.__module__}.OpaqueConfig" in text and "--trust-checkpoint" in text
    assert "damaged" not in text


def export_static(tmp_path: Path, batch_size: int, size: int, name: str = "static.pt2", **extra: Any) -> Path:
    program = torch.export.export(seeded(TinyNet), (batch(batch_size, size),))
    path = tmp_path / name
    torch.export.save(program, str(path), **extra)
    return path


@pytest.mark.parametrize("n", [1, 3, 4, 9])
def test_static_batch_program_runs_in_chunks_of_its_batch_size(tmp_path: Path, n: int) -> None:
    path = export_static(tmp_path, batch_size=4, size=8)
    loaded = load(path)
    assert (loaded.fixed_batch, loaded.input_size) == (4, 8)
    assert loaded.preprocess.image_size == 8  # from the program: it takes nothing else
    x = batch(n, 8, seed=n)
    probs, embedding = loaded.predict(x)
    model = seeded(TinyNet)
    with torch.no_grad():
        torch.testing.assert_close(probs, torch.softmax(model(x), dim=1), atol=ATOL, rtol=0)
        torch.testing.assert_close(embedding, model(x), atol=ATOL, rtol=0)


def test_static_size_program_checks_metadata_and_image_size_at_load(tmp_path: Path) -> None:
    conflicting = export_static(
        tmp_path, 2, 8, "meta.pt2", extra_files={"alselect.json": json.dumps({"image_size": 16})}
    )
    with pytest.raises(CheckpointError, match=r"takes 8x8 inputs but alselect.json says image_size 16"):
        load(conflicting)
    loaded = load(export_static(tmp_path, 2, 8))
    with pytest.raises(
        UsageError, match=r"only takes 8x8 inputs, but the image size is 16: drop --image-size"
    ):
        loaded.check_input_size(16)
    with pytest.raises(
        CheckpointError, match=r"refuses an input of shape \(2, 3, 16, 16\).*torch.export.Dim"
    ):
        loaded.predict(batch(2, 16))


def test_program_alselect_cannot_feed_is_refused_at_load(tmp_path: Path) -> None:
    grey = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    program = torch.export.export(grey.eval(), (torch.randn(2, 1, 8, 8),))
    torch.export.save(program, str(tmp_path / "grey.pt2"))
    with pytest.raises(CheckpointError, match=r"input of shape \[2, 1, 8, 8\]; alselect feeds RGB"):
        load(tmp_path / "grey.pt2")
    wide = torch.export.export(seeded(TinyNet), (torch.randn(2, 3, 8, 12),))
    torch.export.save(wide, str(tmp_path / "wide.pt2"))
    with pytest.raises(CheckpointError, match=r"\[2, 3, 8, 12\] inputs; alselect feeds square crops"):
        load(tmp_path / "wide.pt2")


def folder_with_checkpoint(path: Path) -> None:
    path.mkdir()
    (path / "model.pt").write_bytes(b"x")


def safetensors_file(path: Path) -> None:
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))


NOT_CHECKPOINTS: dict[str, tuple[Callable[[Path], object], str]] = {
    "folder-with-checkpoint": (
        folder_with_checkpoint,
        "is a folder, not a checkpoint file; it holds model.pt: pass one of them",
    ),
    "empty-folder": (Path.mkdir, "is a folder, not a checkpoint file"),
    "text": (
        lambda p: p.write_text("name,label\nimg1.jpg,cat\n"),
        "is a text file (it starts with 'name,label')",
    ),
    "safetensors": (safetensors_file, "is a safetensors file"),
    "hdf5": (lambda p: p.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100)), "is an HDF5 file"),
    "png": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100)), "is a PNG image"),
}


@pytest.mark.parametrize("case", sorted(NOT_CHECKPOINTS))
def test_model_that_is_not_a_checkpoint_says_what_it_is(tmp_path: Path, case: str) -> None:
    make, needle = NOT_CHECKPOINTS[case]
    path = tmp_path / "model"
    make(path)
    with pytest.raises(CheckpointError) as exc:
        load(path)
    assert needle in str(exc.value), str(exc.value)


def test_image_size_a_static_program_cannot_take_is_a_usage_error_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import write_image
    from tests.helpers import cli

    write_image(tmp_path / "pool" / "a.png", seed=1)
    path = export_static(tmp_path, 2, 8)
    store = ["--store", str(tmp_path / "store")]
    args = ["embed", str(tmp_path / "pool"), "-m", str(path), "--workers", "0", "--image-size", "16"]
    code, out, err = cli(capsys, *store, *args)
    assert code == 2 and out == "" and "only takes 8x8 inputs, but the image size is 16" in err, err
    code, _, err = cli(capsys, *store, *args[:-2])
    assert code == 0 and "embedded 1 " in err, err


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncated", "is damaged: it starts as a zip archive (as torch.save writes) but its directory"),
        ("random", "is not a PyTorch checkpoint: it is neither a zip archive nor a pickle"),
        ("pickle", "is damaged or not a PyTorch checkpoint: torch.load cannot read it (UnpicklingError: "),
    ],
)
def test_a_damaged_checkpoint_is_one_whole_line_naming_the_file(
    tmp_path: Path,
    tiny_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
    expected: str,
) -> None:
    """Defect 17: torch's messages were cut mid-sentence at 200 characters; say what is wrong."""
    import random

    from tests.conftest import write_image
    from tests.helpers import cli

    rng = random.Random(3)
    body = {
        "truncated": tiny_checkpoint.read_bytes()[:3000],
        "random": bytes([0xA5]) + rng.randbytes(4000),
        "pickle": b"\x80\x02" + bytes([0x2D]) + rng.randbytes(100),
    }[damage]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(body)
    write_image(tmp_path / "pool" / "a.png", seed=1)
    code, out, err = cli(
        capsys,
        "--store",
        str(tmp_path / "store"),
        "embed",
        str(tmp_path / "pool"),
        "-m",
        str(bad),
        "--workers",
        "0",
    )
    assert (code, out) == (1, "")
    (line,) = err.strip().splitlines()  # no traceback without --verbose
    assert line.startswith(f"alselect: error: {bad} ") and expected in line, line
    assert "If you are seeing this error" not in line and not line.endswith("is")
