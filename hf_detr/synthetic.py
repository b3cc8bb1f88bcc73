"""Built-in synthetic detection data: images of shapes, written as a local COCO folder (splits "train" and
"val") that `hf_detr.data.load_coco_folder` reads like any other. Two generators (`SYNTHETIC_STYLES`): "shapes",
the set the built-in recipe was tuned on, and "clutter", other shapes, sizes and counts on a cluttered
background, to check a recipe on data it was not tuned on."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import PIL.ImageDraw

# Sparse ids on purpose, so the id <-> label mapping is exercised as with COCO's 1..90.
SYNTHETIC_CATEGORIES = {"rectangle": 1, "ellipse": 3, "triangle": 7, "cross": 12}
# The "clutter" style's shapes: other names and ids than the first set's, so the two sets never share a label.
CLUTTER_CATEGORIES = {"star": 16, "ring": 19, "diamond": 25, "bar": 30}

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), inclusive pixels


def _draw_shape(shape: str, box: Box, size: int, rng: np.random.Generator) -> np.ndarray:
    """Bool mask ``[size,size]`` of one shape inscribed in ``box`` = (x0, y0, x1, y1) inclusive."""
    mask = PIL.Image.new("L", (size, size), 0)
    draw = PIL.ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "rectangle":
        draw.rectangle(box, fill=1)
    elif shape == "ellipse":
        draw.ellipse(box, fill=1)
    elif shape == "triangle":
        apex = x0 + rng.uniform(0.2, 0.8) * (x1 - x0)
        tip, base = (y0, y1) if rng.random() < 0.5 else (y1, y0)  # pointing up or down
        draw.polygon([(apex, tip), (x0, base), (x1, base)], fill=1)
    elif shape == "cross":
        tx, ty = max(2, (x1 - x0) // 3), max(2, (y1 - y0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((x0, cy - ty // 2, x1, cy + ty // 2), fill=1)
        draw.rectangle((cx - tx // 2, y0, cx + tx // 2, y1), fill=1)
    elif shape == "star":  # five points at a random turn; the inner corners at 40-50% of the outer radius
        turn, inner = rng.uniform(0, 2 * np.pi), rng.uniform(0.4, 0.5)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        angles = turn + np.arange(10) * np.pi / 5
        xs, ys = cx + radii * np.cos(angles) * (x1 - x0) / 2, cy + radii * np.sin(angles) * (y1 - y0) / 2
        draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=1)
    elif shape == "ring":  # an annulus, 20-30% of the smaller side thick (2 pixels at least)
        thick = max(2, round(min(x1 - x0, y1 - y0) * rng.uniform(0.2, 0.3)))
        draw.ellipse(box, fill=1)
        draw.ellipse((x0 + thick, y0 + thick, x1 - thick, y1 - thick), fill=0)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=1)
    elif shape == "bar":  # a rod with round ends; its box is long and thin (`_clutter_size`)
        draw.rounded_rectangle(box, radius=min(x1 - x0, y1 - y0) // 2, fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SYNTHETIC_CATEGORIES) + list(CLUTTER_CATEGORIES)}")
    return np.asarray(mask, dtype=bool)


def _place(rng: np.random.Generator, size: int, placed: list[Box],
           sample_size: Callable[[], tuple[int, int]]) -> Box | None:  # fmt: skip
    """A box of ``sample_size()`` = (w, h) pixels anywhere in the image, covering at most a quarter of the smaller
    of itself and each box in ``placed`` (some overlap, but no shape mostly hidden); None after 20 tries."""
    for _attempt in range(20):
        w, h = sample_size()
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        box = (x0, y0, x0 + int(w) - 1, y0 + int(h) - 1)
        if all(_overlap(box, other) <= 0.25 for other in placed):
            return box
    return None


def _paint_object(image: np.ndarray, mask: np.ndarray, category_id: int, rng: np.random.Generator) -> dict:
    """Paint ``mask`` into ``image`` (float ``[size,size,3]``, in place) in a random colour that stands out from
    what lies under it; -> the object ``{"bbox" xywh pixels, "category_id", "area"}``."""
    background = image[mask].mean(axis=0)
    colour = rng.uniform(0, 255, 3)
    while np.abs(colour - background).sum() < 120:  # keep the shape visible
        colour = rng.uniform(0, 255, 3)
    image[mask] = colour + rng.normal(0, 8, (int(mask.sum()), 3))
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
    return {"bbox": bbox, "category_id": category_id, "area": float(mask.sum())}


def _synthetic_image(rng: np.random.Generator, size: int, shapes: Sequence[str], max_objects: int,
                     empty_fraction: float) -> tuple[np.ndarray, list[dict]]:  # fmt: skip
    """One image ``[size,size,3]`` uint8 and its objects ``{"bbox" xywh, "category_id", "area"}``.
    Colours are random for every object, so only the outline tells the class."""
    # Smooth random colour field plus pixel noise: a background that is not trivially uniform.
    field_ = cv2.resize(rng.uniform(30, 225, (4, 4, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    image = field_ + rng.normal(0, 12, (size, size, 3))
    n = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
    objects, placed = [], []
    for _ in range(n):
        box = _place(rng, size, placed, lambda: rng.integers(size * 0.15, size * 0.5, endpoint=True, size=2))
        if box is None:
            continue
        shape = str(rng.choice(list(shapes)))
        objects.append(_paint_object(image, _draw_shape(shape, box, size, rng), SYNTHETIC_CATEGORIES[shape], rng))
        placed.append(box)
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _clutter_size(rng: np.random.Generator, size: int, shape: str) -> tuple[int, int]:
    """(w, h) of a "clutter" object: its longer side 1/16-3/16 of the image side (8-24 px at 128) for 60% of
    them, 3/16-0.45 otherwise; bars 3-5 times as long as thick, the other shapes roughly as wide as high."""
    low, high = (size / 16, size * 3 / 16) if rng.random() < 0.6 else (size * 3 / 16, size * 0.45)
    long = max(6, round(rng.uniform(low, high)))
    if shape == "bar":
        short = max(3, round(long / rng.uniform(3, 5)))
        return (long, short) if rng.random() < 0.5 else (short, long)
    return long, max(6, round(long * rng.uniform(0.75, 1.0)))


def _clutter_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``[size,size,3]`` float: a base colour anywhere in RGB, slow colour drift, stripes of a random period and
    direction, soft blobs and thin lines: texture with edges, none of which is an object."""
    drift = cv2.resize(rng.uniform(-40, 40, (4, 4, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    image = rng.uniform(0, 255, 3).astype(np.float32) + drift
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    direction, period = rng.uniform(0, np.pi), rng.uniform(3, 16)
    stripes = np.sin((xx * np.cos(direction) + yy * np.sin(direction)) * 2 * np.pi / period)
    image += stripes[..., None] * rng.uniform(0, 30, 3).astype(np.float32)
    for _ in range(int(rng.integers(2, 9))):  # blurred spots: no outline to mistake for a shape's
        spot = np.zeros((size, size), np.float32)
        centre = tuple(int(c) for c in rng.integers(0, size, 2))
        axes = tuple(int(a) for a in rng.integers(2, max(3, size // 6), 2))
        cv2.ellipse(spot, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        spot = cv2.GaussianBlur(spot, (0, 0), float(rng.uniform(1.5, 4)))
        alpha = (spot / max(float(spot.max()), 1e-6) * rng.uniform(0.3, 0.8))[..., None]
        image = image * (1 - alpha) + rng.uniform(0, 255, 3).astype(np.float32) * alpha
    _draw_lines(image, rng, int(rng.integers(3, 11)))
    return image


def _draw_lines(image: np.ndarray, rng: np.random.Generator, count: int):
    """``count`` straight lines 1 pixel wide and at least a third of the image long, in random colours (in place)."""
    size = image.shape[0]
    for _ in range(count):
        start = rng.uniform(0, size, 2)
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(size / 3, size)
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        colour = rng.uniform(0, 255, 3).tolist()
        cv2.line(image, tuple(int(v) for v in start), tuple(int(v) for v in end), colour, 1, cv2.LINE_AA)


def _cluttered_image(rng: np.random.Generator, size: int, shapes: Sequence[str], max_objects: int,
                     empty_fraction: float) -> tuple[np.ndarray, list[dict]]:  # fmt: skip
    """One "clutter" image ``[size,size,3]`` uint8 and its objects ``{"bbox" xywh, "category_id", "area"}``:
    up to ``max_objects`` shapes, most of them small, on `_clutter_background`, a few lines drawn over them."""
    image = _clutter_background(rng, size)
    n = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_objects + 1))
    objects, placed = [], []
    for _ in range(n):
        shape = str(rng.choice(list(shapes)))
        box = _place(rng, size, placed, functools.partial(_clutter_size, rng, size, shape))
        if box is None:
            continue
        objects.append(_paint_object(image, _draw_shape(shape, box, size, rng), CLUTTER_CATEGORIES[shape], rng))
        placed.append(box)
    _draw_lines(image, rng, int(rng.integers(0, 4)))  # crossing the objects too: an edge is not an outline
    image += rng.normal(0, rng.uniform(4, 16), (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Intersection over the smaller box, inclusive pixel boxes (x0, y0, x1, y1)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    smaller = min((a[2] - a[0] + 1) * (a[3] - a[1] + 1), (b[2] - b[0] + 1) * (b[3] - b[1] + 1))
    return max(iw, 0) * max(ih, 0) / smaller


@dataclass(frozen=True)
class SyntheticStyle:
    """One generator of synthetic images: its categories (name -> id), its image function
    ``(rng, size, shapes, max_objects, empty_fraction) -> (pixels [size,size,3] uint8, objects)`` and the
    arguments `make_synthetic_coco` uses where it is given none."""

    categories: dict[str, int]
    draw_image: Callable[..., tuple[np.ndarray, list[dict]]]
    shapes: tuple[str, ...]  # the categories drawn
    max_objects: int  # 1..max_objects per image
    empty_fraction: float  # images with no object


SYNTHETIC_STYLES = {
    # What the built-in recipe was tuned on: 1-4 shapes of 15-50% of the image side on a smooth colour field.
    "shapes": SyntheticStyle(SYNTHETIC_CATEGORIES, _synthetic_image, ("rectangle", "ellipse", "triangle"), 4, 0.1),
    # A check that a recipe is not tuned to the first: other shapes, 1-20 per image, most of them small, on
    # varied background colours with stripes, soft blobs and lines that are not objects.
    "clutter": SyntheticStyle(CLUTTER_CATEGORIES, _cluttered_image, tuple(CLUTTER_CATEGORIES), 20, 0.05),
}


def make_synthetic_coco(
    root: str | Path,
    num_train: int = 512,
    num_val: int = 128,
    image_size: int = 128,
    shapes: Sequence[str] | None = None,
    max_objects: int | None = None,
    empty_fraction: float | None = None,
    seed: int = 0,
    style: str = "shapes",
) -> Path:
    """Write a COCO folder of JPEG shape images (splits "train" and "val") under ``root``; return it.

    ``style`` picks the generator (`SYNTHETIC_STYLES`); ``shapes``, ``max_objects`` and ``empty_fraction``
    default to that style's. Load the folder with ``load_coco_folder(root, "train")``. Deterministic for given
    arguments; a marker file with the arguments, written last, makes a second call with the same arguments a no-op.
    """
    if style not in SYNTHETIC_STYLES:
        raise ValueError(f"unknown synthetic style {style!r}; known: {list(SYNTHETIC_STYLES)}")
    kind = SYNTHETIC_STYLES[style]
    shapes = kind.shapes if shapes is None else tuple(shapes)
    max_objects = kind.max_objects if max_objects is None else max_objects
    empty_fraction = kind.empty_fraction if empty_fraction is None else empty_fraction
    if unknown := [s for s in shapes if s not in kind.categories]:
        raise ValueError(f"shapes {unknown} are not the {style!r} style's; its shapes: {list(kind.categories)}")
    root = Path(root)
    params = dict(style=style, num_train=num_train, num_val=num_val, image_size=image_size, shapes=list(shapes),
                  max_objects=max_objects, empty_fraction=empty_fraction, seed=seed)  # fmt: skip
    marker = root / "synthetic_done.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    marker.unlink(missing_ok=True)
    categories = [{"id": kind.categories[s], "name": s, "supercategory": "shape"} for s in shapes]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])  # per image: order-independent
            pixels, objects = kind.draw_image(rng, image_size, shapes, max_objects, empty_fraction)
            file_name = f"{i:06d}.jpg"
            PIL.Image.fromarray(pixels).save(root / split / file_name, quality=90)
            images.append({"id": i + 1, "file_name": file_name, "width": image_size, "height": image_size})
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0, **obj})
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    marker.write_text(json.dumps(params))
    return root


def synthetic_dataset(num_train: int, num_val: int, image_size: int = 128, style: str = "shapes") -> Path:
    """The built-in dataset (`make_synthetic_coco` of ``style``, seed 0) under $HF_DETR_CACHE (default
    ~/.cache/hf_detr), written by the first call: what scripts/train.py and scripts/benchmark_convergence.py
    train on. The folder is named by the style (but the first's) and the sizes, so no two sets share one."""
    cache = Path(os.environ.get("HF_DETR_CACHE", Path.home() / ".cache" / "hf_detr"))
    name = "synthetic" if style == "shapes" else f"synthetic-{style}"
    root = cache / f"{name}-{num_train}-{num_val}{'' if image_size == 128 else f'-{image_size}px'}"
    return make_synthetic_coco(root, num_train=num_train, num_val=num_val, image_size=image_size, seed=0, style=style)
