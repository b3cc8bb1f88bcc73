"""From Hub-schema rows (see `hf_detr.data`) to model batches: annotation checks (`prepare_targets`,
`DataStats`), DETR's augmentation, the torch `DetectionDataset` and `collate_fn`.

Boxes go in as COCO ``xywh`` pixels and come out as ``cxcywh`` normalised to 0..1 by the size of
the *transformed* image, which is what the matcher, the loss and transformers' DETR expect.

The recipe is DETR's (facebookresearch/detr ``datasets/coco.py``):

- train: horizontal flip (p=0.5), then with equal chance either
  (a) resize the shortest edge to one of ``scales`` with the longest edge capped at ``max_size``, or
  (b) resize the shortest edge to one of ``crop_resize_scales``, take a random crop whose height
      and width are each drawn from ``[crop_min, crop_max]``, then do (a);
- eval: resize the shortest edge to ``size`` with the longest edge capped at ``max_size``.

Then ImageNet normalisation. albumentations does the flip, the crop bookkeeping of boxes
(clipping, dropping boxes that fall outside the crop), normalisation and tensor conversion.
Two small transforms are written here because albumentations has no equivalent:
``DetrResize`` (``SmallestMaxSize`` has no cap on the longest edge, and chaining it with
``LongestMaxSize`` would upscale images whose longest edge is already short) and
``RandomSizeCrop`` (``RandomSizedCrop``/``RandomResizedCrop`` resize the crop to a fixed output
size, which DETR does not do: its crop keeps its own random height and width).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import albumentations as A
import cv2
import datasets
import numpy as np
import torch
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.pytorch import ToTensorV2

from .images import SIZE_MISMATCH, UNREADABLE, describe_image, read_example_image

if TYPE_CHECKING:
    from .data import CategoryMap

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DETR's defaults (800-pixel evaluation size).
DETR_SCALES = tuple(range(480, 801, 32))
DETR_MAX_SIZE = 1333
DETR_CROP_RESIZE_SCALES = (400, 500, 600)
DETR_CROP_SIZE = (384, 600)


def detr_resize_shape(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """DETR's size rule: the shortest edge becomes ``size`` unless that would make the longest edge
    exceed ``max_size``, in which case the longest edge becomes ``max_size``. Returns ``(h, w)``."""
    short, long = min(height, width), max(height, width)
    if max_size is not None and long * size / short > max_size:
        size = int(round(max_size * short / long))
    # At least one pixel per edge: for an extreme aspect ratio (e.g. 300x1) the rule gives 0.
    size = max(size, 1)
    if height <= width:
        return size, max(int(size * width / height), 1)
    return max(int(size * height / width), 1), size


class DetrResize(A.DualTransform):
    """Resize the shortest edge to a size drawn from ``scales`` (longest edge capped at ``max_size``).

    Boxes need no change: albumentations keeps them normalised to 0..1 between transforms.
    """

    def __init__(self, scales: Sequence[int], max_size: int | None = None, p: float = 1.0):
        super().__init__(p=p)
        self.scales = tuple(scales)
        self.max_size = max_size

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        size = self.py_random.choice(self.scales)
        return {"target_shape": detr_resize_shape(height, width, size, self.max_size)}

    def apply(self, img: np.ndarray, target_shape: tuple[int, int], **params: Any) -> np.ndarray:
        height, width = target_shape
        return cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scales", "max_size")


class RandomSizeCrop(BaseCrop):
    """Crop a random window whose height and width are each drawn from ``[min_size, max_size]``
    (capped at the image size); ``BaseCrop`` moves and clips the boxes."""

    def __init__(self, min_size: int, max_size: int, p: float = 1.0):
        super().__init__(p=p)
        self.min_size = min_size
        self.max_size = max_size

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        crop_h = self.py_random.randint(min(self.min_size, height), min(self.max_size, height))
        crop_w = self.py_random.randint(min(self.min_size, width), min(self.max_size, width))
        y0 = self.py_random.randint(0, height - crop_h)
        x0 = self.py_random.randint(0, width - crop_w)
        return {"crop_coords": (x0, y0, x0 + crop_w, y0 + crop_h)}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_size", "max_size")


class DetrTransform:
    """One example in, model-ready tensors out.

    Call with ``image`` (numpy ``[H,W,3]`` uint8 RGB), ``boxes`` (``[N,4]`` COCO xywh pixels,
    already inside the image), ``class_labels`` (``[N]`` contiguous ids) and optionally
    ``iscrowd`` (``[N]`` bool, carried along so crowd boxes can be transformed for evaluation).

    Returns a dict: ``pixel_values`` float32 ``[3,H',W']`` (ImageNet-normalised), ``boxes`` float32
    ``[M,4]`` cxcywh normalised by ``(W', H')``, ``class_labels`` int64 ``[M]``, ``iscrowd`` bool
    ``[M]``, ``size`` int64 ``(H', W')``. ``M <= N``: boxes left with no area (cropped away) drop out.
    """

    def __init__(self, spatial: list[A.BasicTransform], train: bool, seed: int | None = None):
        self.train = train
        self.compose = A.Compose(
            [*spatial, A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()],
            # clip: annotation boxes that poke out of the image by rounding are pulled back in.
            # min_width/min_height > 0: a box cropped to a line has no object left (DETR drops it too).
            bbox_params=A.BboxParams(
                format="coco", label_fields=["class_labels", "iscrowd"], clip=True,
                min_width=1e-3, min_height=1e-3,
            ),
        )
        self.set_seed(seed)

    def set_seed(self, seed: int | None) -> None:
        """Reseed the augmentation (``None``: from OS entropy). One shared stream for all steps:
        ``A.Compose(seed=...)`` would give every step its own generator with the *same* seed, so e.g.
        the flip and the scale choice would be correlated."""
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, class_labels: np.ndarray, iscrowd: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        class_labels = np.asarray(class_labels, dtype=np.int64).reshape(-1)
        iscrowd = np.zeros(len(boxes), bool) if iscrowd is None else np.asarray(iscrowd, bool).reshape(-1)
        out = self.compose(image=image, bboxes=boxes, class_labels=class_labels, iscrowd=iscrowd)
        pixel_values = out["image"]
        height, width = pixel_values.shape[-2:]
        xywh = torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4))
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        cxcywh = torch.cat([xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]], dim=1) / scale
        return {
            "pixel_values": pixel_values.float(),
            "boxes": cxcywh.clamp(0.0, 1.0),
            "class_labels": torch.as_tensor(np.asarray(out["class_labels"], dtype=np.int64)),
            "iscrowd": torch.as_tensor(np.asarray(out["iscrowd"], dtype=bool)),
            "size": torch.tensor([height, width]),
        }


def build_train_transform(
    scales: Sequence[int] = DETR_SCALES,
    max_size: int | None = DETR_MAX_SIZE,
    crop_resize_scales: Sequence[int] = DETR_CROP_RESIZE_SCALES,
    crop_size: tuple[int, int] = DETR_CROP_SIZE,
    seed: int | None = None,
) -> DetrTransform:
    """DETR's training augmentation (see module docstring); ``crop_size = (crop_min, crop_max)``."""
    resize = DetrResize(scales, max_size)
    resize_crop_resize = A.Sequential(
        [DetrResize(crop_resize_scales), RandomSizeCrop(*crop_size), DetrResize(scales, max_size)], p=1.0
    )
    spatial = [A.HorizontalFlip(p=0.5), A.OneOf([resize, resize_crop_resize], p=1.0)]
    return DetrTransform(spatial, train=True, seed=seed)


