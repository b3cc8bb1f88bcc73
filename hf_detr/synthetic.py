"""Built-in synthetic detection data: images of shapes on a textured background, written as a local COCO
folder (splits "train" and "val") that `hf_detr.data.load_coco_folder` reads like any other."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import PIL.ImageDraw

# Sparse ids on purpose, so the id <-> label mapping is exercised as with COCO's 1..90.
SYNTHETIC_CATEGORIES = {"rectangle": 1, "ellipse": 3, "triangle": 7, "cross": 12}


def _draw_shape(shape: str, box: tuple[int, int, int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """Bool mask ``[size,size]`` of one shape inscribed in ``box`` = (x0, y0, x1, y1) inclusive."""
    mask = PIL.Image.new("L", (size, size), 0)
    draw = PIL.ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
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
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SYNTHETIC_CATEGORIES)}")
    return np.asarray(mask, dtype=bool)


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
        for _attempt in range(20):  # allow some overlap, but not hiding most of a shape
            w, h = rng.integers(size * 0.15, size * 0.5, endpoint=True, size=2)
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x0, y0, x0 + int(w) - 1, y0 + int(h) - 1)
            if all(_overlap(box, other) <= 0.25 for other in placed):
                break
        else:
            continue
        shape = str(rng.choice(list(shapes)))
        mask = _draw_shape(shape, box, size, rng)
        background = image[mask].mean(axis=0)
        colour = rng.uniform(0, 255, 3)
        while np.abs(colour - background).sum() < 120:  # keep the shape visible
            colour = rng.uniform(0, 255, 3)
        image[mask] = colour + rng.normal(0, 8, (int(mask.sum()), 3))
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
        objects.append({"bbox": bbox, "category_id": SYNTHETIC_CATEGORIES[shape], "area": float(mask.sum())})
        placed.append(box)
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Intersection over the smaller box, inclusive pixel boxes (x0, y0, x1, y1)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    smaller = min((a[2] - a[0] + 1) * (a[3] - a[1] + 1), (b[2] - b[0] + 1) * (b[3] - b[1] + 1))
    return max(iw, 0) * max(ih, 0) / smaller


def make_synthetic_coco(
    root: str | Path,
    num_train: int = 512,
    num_val: int = 128,
    image_size: int = 128,
    shapes: Sequence[str] = ("rectangle", "ellipse", "triangle"),
    max_objects: int = 4,
    empty_fraction: float = 0.1,
    seed: int = 0,
) -> Path:
    """Write a COCO folder of JPEG shape images (splits "train" and "val") under ``root``; return it.

    Load it with ``load_coco_folder(root, "train")``. Deterministic for given arguments; a marker file
    with the arguments, written last, makes a second call with the same arguments a no-op.
    """
    root = Path(root)
    params = dict(num_train=num_train, num_val=num_val, image_size=image_size, shapes=list(shapes),
                  max_objects=max_objects, empty_fraction=empty_fraction, seed=seed)  # fmt: skip
    marker = root / "synthetic_done.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    marker.unlink(missing_ok=True)
    categories = [{"id": SYNTHETIC_CATEGORIES[s], "name": s, "supercategory": "shape"} for s in shapes]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_index, i])  # per image: order-independent
            pixels, objects = _synthetic_image(rng, image_size, shapes, max_objects, empty_fraction)
            file_name = f"{i:06d}.jpg"
            PIL.Image.fromarray(pixels).save(root / split / file_name, quality=90)
            images.append({"id": i + 1, "file_name": file_name, "width": image_size, "height": image_size})
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0, **obj})
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    marker.write_text(json.dumps(params))
    return root


def synthetic_dataset(num_train: int, num_val: int, image_size: int = 128) -> Path:
    """The built-in dataset (`make_synthetic_coco`, seed 0) under $HF_DETR_CACHE (default ~/.cache/hf_detr),
    written by the first call: what scripts/train.py and scripts/benchmark_convergence.py train on."""
    cache = Path(os.environ.get("HF_DETR_CACHE", Path.home() / ".cache" / "hf_detr"))
    root = cache / f"synthetic-{num_train}-{num_val}{'' if image_size == 128 else f'-{image_size}px'}"
    return make_synthetic_coco(root, num_train=num_train, num_val=num_val, image_size=image_size, seed=0)
