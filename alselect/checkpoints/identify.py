"""Say what a ``--model`` path is when it is not a checkpoint: a folder, a text file, another format.

"not a readable PyTorch checkpoint (invalid load key, 'n')" tells a user nothing; "is a text file
(it starts with 'name,label')" or "is a folder; it holds model.pt" does.
"""

from __future__ import annotations

import codecs
import os
import zipfile
from pathlib import Path

from alselect.errors import CheckpointError

# Files worth naming when a folder is passed instead of a file inside it.
CHECKPOINT_SUFFIXES = (".pt", ".pt2", ".pth", ".ckpt", ".bin", ".safetensors", ".onnx", ".jit", ".ts")
# (magic bytes at offset 0, what the file is): formats people mistake for a PyTorch checkpoint.
_SIGNATURES = (
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5?)"),
    (b"\x93NUMPY", "a NumPy array file (.npy)"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GGUF", "a GGUF model (llama.cpp)"),
    (b"\x08", "probably an ONNX model (alselect runs PyTorch checkpoints)"),
)


def check_checkpoint_path(path: Path) -> None:
    """Raise ``CheckpointError`` saying what ``path`` is unless it may be a checkpoint file."""
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file{_folder_hint(path)}")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} is a broken symlink")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a regular file: {path}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise CheckpointError(f"checkpoint is empty: {path}")
    what = foreign_format(head, path.suffix.lower())
    if what:
        raise CheckpointError(f"{path} is {what}, not a PyTorch checkpoint")
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is damaged: it starts as a zip archive (as torch.save writes) but its directory, "
            f"stored at the end, is missing or broken; the file is probably truncated ({size} bytes): "
            "copy or download it again"
        )


def foreign_format(head: bytes, suffix: str = "") -> str | None:
    """What a file starting with ``head`` is, when that is certainly not a PyTorch checkpoint."""
    if head.startswith(b"PK\x03\x04") or head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        return None  # zip archives (torch.save, .pt2, TorchScript) and legacy pickles
    if _is_safetensors(head):
        return "a safetensors file (load it and save a state_dict with torch.save)"
    for magic, what in _SIGNATURES:
        if head.startswith(magic) and (magic != b"\x08" or suffix == ".onnx"):
            return what
    if _is_text(head):
        first = head.split(b"\n", 1)[0].decode("utf-8", errors="replace").strip()
        return f"a text file (it starts with {first[:40]!r})"
    return None


def _is_safetensors(head: bytes) -> bool:
    """8-byte little-endian header length, then a JSON object."""
    return len(head) > 10 and head[8:10] in (b'{"', b"{'") and int.from_bytes(head[:8], "little") < 1 << 30


def _is_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut character is fine
    except UnicodeDecodeError:
        return False
    return True


def _folder_hint(path: Path) -> str:
    try:
        names = sorted(p.name for p in path.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
    except OSError:
        return ""
    if not names:
        return ""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"; it holds {shown}: pass one of them"
