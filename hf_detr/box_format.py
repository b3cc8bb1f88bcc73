"""Do a split's boxes fit its images in the format they were read in? (`check_box_format`, run by the
loaders of `hf_detr.data` on every split they load, for training and evaluation alike.)

Corners ``[x0, y0, x1, y1]`` read as COCO's ``[x, y, width, height]`` put most boxes partly outside their
image (x0 + x1 > width for every box right of the centre): training would clip them all, and the only
trace would be a count. The other way round, many boxes get a negative width. Neither is caught box by
box, so the split is read both ways and compared: when the format it was read in leaves far more boxes
outside their images (or without size) than the other would, that is an error naming the argument that
sets the format. A box with a negative width or height is an error naming it in any case.
"""

from __future__ import annotations

import logging

import datasets
import numpy as np

logger = logging.getLogger(__name__)

FORMATS = {"xywh": "[x, y, width, height]", "xyxy": "[x0, y0, x1, y1]"}
# A box may overhang its image by this much (a fraction of the image's side, at least a pixel): annotation
# tools round, and such boxes are clipped and counted as they always were.
OVERHANG = 0.02
# The format is called wrong when more than this fraction of the boxes do not fit read in it, and the other
# format leaves at most a quarter as many out.
WRONG_FRACTION = 0.25


def _boxes(dataset: datasets.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every box of a Hub-schema split: xywh [N, 4], its image's (width, height) [N, 2], annotation ids and
    image ids [N]. Images of unknown size (0 x 0: a header that could not be read) are left out."""
    boxes, sizes, ann_ids, image_ids = [], [], [], []
    view = dataset.select_columns(["image_id", "width", "height", "objects"])
    for batch in view.iter(batch_size=1000):
        for image_id, width, height, objs in zip(batch["image_id"], batch["width"], batch["height"], batch["objects"]):
            n = len(objs["bbox"])
            if n and width > 0 and height > 0:
                boxes.append(np.asarray(objs["bbox"], dtype=np.float64).reshape(-1, 4))
                sizes.append(np.tile([width, height], (n, 1)))
                ann_ids.extend(objs["id"])
                image_ids.extend([image_id] * n)
    if not boxes:
        return np.zeros((0, 4)), np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(boxes), np.concatenate(sizes).astype(np.float64), np.asarray(ann_ids), np.asarray(image_ids)


def _misfits(corners: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """[N] bool: boxes (xyxy pixels) with no size, or overhanging their image by more than `OVERHANG`."""
    slack = np.maximum(1.0, OVERHANG * sizes)
    inside = (corners[:, :2] >= -slack).all(1) & (corners[:, 2:] <= sizes + slack).all(1)
    return ~(inside & (corners[:, 2:] > corners[:, :2]).all(1))


def check_box_format(dataset: datasets.Dataset, bbox_format: str, where: str, argument: str | None = "--bbox_format") -> None:
    """Raise ValueError when the split's boxes (already converted to xywh from ``bbox_format``, "xywh" or
    "xyxy") fit their images much worse than the other format's reading would: the message names
    ``argument`` (None: the format is fixed, as COCO's), the counts of both readings and a box. Raise
    ValueError naming the annotation and image ids of a box with a negative width or height. Warn, naming
    ``argument``, when more than `WRONG_FRACTION` of the boxes leave their image whichever way they are read."""
    xywh, sizes, ann_ids, image_ids = _boxes(dataset)
    if not len(xywh):
        return
    raw = xywh if bbox_format == "xywh" else np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    as_given = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    other = "xyxy" if bbox_format == "xywh" else "xywh"
    as_other = raw if other == "xyxy" else np.concatenate([raw[:, :2], raw[:, :2] + raw[:, 2:]], 1)
    bad, bad_other = _misfits(as_given, sizes), _misfits(as_other, sizes)
    n, n_bad, n_other = len(raw), int(bad.sum()), int(bad_other.sum())
    read_as = f"{argument} {bbox_format} {FORMATS[bbox_format]}" if argument else f"COCO's {FORMATS['xywh']}"

    def example(i: int) -> str:
        width, height = sizes[i].astype(int)
        return f"annotation {ann_ids[i]} of image {image_ids[i]}: {raw[i].tolist()} in a {width}x{height} image"

    if n_bad > WRONG_FRACTION * n and n_other <= n_bad / 4:
        fix = f"pass {argument} {other}" if argument else f"convert them to {FORMATS['xywh']}"
        raise ValueError(
            f"{where}: read as {read_as}, {n_bad} of {n} boxes leave their image or have no "
            f"size (e.g. {example(int(np.argmax(bad)))}); read as {FORMATS[other]}, {n_other} do. The boxes look like "
            f"{FORMATS[other]}: {fix}"
        )
    negative = (xywh[:, 2:] < 0).any(1)
    if negative.any():
        raise ValueError(
            f"{where}: {example(int(np.argmax(negative)))} has a negative width or height read as {read_as} "
            f"({int(negative.sum())} such boxes in all); fix the annotation"
        )
    if n_bad > WRONG_FRACTION * n:
        logger.warning(
            f"{where}: {n_bad} of {n} boxes leave their image or have no size read as {read_as} "
            f"(e.g. {example(int(np.argmax(bad)))}), and {n_other} read as {FORMATS[other]}: training clips or drops "
            "them (counted in data_stats as clipped / dropped_zero_area); check the boxes' format"
        )


__all__ = ["check_box_format"]
