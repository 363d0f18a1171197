"""CVAT for images 1.1 XML (``annotations.xml`` of a task or project export).

Each ``<image name=...>`` is one record; ``name`` is the path CVAT knows the image by (relative to
the task's data: ``--folder`` names that folder when it is not a scored one). The class is the
image-level ``<tag>`` label; without tags, the label all shapes share. An image with neither is no
label; several different labels leave it labeled without a class.
"""

from __future__ import annotations

from alselect.annotations.base import (
    BLANK_CLASS,
    AnnotationReader,
    Annotations,
    Document,
    LabelRecord,
    ReadOptions,
    blank_class,
    class_name,
    count_note,
    register_reader,
    single_class,
)
from alselect.errors import DataError


@register_reader
class CvatReader(AnnotationReader):
    name = "cvat"
    priority = 30

    def detect(self, doc: Document) -> bool:
        root = doc.xml
        return root is not None and root.tag == "annotations"

    def read(self, doc: Document, options: ReadOptions) -> Annotations:
        root = doc.require_xml("the CVAT XML export")
        if root is None or root.tag != "annotations":
            raise DataError("not a CVAT XML export: expected an <annotations> root element")
        images = root.findall("image")
        if not images and root.find("track") is not None:
            raise DataError("a CVAT for video export (tracks): export the task as CVAT for images 1.1")
        result = Annotations(self.name)
        mixed_count = 0
        for number, image in enumerate(images, start=1):
            name = image.get("name") or None
            ref = name or f"image {image.get('id', number)}"
            tags = [class_name(tag.get("label")) for tag in image.findall("tag")]
            shapes = [class_name(shape.get("label")) for shape in image if shape.tag != "tag"]
            if not tags and not shapes:
                result.skipped.append((ref, "not annotated"))
                continue
            if any(blank_class(item.get("label")) for item in image):
                result.skipped.append((ref, BLANK_CLASS))
                continue
            label, mixed = single_class(tags or shapes)
            mixed_count += mixed
            result.records.append(LabelRecord(ref, path=name, label=label))
        result.notes += count_note(
            mixed_count, "image(s) carry several different labels and are labeled without a class"
        )
        return result
