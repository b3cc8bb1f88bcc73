"""COCO box mAP through pycocotools' `COCOeval`, fed with image-processor outputs.

The numbers are pycocotools' own: ground truth is turned into an in-memory `pycocotools.coco.COCO`,
predictions go through `COCO.loadRes`, and `COCOeval(..., "bbox")` does the rest. Nothing here
re-implements matching or averaging.

Formats
- ground truth, Hub schema (one example per image): `{"image_id": int, "width": int, "height": int,
  "objects": {"id": [N], "bbox": [N,4] COCO xywh pixels, "category": [N] dataset category ids,
  "area": [N], "iscrowd": [N]}}` (a list of per-object dicts under "objects" works too).
- predictions, the output of `image_processor.post_process_object_detection(outputs, threshold,
  target_sizes)`: one `{"scores": [N], "labels": [N] contiguous labels, "boxes": [N,4] xyxy in
  original-image pixels}` per image (tensors or lists).

Typical use (also what `evaluate_model` does):

    evaluator = CocoEvaluator.from_examples(val_examples, label_to_category=category_map)
    for batch in loader:
        results = image_processor.post_process_object_detection(outputs, 0.0, target_sizes)
        evaluator.update(batch_image_ids, results)
    metrics = evaluator.compute()   # {"map": ..., "map_50": ..., ...}
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm.auto import tqdm

from .images import SIZE_MISMATCH, UNREADABLE, describe_image, read_example_image

logger = logging.getLogger(__name__)

# COCOeval.stats order: AP@[.5:.95], AP@.5, AP@.75, AP small/medium/large, AR@1, AR@10, AR@100,
# AR small/medium/large (AR by area at maxDets=100).
COCO_METRIC_NAMES = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)  # fmt: skip


def _objects_as_rows(objects: Mapping | Sequence) -> list[dict]:
    """Hub-schema `objects` (dict of lists) or a list of per-object dicts -> list of per-object dicts."""
    if isinstance(objects, Mapping):
        n = len(objects["bbox"])
        return [{key: values[i] for key, values in objects.items()} for i in range(n)]
    return list(objects)


def coco_from_examples(examples: Iterable[Mapping], categories: Iterable | None = None) -> COCO:
    """Build an in-memory `pycocotools.coco.COCO` ground truth from Hub-schema examples.

    Args:
        examples: one mapping per image with `image_id`, `width`, `height`, `objects` (see module
            docstring); an `image` column, if present, is not touched.
        categories: the dataset's categories, as ids or `{"id", "name"}` dicts. Categories listed here
            without any ground truth get precision -1 in COCOeval and so drop out of the means, as in
            pycocotools. Default: the categories seen in `examples`.

    Crowd objects (`iscrowd=1`) are kept: COCOeval uses them to ignore detections that land on them.
    A repeated image id raises ValueError naming it (its images' predictions would be scored as one).
    """
    images, annotations, seen, image_ids = [], [], set(), set()
    for example in examples:
        image_id = int(example["image_id"])
        if image_id in image_ids:
            raise ValueError(f"image id {image_id} is used by several examples; image ids must be unique")
        image_ids.add(image_id)
        images.append({"id": image_id, "width": int(example["width"]), "height": int(example["height"])})
        for obj in _objects_as_rows(example["objects"]):
            x, y, w, h = (float(v) for v in obj["bbox"])
            category = int(obj["category"])
            seen.add(category)
            annotations.append(
                {
                    # Renumbered from 1: COCOeval treats a matched gt id of 0 as "unmatched"
                    # (`np.logical_and(dtm, ...)`), and duplicate ids would collapse in `COCO.anns`.
                    # Insertion order is kept, so the numbers equal those with the original ids.
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "bbox": [x, y, w, h],
                    "category_id": category,
                    "area": float(obj["area"]) if obj.get("area") is not None else w * h,
                    "iscrowd": int(obj.get("iscrowd") or 0),
                }
            )
    if categories is None:
        categories = sorted(seen)
    cats = [c if isinstance(c, Mapping) else {"id": int(c), "name": str(c)} for c in categories]
    known = {c["id"] for c in cats}
    cats += [{"id": c, "name": str(c)} for c in sorted(seen - known)]

    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def _as_label_mapper(label_to_category: Any) -> Callable[[int], int]:
    """Callable, object with `.to_category` (data.CategoryMap), sequence/mapping, or None (identity)."""
    if label_to_category is None:
        return int
    if hasattr(label_to_category, "to_category"):
        return label_to_category.to_category
    if callable(label_to_category):
        return label_to_category
    return label_to_category.__getitem__


def _to_list(values: Any) -> list:
    return values.detach().cpu().tolist() if isinstance(values, torch.Tensor) else list(values)


def _num_processes() -> int:
    """Processes of the running accelerate job; 1 when no `PartialState` was ever created."""
    from accelerate.state import PartialState

    # Only look at an existing state: creating one here could initialise torch.distributed by accident.
    if not PartialState._shared_state:
        return 1
    return PartialState().num_processes


class CocoEvaluator:
    """Accumulates per-image detections and scores them with pycocotools' COCOeval (bbox).

    Args:
        coco_gt: ground truth as a `pycocotools.coco.COCO` (e.g. `COCO("instances_val2017.json")`
            or `coco_from_examples(...)`).
        label_to_category: contiguous label -> dataset category id; a callable, an object with
            `to_category` (`hf_detr.data.CategoryMap`), a list/dict (e.g. `hf_detr.labels.match_labels`'s),
            or None when labels already are category ids. A label it maps to None is a class the dataset
            does not have: its detections are left out.
        verbose: let pycocotools print its usual progress and summary table.
    """

    def __init__(self, coco_gt: COCO, label_to_category: Any = None, verbose: bool = False):
        self.coco_gt = coco_gt
        self.to_category = _as_label_mapper(label_to_category)
        self.verbose = verbose
        # image_id -> COCO result dicts for that image; dict order = order of first update.
        self.predictions: dict[int, list[dict]] = {}
        self.coco_eval: COCOeval | None = None  # kept after compute() for per-category inspection

    @classmethod
    def from_examples(
        cls, examples: Iterable[Mapping], categories: Iterable | None = None, **kwargs: Any
    ) -> CocoEvaluator:
        """`CocoEvaluator(coco_from_examples(examples, categories), **kwargs)`."""
        return cls(coco_from_examples(examples, categories), **kwargs)

    def update(self, image_ids: Iterable, results: Sequence[Mapping]) -> None:
        """Add the post-processed detections of a batch.

        Args:
            image_ids: [B] dataset image ids (ints or a tensor), aligned with `results`.
            results: [B] dicts with `scores` [N], `labels` [N] (contiguous), `boxes` [N,4] xyxy pixels
                of the original image; an image with N=0 still counts as evaluated.

        An image id seen before is ignored: data loaders that pad the last batch by repeating samples
        (accelerate's `even_batches`) would otherwise count those images twice.
        """
        for image_id, result in zip(_to_list(image_ids), results, strict=True):
            image_id = int(image_id)
            if image_id in self.predictions:
                continue
            detections = []
            for score, label, box in zip(
                _to_list(result["scores"]), _to_list(result["labels"]), _to_list(result["boxes"]), strict=True
            ):
                category = self.to_category(int(label))
                if category is None:  # a class the dataset does not have (`hf_detr.labels.match_labels`)
                    continue
                x0, y0, x1, y1 = (float(v) for v in box)
                detections.append(
                    {
                        "image_id": image_id,
                        "category_id": int(category),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],  # COCO xywh
                        "score": float(score),
                    }
                )
            self.predictions[image_id] = detections

    def gather(self) -> None:
        """Merge the predictions of all processes into every process (no-op in a single process).

        Uses `accelerate.utils.gather_object` when an accelerate `PartialState` with more than one
        process exists; duplicates (padding) are dropped by image id, keeping the first copy. Must be
        called on every process (it is a collective), which `compute()` does.
        """
        if _num_processes() <= 1:
            return
        from accelerate.utils import gather_object

        merged: dict[int, list[dict]] = {}
        for image_id, detections in gather_object(list(self.predictions.items())):
            merged.setdefault(image_id, detections)
        self.predictions = merged

    def compute(self, per_class: bool = False) -> dict[str, float]:
        """Gather across processes, run COCOeval, return the 12 COCO numbers (`COCO_METRIC_NAMES`); with
        `per_class`, also each category's AP@[.5:.95] and AR@100 over all areas, `map_<name>` and
        `mar_100_<name>` (the names of transformers' object-detection examples), averaged from COCOeval's own
        precision / recall arrays as its summary does (-1 for a category without ground truth).

        Evaluated images: those passed to `update` (all ground-truth images if `update` was never
        called), so a subset of a split can be scored against the full split's ground truth.

        No detections at all: `COCO.loadRes` cannot take an empty list, so an empty result set with
        the same images and categories is built instead and COCOeval still runs. Its semantics apply:
        0.0 for every metric whose area range has ground truth, -1.0 where it has none (e.g.
        `map_small` with no small objects), exactly as COCOeval reports them.

        Distributed: every process must call this (the gather is a collective); every process then
        runs COCOeval on the same merged predictions and returns the same dict, so the caller may
        log/save on the main process only without a broadcast.
        """
        self.gather()
        detections = [det for dets in self.predictions.values() for det in dets]
        output = io.StringIO()
        with contextlib.redirect_stdout(output) if not self.verbose else contextlib.nullcontext():
            if detections:
                # loadRes adds area/id/segmentation in place: keep our copies clean for a re-run.
                coco_dt = self.coco_gt.loadRes(copy.deepcopy(detections))
            else:
                coco_dt = COCO()
                coco_dt.dataset = {
                    "images": list(self.coco_gt.dataset["images"]),
                    "categories": copy.deepcopy(self.coco_gt.dataset["categories"]),
                    "annotations": [],
                }
                coco_dt.createIndex()
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            if self.predictions:
                coco_eval.params.imgIds = sorted(self.predictions)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        self.coco_eval = coco_eval
        metrics = {name: float(value) for name, value in zip(COCO_METRIC_NAMES, coco_eval.stats, strict=True)}
        if per_class:
            metrics |= self.per_class_metrics()
        return metrics

    def per_class_metrics(self) -> dict[str, float]:
        """`map_<name>` and `mar_100_<name>` per category of the last `compute` (area "all", 100 detections)."""
        params, evaluation = self.coco_eval.params, self.coco_eval.eval
        area, max_dets = params.areaRngLbl.index("all"), params.maxDets.index(100)
        metrics = {}
        for k, category_id in enumerate(params.catIds):
            name = self.coco_gt.cats[category_id]["name"]
            precision = evaluation["precision"][:, :, k, area, max_dets]
            recall = evaluation["recall"][:, k, area, max_dets]
            metrics[f"map_{name}"] = float(precision[precision > -1].mean()) if (precision > -1).any() else -1.0
            metrics[f"mar_100_{name}"] = float(recall[recall > -1].mean()) if (recall > -1).any() else -1.0
        return metrics

    def reset(self) -> None:
        """Forget all predictions (to evaluate again, e.g. after the next epoch)."""
        self.predictions = {}
        self.coco_eval = None


def _ground_truth_view(dataset: Any) -> Any:
    """The dataset without its image column, so building the ground truth decodes no images."""
    if hasattr(dataset, "select_columns"):  # datasets.Dataset
        keep = [c for c in ("image_id", "width", "height", "objects") if c in dataset.column_names]
        return dataset.select_columns(keep)
    return dataset


class _EvalCollate:
    """Decodes and preprocesses a batch of examples (a class, not a closure: DataLoader workers started by
    spawn, as on macOS, need it picklable)."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, examples: list[Mapping]) -> dict[str, Any]:
        images, image_ids, sizes, skipped = [], [], [], []
        for example in examples:
            image_id = int(example["image_id"])
            image, status, why = read_example_image(example["image"], example.get("width"), example.get("height"))
            if image is None:
                skipped.append((image_id, status, f"{describe_image(example['image'], image_id)}: {why}"))
                continue
            images.append(image)
            image_ids.append(image_id)
            sizes.append((image.height, image.width))  # = (height, width) of the annotations, checked above
        inputs, kept = _preprocess(self.image_processor, images, image_ids, skipped)
        return {
            "pixel_values": inputs["pixel_values"] if inputs else None,
            "pixel_mask": inputs.get("pixel_mask") if inputs else None,
            "image_ids": torch.tensor([image_ids[i] for i in kept], dtype=torch.long),
            "target_sizes": torch.tensor([sizes[i] for i in kept], dtype=torch.long).reshape(-1, 2),
            "skipped": skipped,  # (image_id, UNREADABLE or SIZE_MISMATCH, why)
        }


def _categories_with_names(category_map: Any, category_names: Mapping[int, str] | None) -> list[dict] | None:
    """The ground truth's categories with their names, for per-class metrics: from `category_names`
    (category id -> name), else from a CategoryMap (its ids and names); None: named by their ids."""
    if category_names is not None:
        return [{"id": int(c), "name": str(name)} for c, name in category_names.items()]
    if hasattr(category_map, "category_ids") and hasattr(category_map, "names"):
        return [{"id": int(c), "name": str(name)} for c, name in zip(category_map.category_ids, category_map.names)]
    return None


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    image_processor: Any,
    dataset: Any,
    category_map: Any,
    batch_size: int = 8,
    accelerator: Any = None,
    threshold: float = 0.0,
    num_workers: int = 0,
    return_stats: bool = False,
    per_class: bool = False,
    category_names: Mapping[int, str] | None = None,
    progress: bool = True,
) -> dict[str, float] | tuple[dict[str, float], dict[str, int]]:
    """COCO metrics of `model` on a Hub-schema detection dataset.

    Args:
        model: an object detector whose output has `logits` [B,Q,K+1] and `pred_boxes` [B,Q,4]
            (cxcywh, 0..1), e.g. `HfDetrForObjectDetection` (possibly wrapped by `accelerator`).
        image_processor: `HfDetrImageProcessor` (or any processor with `__call__(images=...)` and
            `post_process_object_detection(outputs, threshold, target_sizes)`).
        dataset: indexable examples with `image` (a PIL image, a path, or a `datasets.Image` value; a
            `datasets.Dataset` is read undecoded) plus the ground-truth fields (module docstring).
        category_map: contiguous label -> dataset category id (`hf_detr.data.CategoryMap`, callable,
            list or dict).
        batch_size: images per forward pass (per process).
        accelerator: an `accelerate.Accelerator`; the data loader is sharded across its processes and
            the predictions are gathered. Every process must call this; all return the same dict.
        threshold: score threshold of post-processing; 0 keeps all queries, as COCO evaluation of
            DETR does (COCOeval keeps the best 100 per image).
        num_workers: DataLoader worker processes that decode and preprocess the images.
        return_stats: also return the counts of evaluated and skipped images.
        per_class: also each category's `map_<name>` and `mar_100_<name>` (`CocoEvaluator.compute`).
        category_names: category id -> name for those keys; default: a CategoryMap's names, else the ids.
        progress: a progress bar over the batches (on the local main process).

    Images are decoded as in training (`hf_detr.images.decode_image`: EXIF orientation applied).
    An image that cannot be read or preprocessed, or whose decoded size differs from the example's
    `width` x `height`, is skipped with a warning naming it, counted, and left out of the metrics; if
    no image is left, ValueError.

    Returns:
        the 12 COCO metrics, keys `COCO_METRIC_NAMES` (and the per-class ones); with `return_stats`, also
        `{"images", "evaluated", "skipped_images", "size_mismatch"}` over the whole split (all processes).
    """
    categories = _categories_with_names(category_map, category_names)
    evaluator = CocoEvaluator.from_examples(_ground_truth_view(dataset), categories, label_to_category=category_map)
    num_images = len(evaluator.coco_gt.dataset["images"])
    if num_images and not evaluator.coco_gt.dataset["annotations"]:
        logger.warning("the evaluation split has no annotations: COCOeval reports -1 for every metric")
    if hasattr(dataset, "cast_column") and "image" in dataset.column_names:
        import datasets

        dataset = dataset.cast_column("image", datasets.Image(decode=False))  # decoded below, one by one

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=_EvalCollate(image_processor), num_workers=num_workers
    )
    if accelerator is not None:
        loader = accelerator.prepare(loader)  # shards batches and moves them to the device
        device = accelerator.device
    else:
        device = next(model.parameters()).device
    show = progress and (accelerator is None or accelerator.is_local_main_process)

    was_training = model.training
    model.eval()
    skipped: dict[int, int] = {}
    for batch in tqdm(loader, desc="evaluation", disable=not show, leave=False):
        for image_id, status, why in batch["skipped"]:
            if image_id not in skipped:  # accelerate may repeat images to even out the last batch
                logger.warning("evaluation: skipping image %s", why)
            skipped[image_id] = status
        if batch["pixel_values"] is None:
            continue
        pixel_mask = batch["pixel_mask"].to(device) if batch["pixel_mask"] is not None else None
        outputs = model(pixel_values=batch["pixel_values"].to(device), pixel_mask=pixel_mask)
        results = image_processor.post_process_object_detection(
            outputs, threshold=threshold, target_sizes=batch["target_sizes"].to(device)
        )
        evaluator.update(batch["image_ids"], results)
    model.train(was_training)
    if _num_processes() > 1:
        from accelerate.utils import gather_object

        skipped = dict(gather_object(list(skipped.items())))
    if num_images and len(skipped) >= num_images:
        raise ValueError(f"none of the {num_images} evaluation images could be used (see the warnings above)")
    metrics = evaluator.compute(per_class=per_class)
    if not return_stats:
        return metrics
    statuses = list(skipped.values())
    stats = {
        "images": num_images,
        "evaluated": num_images - len(skipped),
        "skipped_images": statuses.count(UNREADABLE),
        "size_mismatch": statuses.count(SIZE_MISMATCH),
    }
    return metrics, stats


def _preprocess(image_processor: Any, images: list, image_ids: list[int], skipped: list) -> tuple[Any, list[int]]:
    """``image_processor(images)`` -> (inputs or None, indices of the images in them). Should the
    batch fail (e.g. an image of extreme aspect ratio that the resize rule takes to 0 pixels), each
    image is processed alone to find the ones at fault, which join ``skipped`` as unreadable."""
    if not images:
        return None, []
    try:
        return image_processor(images=images, return_tensors="pt"), list(range(len(images)))
    except Exception:  # noqa: BLE001  (whatever the processor raises; the culprit is named below)
        kept = []
        for i, (image, image_id) in enumerate(zip(images, image_ids)):
            try:
                image_processor(images=[image], return_tensors="pt")
                kept.append(i)
            except Exception as err:  # noqa: BLE001
                why = f"image_id {image_id} ({image.width}x{image.height}): the image processor failed: {type(err).__name__}: {err}"
                skipped.append((image_id, UNREADABLE, why))
        inputs = image_processor(images=[images[i] for i in kept], return_tensors="pt") if kept else None
        return inputs, kept
