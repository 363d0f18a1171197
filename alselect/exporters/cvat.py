"""CVAT: a dataset manifest (``manifest.jsonl`` v1.1) listing the images in rank order.

With ``--sorting-method predefined`` CVAT keeps the manifest's order as frame order, so frame 0 is
rank 1. Each line after the two header lines holds ``name`` (the path relative to the share or
bucket root, without extension, ``/`` separators), ``extension`` (with the dot), and ``width``/
``height`` after EXIF orientation (swapped for orientations 5–8), as CVAT's own manifest tool
writes them. Lines are compact ASCII JSON, like CVAT's.
"""

from __future__ import annotations

import json
import posixpath
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from PIL import Image, UnidentifiedImageError

from alselect.errors import DataError
from alselect.exporters.base import (
    ExportContext,
    Exporter,
    ExportRow,
    not_utf8_reason,
    register_exporter,
    relative_to_root,
)
from alselect.uris import is_utf8

HEADER = ('{"version":"1.1"}', '{"type":"images"}')
EXIF_ORIENTATION = 274
HINT_FILE_LIST_LIMIT = 10  # beyond this the hint reads the file list from the manifest


def manifest_name(relpath: str) -> tuple[str, str]:
    """``(name, extension)`` as CVAT splits a relative path: ``a/b.c.jpg`` → ``("a/b.c", ".jpg")``."""
    name, extension = posixpath.splitext(relpath)
    return name, extension


def oriented_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` as displayed: swapped when the EXIF orientation is 5–8 (a 90° turn)."""
    from alselect.images import pillow_limit_off  # numpy: off the import path of 'export'

    try:
        # the header only: Pillow's bomb limit (a warning past 89 MP, an error past 179 MP) is for
        # decoding, and alselect applies its own --max-pixels when it decodes (alselect.images)
        with pillow_limit_off(), Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, UnidentifiedImageError, SyntaxError) as exc:
        raise DataError(
            f"cannot read the size of {path}: {exc}; run 'alselect score' again so that changed files "
            "are re-checked"
        ) from exc
    if isinstance(orientation, int) and orientation > 4:
        width, height = height, width
    return width, height


@register_exporter
class CvatExporter(Exporter):
    name = "cvat"
    summary = "CVAT dataset manifest (manifest.jsonl v1.1) in rank order, for --sorting-method predefined"
    reads = frozenset({"document_root"})  # names relative to the share root; no URIs

    def check(self, rows: Sequence[ExportRow], context: ExportContext) -> None:
        super().check(rows, context)
        seen: dict[str, str] = {}
        for row in rows:
            rel = self.relpath(row, context)
            name, _ = manifest_name(rel)
            if name in seen:
                raise DataError(
                    f"{seen[name]!r} and {rel!r} would collide in CVAT: both become item {name!r} (CVAT "
                    "names items by path without extension); rename one, or label one first with "
                    "'alselect label'"
                )
            seen[name] = rel

    def unwritable(self, row: ExportRow, context: ExportContext) -> str | None:
        if not is_utf8(self.relpath(row, context)):
            return not_utf8_reason("CVAT")
        return super().unwritable(row, context)

    def relpath(self, row: ExportRow, context: ExportContext) -> str:
        return relative_to_root(row, context.options.document_root)

    def write(
        self, rows: Iterable[ExportRow], stream: TextIO, context: ExportContext | None = None
    ) -> list[ExportRow]:
        context = context or ExportContext()
        for line in HEADER:
            stream.write(line + "\n")
        written = []
        for row in rows:
            name, extension = manifest_name(self.relpath(row, context))
            width, height = oriented_size(row.file)
            record = {"name": name, "extension": extension, "width": width, "height": height}
            stream.write(json.dumps(record, separators=(",", ":")) + "\n")
            written.append(row)
        return written

    def notes(self, rows: Sequence[ExportRow], context: ExportContext, written: Sequence[Path]) -> list[str]:
        if not rows:
            return []
        manifest = written[0].name if written and written[0].suffix == ".jsonl" else "manifest.jsonl"
        root = (context.options.document_root or Path(rows[0].folder)).resolve()
        files = [self.relpath(row, context) for row in rows]
        names = context.run.class_names
        # cvat-cli's --labels takes JSON text or the name of an existing JSON file (else it refuses
        # the command); without class names the user writes that file, or names a project instead
        labels_arg = shlex.quote(json.dumps([{"name": n} for n in names], ensure_ascii=False))
        create = (
            f"cvat-cli --server-host HOST --auth USER task create alselect-run-{context.run.id} share "
            f"{shlex.quote(manifest)} "
        )
        options = f" --labels {labels_arg if names else 'labels.json'} --sorting-method predefined"
        # CVAT's "share" is the folder mounted into its server and worker containers as the file
        # share (the cvat_share volume, /home/django/share); share resources are paths relative to it
        lines = [
            f"CVAT: {root} must be the folder mounted as CVAT's file share (manifest names are relative "
            f"to it; --ls-document-root sets another root); copy {manifest} to its top level. With "
            "--sorting-method predefined CVAT orders the frames as the manifest lists them "
            "(frame 0 = rank 1); the files listed must be exactly the manifest's:"
        ]
        if not names:
            lines.append(
                '  first write the task\'s labels to labels.json, e.g. [{"name": "cat"}, {"name": "dog"}] '
                "(or replace --labels with --project_id ID of a project that has them)"
            )
        if len(files) <= HINT_FILE_LIST_LIMIT:
            lines.append("  " + create + " ".join(shlex.quote(f) for f in files) + options)
        else:
            reader = (
                "import json,sys; f=open(sys.argv[1]); next(f); next(f); "
                "[print(r['name'] + r['extension']) for r in map(json.loads, f)]"
            )
            lines.append(f"  mapfile -t files < <(python3 -c {shlex.quote(reader)} {shlex.quote(manifest)})")
            lines.append("  " + create + '"${files[@]}"' + options)
        basenames = [posixpath.basename(f) for f in files]
        if len(set(basenames)) < len(basenames):
            lines.append(
                "  (some files share a base name in different folders: use share or cloud storage; "
                "cvat-cli's local upload keeps base names only and would mix them up)"
            )
        return lines