def build_eval_transform(size: int = 800, max_size: int | None = DETR_MAX_SIZE) -> DetrTransform:
    """Deterministic evaluation resize: shortest edge ``size``, longest edge at most ``max_size``."""
    return DetrTransform([DetrResize([size], max_size)], train=False)


def scaled_sizes(eval_size: int) -> dict[str, Any]:
    """DETR's sizes scaled from its 800-pixel evaluation size to ``eval_size`` (e.g. 128 for the
    synthetic data), keeping the same ratios; returns keyword arguments for both builders:
    ``{"train": {...}, "eval": {...}}``."""
    ratio = eval_size / 800

    def scale(x: int) -> int:
        return max(8, int(round(x * ratio)))

    scales = sorted({scale(s) for s in DETR_SCALES})
    max_size = scale(DETR_MAX_SIZE)
    return {
        "train": {
            "scales": scales,
            "max_size": max_size,
            "crop_resize_scales": [scale(s) for s in DETR_CROP_RESIZE_SCALES],
            "crop_size": (scale(DETR_CROP_SIZE[0]), scale(DETR_CROP_SIZE[1])),
        },
        "eval": {"size": eval_size, "max_size": max_size},
    }


def build_flip_transform(size: int, max_size: int | None = None, seed: int | None = None) -> DetrTransform:
    """Horizontal flip + the evaluation resize: a light recipe for small synthetic data, where DETR's
    multi-scale crops mostly slow a model trained from scratch down."""
    return DetrTransform([A.HorizontalFlip(p=0.5), DetrResize([size], max_size)], train=True, seed=seed)


