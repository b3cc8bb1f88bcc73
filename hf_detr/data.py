"""Detection data sources for training: COCO folders, Hub datasets and built-in synthetic shapes
(`hf_detr.synthetic`, re-exported here), all as `datasets.Dataset` rows of one schema. `hf_detr.transforms`
turns those rows into model batches (annotation checks, DETR augmentation, `DetectionDataset`, `collate_fn`;
re-exported here).

Every source ends up with the Hub object-detection schema (as in ``cppe-5``), one row per image:

    image      datasets.Image (decoded lazily, from the file path for local folders)
    image_id   int
    width, height  int, pixels
    objects    {"id": [N] annotation ids, "bbox": [N,4] COCO xywh pixels,
                "category": [N] the dataset's own category ids (COCO: sparse 1..90),
                "area": [N], "iscrowd": [N]}

A `CategoryMap` translates category ids to the contiguous labels 0..K-1 the model predicts.

Bad data policy: structural errors in an annotation file (a missing key, a value of the wrong type,
an id beyond int64, a non-finite box, a repeated image id, a file name outside the split's folder or
under two image ids, an annotation whose image or category is not declared: `hf_detr.coco_checks`)
raise ValueError naming the file and the annotation and image ids: the file must be fixed, silently
changing the class set or the boxes would be worse. So do boxes in the other format than they are read
in and boxes of negative size (`hf_detr.box_format`), and class names given for a ClassLabel that names
its classes otherwise. Problems a training run can live with are fixed or skipped and counted in
`DataStats` by `hf_detr.transforms` (clipped boxes, boxes with no area, crowd boxes, unreadable image
files, images whose size is not the annotated one, images with more objects than the model's queries).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np

from .box_format import check_box_format
from .coco_checks import INT64_MAX, INT64_MIN, check_coco_json
from .images import UNREADABLE_IMAGE_ERRORS, displayed_size

# Re-exported: the training script gets everything data-related from this module.
from .synthetic import SYNTHETIC_CATEGORIES, SYNTHETIC_STYLES, make_synthetic_coco, synthetic_dataset  # noqa: F401
from .transforms import (  # noqa: F401
    DataStats,
    DetectionDataset,
    build_eval_transform,
    build_train_transform,
    build_transform,
    collate_fn,
    scaled_sizes,
)

logger = logging.getLogger(__name__)

OBJECT_FEATURES = {
    "id": datasets.Value("int64"),
    "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
    "category": datasets.Value("int64"),
    "area": datasets.Value("float32"),
    "iscrowd": datasets.Value("int64"),
}
DETECTION_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "image_id": datasets.Value("int64"),
        "width": datasets.Value("int64"),
        "height": datasets.Value("int64"),
        "objects": datasets.Sequence(OBJECT_FEATURES),  # stored as a dict of per-field lists
    }
)


@dataclass(frozen=True)
class CategoryMap:
    """Dataset category ids <-> contiguous labels 0..K-1 (label i is the i-th smallest id)."""

    category_ids: list[int]
    names: list[str]
    _labels: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.category_ids) != len(self.names):
            raise ValueError(f"{len(self.category_ids)} category ids but {len(self.names)} names")
        if list(self.category_ids) != sorted(set(self.category_ids)):
            raise ValueError(f"category ids must be sorted and unique, got {self.category_ids}")
        object.__setattr__(self, "_labels", {c: i for i, c in enumerate(self.category_ids)})

    @classmethod
    def from_coco(cls, categories: Sequence[Mapping[str, Any]]) -> CategoryMap:
        """From a COCO json ``categories`` list of ``{"id", "name"}``."""
        ordered = sorted(categories, key=lambda c: c["id"])
        return cls([int(c["id"]) for c in ordered], [str(c["name"]) for c in ordered])

    @classmethod
    def from_names(cls, names: Sequence[str]) -> CategoryMap:
        """From ClassLabel names: the ids already are the contiguous labels."""
        return cls(list(range(len(names))), list(names))

    @property
    def num_labels(self) -> int:
        return len(self.category_ids)

    @property
    def id2label(self) -> dict[int, str]:
        """Contiguous label -> name, for ``HfDetrConfig(id2label=...)``."""
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: label for label, name in enumerate(self.names)}

    def to_label(self, category_id: int) -> int:
        """Raises KeyError for an id not in the map."""
        return self._labels[int(category_id)]

    def to_category(self, label: int) -> int:
        return self.category_ids[int(label)]


class DetectionData(NamedTuple):
    dataset: datasets.Dataset
    categories: CategoryMap


def coco_folder_splits(root: str | Path) -> list[str]:
    """The splits of a COCO-layout folder: ``<split>`` of each ``root/annotations/instances_<split>.json``
    (COCO's own ``train2017``, ``val2017``; ``train``, ``val`` in hf_detr's synthetic folders)."""
    files = (Path(root) / "annotations").glob("instances_*.json")
    return sorted(file.name[len("instances_") : -len(".json")] for file in files if file.is_file())


def load_coco_folder(root: str | Path, split: str) -> DetectionData:
    """A COCO-layout folder (``root/annotations/instances_<split>.json``, images in ``root/<split>/``)
    as a Hub-schema dataset. Images without annotations are kept (empty ``objects``).

    The file is checked first (`check_coco_json`): any structural error raises ValueError naming the
    file and the image or annotation; then its boxes (`check_box_format`). A split the folder does not
    have is a FileNotFoundError listing the ones it has."""
    root = Path(root)
    ann_file = root / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise FileNotFoundError(
            f"no COCO annotation file {ann_file}: the splits of {root} are {coco_folder_splits(root)} "
            "(annotations/instances_<split>.json); name one with --train_split / --eval_split"
        )
    try:
        coco = json.loads(ann_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{ann_file} is not valid JSON: {err}") from None
    check_coco_json(coco, ann_file)
    categories = CategoryMap.from_coco(coco["categories"])
    images = sorted(coco["images"], key=lambda im: im["id"])
    objects: dict[int, dict[str, list]] = {im["id"]: {k: [] for k in OBJECT_FEATURES} for im in images}
    for ann in coco.get("annotations", ()):
        obj = objects[ann["image_id"]]
        w, h = ann["bbox"][2:]
        for key, value in (("id", ann["id"]), ("bbox", ann["bbox"]), ("category", ann["category_id"]),
                           ("area", ann.get("area", w * h)), ("iscrowd", int(ann.get("iscrowd", 0)))):  # fmt: skip
            obj[key].append(value)
    columns = {
        "image": [str(root / split / im["file_name"]) for im in images],  # a path: decoded on access
        "image_id": [im["id"] for im in images],
        "width": [im["width"] for im in images],
        "height": [im["height"] for im in images],
        "objects": [objects[im["id"]] for im in images],
    }
    dataset = datasets.Dataset.from_dict(columns, features=DETECTION_FEATURES)
    check_box_format(dataset, "xywh", str(ann_file), argument=None)
    return DetectionData(dataset, categories)


@dataclass(frozen=True)
class HubDefaults:
    bbox_format: str  # "xywh" (COCO) or "xyxy" (corners), pixels
    train_split: str
    eval_split: str


HUB_DATASETS = {
    "cppe-5": HubDefaults("xywh", "train", "test"),
    "rishitdagli/cppe-5": HubDefaults("xywh", "train", "test"),
    "detection-datasets/coco": HubDefaults("xyxy", "train", "val"),
}


# The names a split for training / for evaluation goes by, in order of preference.
TRAIN_SPLITS = ("train2017", "train")
EVAL_SPLITS = ("val2017", "val", "validation", "test")


def default_splits(name_or_path: str | Path) -> tuple[str, str]:
    """(training split, evaluation split) of a dataset, for when none is named: a COCO folder's own (see
    `coco_folder_splits`: the first of `TRAIN_SPLITS` / `EVAL_SPLITS` it has, else the first split whose name
    starts with "train" / "val"), a known Hub dataset's (`HUB_DATASETS`), else "train" / "validation". A
    split that is not there is reported, with the ones that are, when it is loaded."""
    if (Path(name_or_path) / "annotations").is_dir():
        splits = coco_folder_splits(name_or_path)

        def pick(preferred: tuple[str, ...], prefix: str) -> str:
            found = [name for name in preferred if name in splits] or [name for name in splits if name.startswith(prefix)]
            return found[0] if found else preferred[0]

        return pick(TRAIN_SPLITS, "train"), pick(EVAL_SPLITS, "val")
    known = HUB_DATASETS.get(str(name_or_path))
    return (known.train_split, known.eval_split) if known else ("train", "validation")


def load_hub_detection_dataset(
    name: str, split: str, bbox_format: str | None = None, categories: CategoryMap | None = None,
    config_name: str | None = None, **load_kwargs,
) -> DetectionData:  # fmt: skip
    """``datasets.load_dataset(name, config_name, split=split)`` normalised to the Hub schema above.

    ``bbox_format``: "xywh" or "xyxy" pixels; default from `HUB_DATASETS`, else "xywh".
    ``categories``: needed only when ``objects.category`` is not a ClassLabel (integer class ids: label i is
    ``categories``' i-th, e.g. `CategoryMap.from_names`); anything else is a ValueError naming the column.
    Given for a ClassLabel, it must be the ClassLabel's names (else ValueError naming both lists).
    The boxes are checked against the images (`check_box_format`): boxes that fit far better in the other
    format are a ValueError naming ``--bbox_format``.
    The common spellings of the object fields are read: ``bbox`` / ``bboxes``, ``category`` / ``label`` /
    ``labels`` / ``category_id``. Without ``width`` / ``height`` columns, they are read from the images'
    headers (EXIF orientation applied).
    Missing ``iscrowd`` becomes 0, missing ``area`` w*h, a missing annotation id (``detection-datasets/
    coco`` calls it ``bbox_id``) becomes ``row_index * 10_000 + j``. Extra columns are dropped.
    """
    bbox_format = bbox_format or (HUB_DATASETS[name].bbox_format if name in HUB_DATASETS else "xywh")
    if bbox_format not in ("xywh", "xyxy"):
        raise ValueError(f"bbox_format must be 'xywh' or 'xyxy', got {bbox_format!r}")
    ds = datasets.load_dataset(name, config_name, split=split, **load_kwargs)
    where = f"{name} ({split})"
    missing = {"image", "objects"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{where} lacks the columns {sorted(missing)} of the detection schema (columns: {ds.column_names})")
    obj_features = ds.features["objects"]  # a dict of per-field lists, or a list of per-object dicts
    obj_features = obj_features if isinstance(obj_features, dict) else obj_features.feature
    bbox_key = _spelling(obj_features, BBOX_SPELLINGS, where)
    category_key = _spelling(obj_features, CATEGORY_SPELLINGS, where)
    category_feature = getattr(obj_features[category_key], "feature", obj_features[category_key])
    if isinstance(category_feature, datasets.ClassLabel):
        declared = CategoryMap.from_names(category_feature.names)
        # The ClassLabel says which class each id is; names given as well must say the same, or one of the
        # two is wrong, and training on the given ones would teach a dog where the data says cat.
        if categories is not None and categories != declared:
            raise ValueError(
                f"{where}: the class names given (train.py --label_names) {categories.names} disagree with the names "
                f"of objects.{category_key}'s ClassLabel {declared.names} (label i is its i-th name): leave out "
                "--label_names to use the ClassLabel's, or fix the dataset's ClassLabel"
            )
        categories = declared
    if categories is None:
        if getattr(category_feature, "dtype", "").startswith(("int", "uint")):
            raise ValueError(
                f"{where}: objects.{category_key} holds integer class ids without class names (not a ClassLabel): "
                "name them, label i the i-th (train.py --label_names, or categories=CategoryMap.from_names([...]))"
            )
        else:
            raise ValueError(
                f"{where}: objects.{category_key} must hold class ids (a ClassLabel, or integers with "
                f"--label_names), got {category_feature}"
            )
    if not {"width", "height"} <= set(ds.column_names):
        ds = _with_image_sizes(ds, where)

    def normalise(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = []
        for objs, row in zip(batch["objects"], indices):
            if not isinstance(objs, Mapping):  # a list of per-object dicts -> dict of lists
                keys = objs[0].keys() if objs else (bbox_key, category_key)
                objs = {k: [o[k] for o in objs] for k in keys}
            try:
                boxes = np.asarray(objs[bbox_key], dtype=np.float64).reshape(-1, 4)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{name} ({split}) row {row}: objects.{bbox_key} must be [N, 4] numbers ({err})") from None
            iscrowd = objs.get("iscrowd") or [0] * len(boxes)
            if any(value not in (0, 1) or type(value) not in (int, bool) for value in iscrowd):
                raise ValueError(f"{name} ({split}) row {row}: objects.iscrowd must be 0/1 or bools, got {iscrowd}")
            if bbox_format == "xyxy":
                boxes[:, 2:] -= boxes[:, :2]
            n = len(boxes)
            ids = objs.get("id", objs.get("bbox_id")) or [row * 10_000 + j for j in range(n)]
            if any(not INT64_MIN <= int(i) <= INT64_MAX for i in ids):
                raise ValueError(f"{where} row {row}: objects.id must fit in 64 bits (stored as int64), got {ids}")
            out.append({
                "id": ids, "bbox": boxes.tolist(), "category": objs[category_key],
                "area": objs.get("area") or (boxes[:, 2] * boxes[:, 3]).tolist(),
                "iscrowd": [int(value) for value in iscrowd],
            })  # fmt: skip
        return {"objects": out}

    # Only the objects column goes through map (a new cache file); the image bytes are never rewritten.
    objects_features = datasets.Features({"objects": DETECTION_FEATURES["objects"]})
    objects = ds.select_columns(["objects"]).map(normalise, batched=True, with_indices=True, features=objects_features)
    if "image_id" not in ds.column_names:
        ds = ds.add_column("image_id", list(range(len(ds))))
    rest = ds.select_columns(["image", "image_id", "width", "height"])
    ds = datasets.concatenate_datasets([rest, objects], axis=1)
    for column in ("image_id", "width", "height"):
        if ds.features[column] != DETECTION_FEATURES[column]:
            try:
                ds = ds.cast_column(column, DETECTION_FEATURES[column])
            except (OverflowError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
                raise ValueError(f"{where}: column {column!r} must hold integers that fit in 64 bits (int64): {err}") from None
    check_box_format(ds, bbox_format, where)
    return DetectionData(ds, categories)


def default_num_workers() -> int:
    """DataLoader workers per process: the CPUs this process may use, shared by the processes of this
    machine (one left for the training step), 1 to 4; 0 on a single CPU, where workers gain nothing."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cpus < 2:
        return 0
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(4, max(1, cpus // processes - 1))


# The spellings of the `objects` fields found on the Hub, the first the schema's own.
BBOX_SPELLINGS = ("bbox", "bboxes")
CATEGORY_SPELLINGS = ("category", "label", "labels", "category_id")


def _spelling(fields: Mapping, spellings: tuple[str, ...], where: str) -> str:
    found = [name for name in spellings if name in fields]
    if not found:
        raise ValueError(f"{where}: objects has none of the fields {list(spellings)} (it has {sorted(fields)})")
    return found[0]


def _with_image_sizes(ds: datasets.Dataset, where: str) -> datasets.Dataset:
    """`width` / `height` columns read from the images' headers (EXIF orientation applied, as the images
    are decoded for training); an image whose header cannot be read gets 0 x 0, is warned about here and
    is skipped (and counted) as unreadable when it is decoded."""
    images = ds.cast_column("image", datasets.Image(decode=False))["image"]
    widths, heights = [], []
    for row, image in enumerate(images):
        try:
            width, height = displayed_size(image)
        except UNREADABLE_IMAGE_ERRORS as err:
            logger.warning(f"{where} row {row}: cannot read the image's size ({type(err).__name__}: {err}); it will be skipped")
            width = height = 0
        widths.append(width)
        heights.append(height)
    logger.info(f"{where}: no width / height columns, read from the {len(images)} images' headers")
    for column, values in (("width", widths), ("height", heights)):
        if column in ds.column_names:
            ds = ds.remove_columns(column)
        ds = ds.add_column(column, values)
    return ds


def is_missing_split(error: Exception) -> bool:
    """Whether `load_detection_dataset` failed because the dataset has no such split (a COCO folder
    without its annotation file, a Hub dataset without the split), not for another reason."""
    if isinstance(error, FileNotFoundError):
        return str(error).startswith("no COCO annotation file")
    return isinstance(error, ValueError) and str(error).startswith("Unknown split")


def load_detection_dataset(name_or_path: str | Path, split: str, **kwargs) -> DetectionData:
    """A local COCO folder if ``name_or_path/annotations`` exists, else a Hub dataset."""
    if (Path(name_or_path) / "annotations").is_dir():
        return load_coco_folder(name_or_path, split)
    return load_hub_detection_dataset(str(name_or_path), split, **kwargs)


class Splits(NamedTuple):
    train: datasets.Dataset
    eval: datasets.Dataset
    categories: CategoryMap
    train_split: str
    eval_split: str  # "<train split>[held out <fraction>]" when held out of the training split


def load_splits(
    name_or_path: str | Path, train_split: str | None = None, eval_split: str | None = None, *,
    train_val_split: float = 0.15, seed: int = 0, **kwargs,
) -> Splits:  # fmt: skip
    """A dataset's training and evaluation splits, by default its own (`default_splits`). A dataset without
    the evaluation split, when none was named, gives ``train_val_split`` of the training split instead
    (seeded), as transformers' examples do. ``kwargs`` go to `load_hub_detection_dataset` (a COCO folder
    takes none)."""
    default_train, default_eval = default_splits(name_or_path)
    train_name, eval_name = train_split or default_train, eval_split or default_eval
    train, categories = load_detection_dataset(name_or_path, train_name, **kwargs)
    try:
        val = load_detection_dataset(name_or_path, eval_name, **kwargs).dataset
    except (FileNotFoundError, ValueError) as err:
        if eval_split is not None or not is_missing_split(err):
            raise
        logger.warning(
            f"{name_or_path} has no {eval_name!r} split ({err}); holding out --train_val_split "
            f"{train_val_split} of {train_name!r} for evaluation (seed {seed})"
        )
        parts = train.train_test_split(test_size=train_val_split, seed=seed)
        train, val, eval_name = parts["train"], parts["test"], f"{train_name}[held out {train_val_split}]"
    return Splits(train, val, categories, train_name, eval_name)
