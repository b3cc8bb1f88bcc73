"""The checks of a COCO detection annotation file (`check_coco_json`), run by `hf_detr.data.load_coco_folder`
before anything is built from the file: its first structural error is a ValueError naming the file and the
image, annotation or category."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not a float or a string holding a number


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _is_box(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(_is_number(x) and math.isfinite(x) for x in value)


def _value(record: Any, key: str, where: str, check=_is_int, kind: str = "an integer") -> Any:
    """record[key], or a ValueError naming ``where``, the key and the type found."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: must be a JSON object, got {type(record).__name__} {record!r}")
    if key not in record:
        raise ValueError(f"{where}: missing {key!r} (keys: {sorted(record)})")
    value = record[key]
    if not check(value):
        raise ValueError(f"{where}: {key!r} must be {kind}, got {type(value).__name__} {value!r}")
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{where}: {key!r} must fit in 64 bits (ids and sizes are stored as int64), got {value}")
    return value


def check_coco_json(coco: Any, ann_file: str | Path) -> None:
    """Raise ValueError naming ``ann_file`` and the image, annotation or category of the first
    structural error of a COCO detection file: a missing key or a value of the wrong type (ids are
    integers that fit in int64, ``file_name`` a string, ``width``/``height`` positive integers, ``bbox`` 4
    finite numbers, ``area`` a number, ``iscrowd`` 0/1 or a bool), a repeated image or category id, a
    ``file_name`` that leaves the split's folder (absolute, or through ``..``) or that two image ids share,
    an annotation whose image or category is not declared. ``annotations`` may be absent (image lists)."""
    if not isinstance(coco, Mapping):
        raise ValueError(f"{ann_file}: must hold a JSON object, got {type(coco).__name__}")
    for key in ("images", "categories") + (("annotations",) if "annotations" in coco else ()):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{ann_file}: {key!r} must be a list, got {type(coco.get(key)).__name__}")
    category_ids = set()
    for i, category in enumerate(coco["categories"]):
        where = f"categories[{i}] in {ann_file}"
        category_id = _value(category, "id", where)
        _value(category, "name", where, lambda v: isinstance(v, str), "a string")
        if category_id in category_ids:
            raise ValueError(f"{where}: category id {category_id} is declared twice")
        category_ids.add(category_id)
    file_names: dict[int, str] = {}
    image_of_file: dict[str, int] = {}
    for i, image in enumerate(coco["images"]):
        where = f"image {image.get('id') if isinstance(image, Mapping) else '?'} (images[{i}]) in {ann_file}"
        image_id = _value(image, "id", where)
        file_name = _value(image, "file_name", where, lambda v: isinstance(v, str), "a string")
        for key in ("width", "height"):
            _value(image, key, where, lambda v: _is_int(v) and v > 0, "a positive integer")
        if image_id in file_names:
            raise ValueError(
                f"{ann_file}: image id {image_id} is used by both {file_names[image_id]!r} and {file_name!r}; "
                "image ids must be unique"
            )
        file_names[image_id] = file_name
        path = os.path.normpath(file_name)
        if os.path.isabs(path) or path == "." or path.split(os.sep)[0] == "..":
            raise ValueError(
                f"{where}: file_name {file_name!r} is not a file inside the split's image folder; file names must be "
                "relative paths that stay inside it"
            )
        # One file under two ids would train as two images, each with part of the file's boxes (the others
        # then teach "no object" where there is one). Which id the file keeps is the file's author's call.
        if path in image_of_file:
            raise ValueError(
                f"{ann_file}: images {image_of_file[path]} and {image_id} are the same file {file_name!r}; list each "
                "image once, with all its annotations under one image id"
            )
        image_of_file[path] = image_id
    for i, ann in enumerate(coco.get("annotations", ())):
        if isinstance(ann, Mapping):
            where = f"annotation {ann.get('id')} (image {ann.get('image_id')}) in {ann_file}"
        else:
            where = f"annotations[{i}] in {ann_file}"
        _value(ann, "id", where)
        if _value(ann, "image_id", where) not in file_names:
            raise ValueError(f"{where}: image id not in the file's images")
        category_id = _value(ann, "category_id", where)
        if category_id not in category_ids:
            raise ValueError(f"{where}: category id {category_id} not in {sorted(category_ids)}")
        _value(ann, "bbox", where, _is_box, "[x, y, width, height]: 4 finite numbers")
        if "area" in ann:
            _value(ann, "area", where, lambda v: _is_number(v) and math.isfinite(v), "a finite number")
        if "iscrowd" in ann:
            _value(ann, "iscrowd", where, lambda v: v in (0, 1) and type(v) in (int, bool), "0, 1 or a bool")


__all__ = ["check_coco_json", "INT64_MIN", "INT64_MAX"]