AUGMENTATIONS = ("detr", "flip")


def build_transform(
    train: bool, image_size: int = 800, max_size: int | None = None, seed: int | None = None, augmentation: str = "detr"
) -> DetrTransform:
    """DETR's recipe scaled to an evaluation size of ``image_size`` (see `scaled_sizes`); ``max_size``
    (default: scaled from 1333) caps the longest edge. Match the image processor's
    ``{"shortest_edge": image_size, "longest_edge": max_size}`` so evaluation sees what inference sees.
    ``augmentation``: "detr" (flip, multi-scale, random crops) or "flip" (`build_flip_transform`)."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
    sizes = scaled_sizes(image_size)
    if max_size is not None:
        sizes["train"]["max_size"] = sizes["eval"]["max_size"] = max_size
    if train and augmentation == "flip":
        return build_flip_transform(image_size, sizes["eval"]["max_size"], seed=seed)
    if train:
        return build_train_transform(**sizes["train"], seed=seed)
    return build_eval_transform(**sizes["eval"])


@dataclass
class DataStats:
    """What the annotation checks and the image loader fixed or skipped (print it in a run summary).

    The annotation counts are made once, in the process that builds the `DetectionDataset`, without
    decoding images. ``skipped_images`` and ``size_mismatch`` are counted where images are decoded:
    DataLoader workers mark them in one shared-memory tensor, so they cover all workers; they count
    distinct images (not once per epoch), among those read so far.
    """

    images: int = 0
    images_without_objects: int = 0  # kept: they teach the model "no object" (empty targets)
    objects: int = 0  # boxes kept as targets
    clipped: int = 0  # boxes partly outside the image, clipped to it
    dropped_zero_area: int = 0  # boxes with width or height <= 0 (after clipping), dropped
    crowd_ignored: int = 0  # iscrowd boxes: not targets; kept in "crowd_boxes" for evaluation
    skipped_images: int = 0  # image files that could not be read; their examples are dropped
    size_mismatch: int = 0  # images whose decoded size differs from their width/height; dropped too
    # images with more objects than the model has queries (`DetectionDataset.check_num_queries`): the
    # matcher pairs each query with one object, so the rest go unlearned in that image
    images_over_num_queries: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def prepare_targets(dataset: datasets.Dataset, categories: CategoryMap) -> tuple[list[dict], DataStats]:
    """Check and clean every image's annotations, without decoding images.

    Returns one dict per row: ``image_id``, ``boxes`` float32 [N,4] COCO xywh pixels inside the
    image with positive size, ``class_labels`` int64 [N] contiguous, ``iscrowd`` bool [N]; and the
    counts. An unknown category id or a box with a non-finite coordinate raises ValueError naming the
    annotation and image ids; a split without any box is warned about. (Rows may repeat an image,
    e.g. to oversample it: each row keeps its own boxes.)
    """
    stats, targets = DataStats(), []
    view = dataset.select_columns(["image_id", "width", "height", "objects"])
    for batch in view.iter(batch_size=1000):
        for image_id, width, height, objs in zip(batch["image_id"], batch["width"], batch["height"], batch["objects"]):
            boxes = np.asarray(objs["bbox"], dtype=np.float64).reshape(-1, 4)
            finite = np.isfinite(boxes).all(axis=1)
            if not finite.all():
                j = int(np.argmin(finite))
                raise ValueError(
                    f"annotation {objs['id'][j]} (image {image_id}): bbox must be 4 finite numbers "
                    f"[x, y, width, height], got {boxes[j].tolist()}"
                )
            corners = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
            clipped = np.clip(corners, 0, [width, height, width, height])
            size = clipped[:, 2:] - clipped[:, :2]
            keep = (size > 0).all(axis=1)
            stats.dropped_zero_area += int((~keep).sum())
            stats.clipped += int((keep & (clipped != corners).any(axis=1)).sum())
            labels = []
            for ann_id, category in zip(np.asarray(objs["id"])[keep], np.asarray(objs["category"])[keep]):
                try:
                    labels.append(categories.to_label(category))
                except KeyError:
                    raise ValueError(
                        f"annotation {ann_id} (image {image_id}): category id {category} "
                        f"not in {categories.category_ids}"
                    ) from None
            iscrowd = np.asarray(objs["iscrowd"], dtype=bool).reshape(-1)[keep]
            stats.crowd_ignored += int(iscrowd.sum())
            stats.objects += int((~iscrowd).sum())
            stats.images += 1
            stats.images_without_objects += int(not (~iscrowd).any())
            targets.append({
                "image_id": int(image_id),
                "boxes": np.concatenate([clipped[keep, :2], size[keep]], axis=1).astype(np.float32),
                "class_labels": np.asarray(labels, dtype=np.int64),
                "iscrowd": iscrowd,
            })  # fmt: skip
    if stats.images and not stats.objects:
        logger.warning(
            "none of the %d images has a box to learn from (no annotations, or only crowd / zero-area ones): "
            "a model trained on this split only learns 'no object'", stats.images
        )
    return targets, stats


class DetectionDataset(torch.utils.data.Dataset):
    """Hub-schema rows -> ``{"pixel_values": [3,H,W], "labels": {...}}`` for `collate_fn`, or None
    when the image file cannot be read or its size is not the row's width x height (warned once,
    counted in ``stats.skipped_images`` / ``stats.size_mismatch``). Images are decoded by
    `decode_image`: EXIF orientation applied, 16-bit greyscale scaled to 8 bits.

    ``labels``: ``class_labels`` Long[N], ``boxes`` Float[N,4] cxcywh normalised to 0..1 by the
    transformed size (crowd boxes excluded), ``image_id`` Long[], ``orig_size`` and ``size`` Long[2]
    as (h, w). With an eval transform (``transform.train`` False) also ``crowd_boxes`` and
    ``crowd_class_labels`` in the same formats.
    """

    def __init__(
        self, dataset: datasets.Dataset, categories: CategoryMap, transform: DetrTransform, seed: int | None = None
    ):
        # seed: with a seed, the augmentation of each example is drawn from (seed, epoch, index) alone,
        # so it does not depend on DataLoader workers or on where a resumed run starts; call
        # `set_epoch` before each epoch. Without one, each worker draws from its own stream.
        self.seed, self.epoch = seed, 0
        # decode=False: we decode ourselves, so an unreadable file can be named and skipped.
        self.dataset = dataset.cast_column("image", datasets.Image(decode=False))
        self.categories = categories
        self.transform = transform
        self.targets, self._stats = prepare_targets(dataset, categories)
        # Per image: 0, or why it was not used (UNREADABLE, SIZE_MISMATCH). Shared memory, so images
        # marked in DataLoader worker processes are seen here.
        self.image_status = torch.zeros(len(dataset), dtype=torch.uint8).share_memory_()
        self._worker_id: int | None = None

    @property
    def stats(self) -> DataStats:
        return self.stats_for(self.image_status)

    def stats_for(self, image_status: torch.Tensor) -> DataStats:
        """The counts with the given per-image status (e.g. merged over processes: the elementwise max
        of every process's ``image_status``)."""
        return dataclasses.replace(
            self._stats,
            skipped_images=int((image_status == UNREADABLE).sum()),
            size_mismatch=int((image_status == SIZE_MISMATCH).sum()),
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def check_num_queries(self, num_queries: int) -> int:
        """Count (in ``stats.images_over_num_queries``) and warn about the images with more objects, crowd
        boxes aside, than ``num_queries`` (the model's ``config.num_queries``): the matcher pairs each query
        with at most one object, so in those images the objects beyond it are never learned. -> the count."""
        counts = np.array([int((~target["iscrowd"]).sum()) for target in self.targets], dtype=np.int64)
        over = np.flatnonzero(counts > num_queries)
        self._stats = dataclasses.replace(self._stats, images_over_num_queries=len(over))
        if len(over):
            most = int(over[np.argmax(counts[over])])
            examples = ", ".join(f"image {self.targets[i]['image_id']} ({counts[i]})" for i in over[:5])
            logger.warning(
                "%d training images have more objects than the model's %d queries (num_queries), e.g. %s: the objects "
                "beyond %d in an image are never matched, so never learned; the most, %d, are in image %s. Give the "
                "model more queries (train.py --config_overrides num_queries=N)",
                len(over), num_queries, examples, num_queries, counts[most], self.targets[most]["image_id"],
            )  # fmt: skip
        return len(over)

    def _load_image(self, index: int, image_id: int) -> np.ndarray | None:
        """``[H,W,3]`` uint8 RGB, or None (warned once and counted) if the file is missing or corrupt
        or its size is not the row's width x height."""
        row = self.dataset[index]  # image: {"path", "bytes"}, not decoded yet
        rgb, status, why = read_example_image(row["image"], row["width"], row["height"])
        if rgb is None:
            if not self.image_status[index]:
                what = "unreadable image" if status == UNREADABLE else "image"
                logger.warning("skipping %s %s: %s", what, describe_image(row["image"], image_id), why)
            self.image_status[index] = status
            return None
        return np.asarray(rgb)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        worker = torch.utils.data.get_worker_info()
        if self.seed is not None:
            self.transform.set_seed(int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]))
        elif worker is not None and self._worker_id != worker.id:
            # Workers start as copies of one augmentation RNG; give each its own (torch's per-worker seed).
            self._worker_id = worker.id
            self.transform.set_seed(worker.seed)
        target = self.targets[index]
        image = self._load_image(index, target["image_id"])
        if image is None:
            return None
        crowd = target["iscrowd"]
        if self.transform.train:  # crowd boxes are never training targets
            boxes, class_labels, crowd = target["boxes"][~crowd], target["class_labels"][~crowd], crowd[~crowd]
        else:
            boxes, class_labels = target["boxes"], target["class_labels"]
        out = self.transform(image, boxes, class_labels, crowd)
        crowd = out["iscrowd"]
        labels = {
            "class_labels": out["class_labels"][~crowd],
            "boxes": out["boxes"][~crowd],
            "image_id": torch.tensor(target["image_id"]),
            "orig_size": torch.tensor(image.shape[:2]),
            "size": out["size"],
        }
        if not self.transform.train:
            labels["crowd_class_labels"], labels["crowd_boxes"] = out["class_labels"][crowd], out["boxes"][crowd]
        return {"pixel_values": out["pixel_values"], "labels": labels}


def collate_fn(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Pad a list of `DetectionDataset` examples to one batch; unreadable (None) examples are dropped
    (they were counted when detected). Returns None if no example is left: skip such a batch.

    ``pixel_values`` [B,3,H,W] zero-padded at the bottom/right to the largest H and W of the batch,
    ``pixel_mask`` Long[B,H,W] (1 = real pixel, 0 = padding), ``labels`` list of B dicts.
    """
    batch = [example for example in batch if example is not None]
    if not batch:
        return None
    height = max(ex["pixel_values"].shape[1] for ex in batch)
    width = max(ex["pixel_values"].shape[2] for ex in batch)
    pixel_values = torch.zeros(len(batch), 3, height, width)
    pixel_mask = torch.zeros(len(batch), height, width, dtype=torch.long)
    for i, ex in enumerate(batch):
        _, h, w = ex["pixel_values"].shape
        pixel_values[i, :, :h, :w] = ex["pixel_values"]
        pixel_mask[i, :h, :w] = 1
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": [ex["labels"] for ex in batch]}
