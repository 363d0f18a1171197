"""Preprocessing settings: where they come from (checkpoint metadata, CLI overrides, defaults)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from alselect.errors import CheckpointError, UsageError
from alselect.limits import MAX_IMAGE_SIZE, check_image_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
RESIZE_MODES = ("crop", "letterbox")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a ``[3, image_size, image_size]`` model input, RGB, normalised.

    ``resize="crop"`` (classification): shorter side resized to ``resize_size``, centre crop
    ``image_size``. ``resize="letterbox"`` (detection, segmentation): the whole image, longer side
    resized to ``image_size``, placed top-left and padded to a square with the ``mean`` colour (so
    padding normalises to 0); ``resize_size`` is ignored. ``mean``/``std`` apply to pixel values
    scaled to [0, 1].
    """

    image_size: int = DEFAULT_IMAGE_SIZE
    resize_size: int = DEFAULT_IMAGE_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "crop"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise UsageError(f"resize mode must be crop or letterbox, got {self.resize!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        if self.resize == "crop":  # the original layout: model keys of overridden settings stay the same
            del data["resize"]
        return data

    def letterboxed(self, image_size: int) -> Preprocess:
        """The same normalisation, letterboxed to ``image_size``."""
        return replace(self, image_size=image_size, resize_size=image_size, resize="letterbox")

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any] | None) -> Preprocess:
        """Read ``image_size``, ``resize_size``, ``mean``, ``std`` from checkpoint metadata."""
        if not meta:
            return cls()
        try:
            size = int(meta.get("image_size", DEFAULT_IMAGE_SIZE))
            resize = int(meta.get("resize_size", size))
            mean = _triple(meta.get("mean", IMAGENET_MEAN), "mean")
            std = _triple(meta.get("std", IMAGENET_STD), "std")
            if not 1 <= size <= MAX_IMAGE_SIZE:
                raise ValueError(f"image_size {size} is outside 1..{MAX_IMAGE_SIZE}")
            mode = str(meta.get("resize", "crop"))
            if mode not in RESIZE_MODES:
                raise ValueError(f"resize must be crop or letterbox, got {mode!r}")
        except (TypeError, ValueError, UsageError) as exc:
            raise CheckpointError(f"invalid preprocessing metadata in checkpoint: {exc}") from exc
        if mode == "letterbox":
            resize = size
        return cls(image_size=size, resize_size=max(resize, size), mean=mean, std=std, resize=mode)

    def override(
        self,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> Preprocess:
        """Apply command-line overrides; a new ``image_size`` keeps the resize/crop ratio."""
        size, resize = self.image_size, self.resize_size
        if image_size is not None:
            check_image_size(image_size)
            resize = round(image_size * self.resize_size / self.image_size)
            size = image_size
        new_mean = _triple(mean, "--mean") if mean is not None else self.mean
        new_std = _triple(std, "--std") if std is not None else self.std
        return Preprocess(
            image_size=size, resize_size=max(resize, size), mean=new_mean, std=new_std, resize=self.resize
        )


def _triple(values: Any, what: str) -> tuple[float, float, float]:
    items = [float(v) for v in values]
    if len(items) == 1:
        items = items * 3
    if len(items) != 3:
        raise UsageError(f"{what} needs 1 or 3 numbers, got {len(items)}")
    if what in {"std", "--std"} and any(v <= 0 for v in items):
        raise UsageError(f"{what} values must be positive")
    return (items[0], items[1], items[2])


def parse_triple(text: str | None, what: str) -> tuple[float, float, float] | None:
    """Parse ``"R,G,B"`` (or one number for all channels) from the command line."""
    if text is None:
        return None
    try:
        return _triple([p for p in text.split(",") if p.strip()], what)
    except ValueError as exc:
        raise UsageError(f"{what} expects numbers like 0.485,0.456,0.406: {exc}") from exc
