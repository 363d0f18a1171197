"""COCO JSON (``instances_*.json``, as CVAT's "COCO 1.0" export and many tools write it).

Each entry of ``images`` is one record, named by ``file_name``. Its class is the category all its
annotations share; annotations of several categories leave it labeled without a class (a detection
image of a cat and a dog has no single class). An image without annotations is no label.
"""

from __future__ import annotations

from typing import Any

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
class CocoReader(AnnotationReader):
    name = "coco"
    priority = 20

    def detect(self, doc: Document) -> bool:
        value = doc.json
        return (
            isinstance(value, dict)
            and isinstance(value.get("images"), list)
            and isinstance(value.get("annotations"), list)
        )

    def read(self, doc: Document, options: ReadOptions) -> Annotations:
        doc.require_json("the COCO file")
        if not self.detect(doc):
            raise DataError("not a COCO JSON file: expected an object with 'images' and 'annotations' lists")
        value: dict[str, Any] = doc.json
        listed_categories = [c for c in value.get("categories") or [] if isinstance(c, dict)]
        names = {category.get("id"): class_name(category.get("name")) for category in listed_categories}
        blank_ids = {
            category.get("id") for category in listed_categories if blank_class(category.get("name"))
        }
        categories: dict[object, list[object]] = {}
        for annotation in value["annotations"]:
            if isinstance(annotation, dict):
                categories.setdefault(annotation.get("image_id"), []).append(annotation.get("category_id"))
        result = Annotations(self.name)
        mixed_count = 0
        unnamed = 0
        listed = set()
        for number, image in enumerate(value["images"], start=1):
            if not isinstance(image, dict):
                raise DataError(f"images[{number - 1}] of the COCO file is not an object")
            file_name = image.get("file_name")
            file_name = file_name if isinstance(file_name, str) and file_name else None
            image_id = image.get("id")
            listed.add(image_id)
            ref = file_name or f"image {image_id}"
            found = categories.get(image_id, [])
            if not found:
                result.skipped.append((ref, "not annotated"))
                continue
            if any(category in blank_ids for category in found):
                result.skipped.append((ref, BLANK_CLASS))
                continue
            unnamed += sum(1 for category in found if names.get(category) is None)
            label, mixed = single_class([names.get(category) for category in found])
            mixed_count += mixed
            result.records.append(LabelRecord(ref, path=file_name, label=label))
        orphans = sum(len(found) for image_id, found in categories.items() if image_id not in listed)
        result.notes += count_note(
            mixed_count, "image(s) have annotations of several categories and are labeled without a class"
        )
        result.notes += count_note(unnamed, "annotation(s) name a category id the file does not list")
        result.notes += count_note(orphans, "annotation(s) refer to an image id the file does not list")
        return result
