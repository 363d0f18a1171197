"""Peak memory of decoding one large image: alselect's ``load_image`` next to a plain Pillow decode.

Each measurement runs in a fresh process and reports how far its peak resident set (``VmHWM`` in
``/proc/self/status``, Linux only) grew during the decode, so imports and the interpreter do not
count. The reference is what a script without alselect's care would do: ``Image.open(path)``,
``convert("RGB")``, ``resize`` to the target, with Pillow's bomb limit lifted so large files load.

    python benchmarks/decode_memory.py                     # 10000x9000 (90 MP) JPEG, PNG, RGBA PNG...
    python benchmarks/decode_memory.py --width 6000 --height 4000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

MEASURE = """
import sys
from pathlib import Path

def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

how, path = sys.argv[1], Path(sys.argv[2])
from PIL import Image
from alselect.images import load_image
from alselect.preprocess import Preprocess

before = peak()
if how == "alselect":
    load_image(path, Preprocess(image_size=224, resize_size=256))
else:
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as img:
        img.convert("RGB").resize((256, 256))
print(peak() - before)
"""


def make_images(folder: Path, width: int, height: int) -> dict[str, Path]:
    """Smooth synthetic content (compresses like a photo, not like noise) in several formats and modes."""
    y, x = np.mgrid[0:height, 0:width]
    base = ((x // 7 + y // 5) % 256).astype(np.uint8)
    rgb = np.dstack([base, base[::-1], 255 - base])
    files = {
        "JPEG RGB": ("img.jpg", Image.fromarray(rgb), {"quality": 85}),
        "PNG RGB": ("img.png", Image.fromarray(rgb), {"compress_level": 1}),
        "PNG RGBA": ("rgba.png", Image.fromarray(np.dstack([rgb, base])), {"compress_level": 1}),
        "PNG palette": (
            "p.png",
            Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE),
            {"compress_level": 1},
        ),
        "PNG 16-bit grey": (
            "grey16.png",
            Image.fromarray(base.astype(np.uint16) * 257),
            {"compress_level": 1},
        ),
        "TIFF RGB": ("img.tif", Image.fromarray(rgb), {}),
    }
    paths = {}
    for label, (name, image, options) in files.items():
        paths[label] = folder / name
        image.save(paths[label], **options)
    return paths


def measure(how: str, path: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, how, str(path)], capture_output=True, text=True, check=True, cwd=REPO
    )
    return int(done.stdout.strip())


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--width", type=int, default=10000)
    parser.add_argument("--height", type=int, default=9000)
    args = parser.parse_args()
    if not Path("/proc/self/status").exists():
        sys.exit("needs Linux /proc to read peak memory")
    megapixels = args.width * args.height / 1e6
    print(f"{args.width}x{args.height} ({megapixels:.0f} MP), target 224 px crop of a 256 px resize\n")
    print("| image | file MB | alselect peak MB | plain Pillow peak MB |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in make_images(Path(tmp), args.width, args.height).items():
            ours, plain = measure("alselect", path), measure("pillow", path)
            size = path.stat().st_size / 2**20
            print(f"| {label} | {size:.1f} | {ours / 2**20:.0f} | {plain / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
