"""The ground truth of a batch, checked and concatenated once (`check_labels`), then read by the denoising
queries, the matcher and the loss.

`labels` is what users pass, transformers' DETR format: one dict per image, {"class_labels": Long[N_b],
"boxes": Float[N_b, 4] cxcywh normalised 0..1}. `Targets` holds the same, concatenated image by image.

This file is part of the model surface (saved next to config.json): it imports only torch.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass
class Targets:
    """All targets of a batch, image by image: image b's targets are rows `starts[b] : starts[b] + sizes[b]`."""

    class_labels: torch.Tensor  # [N] int64
    boxes: torch.Tensor  # [N, 4] cxcywh, 0..1
    sizes: list[int]  # targets per image, one entry per image of the batch

    @property
    def batch_size(self) -> int:
        return len(self.sizes)

    @property
    def num_targets(self) -> int:
        return int(self.class_labels.shape[0])

    @property
    def starts(self) -> torch.Tensor:
        """[B] each image's first row."""
        return torch.tensor([0] + self.sizes[:-1], dtype=torch.long).cumsum(0)

    @property
    def image_index(self) -> torch.Tensor:
        """[N] the image of each row (on the CPU)."""
        return torch.repeat_interleave(torch.arange(self.batch_size), torch.tensor(self.sizes, dtype=torch.long))

    def to(self, device) -> "Targets":
        return Targets(self.class_labels.to(device), self.boxes.to(device), self.sizes)

    def repeated(self, times: int) -> "Targets":
        """Each image's targets `times` times in a row, as images b * times + t (query groups matched on their own)."""
        if times == 1:
            return self
        rows = torch.cat([torch.arange(start, start + size) for start, size in zip(self.starts.tolist(), self.sizes) for _ in range(times)])
        rows = rows.to(self.class_labels.device, torch.long)
        return Targets(self.class_labels[rows], self.boxes[rows], [size for size in self.sizes for _ in range(times)])

    def relabelled(self, class_id: int) -> "Targets":
        """The same boxes, every one of class `class_id` (a class-agnostic stage, such as two-stage proposals)."""
        return Targets(torch.full_like(self.class_labels, class_id), self.boxes, self.sizes)

    def per_image(self) -> list[dict]:
        """Back to the `labels` format: one {"class_labels", "boxes"} dict per image."""
        classes, boxes = self.class_labels.split(self.sizes), self.boxes.split(self.sizes)
        return [{"class_labels": c, "boxes": b} for c, b in zip(classes, boxes)]


def check_labels(labels, num_labels: int, batch_size: int | None = None) -> Targets:
    """Check `labels` (one dict per image; a `Targets` passes through) and concatenate them, or raise a
    ValueError naming the image index and annotation position of the first bad target: one dict per image of
    the batch (`batch_size`, when given), integer class ids in [0, num_labels), finite float cxcywh boxes in
    [0, 1] with positive size."""
    if isinstance(labels, Targets):
        if batch_size is not None and labels.batch_size != batch_size:
            raise ValueError(f"labels has {labels.batch_size} images for a batch of {batch_size}: one entry per image")
        return labels
    if not isinstance(labels, (list, tuple)):
        raise ValueError(f"labels must be a list with one dict per image, got {type(labels).__name__}")
    if batch_size is not None and len(labels) != batch_size:
        raise ValueError(f"labels has {len(labels)} entries for a batch of {batch_size} images: one dict per image")
    for image_index, target in enumerate(labels):
        # any mapping: the image processor's labels are BatchFeature objects
        if not isinstance(target, Mapping) or "class_labels" not in target or "boxes" not in target:
            got = f"keys {sorted(target)}" if isinstance(target, Mapping) else type(target).__name__
            raise ValueError(f"labels[{image_index}] must have 'class_labels' and 'boxes', got {got}")
        classes, boxes = target["class_labels"], target["boxes"]
        if not _is_integer_vector(classes):
            what = f"{classes.dtype} of shape {tuple(classes.shape)}" if torch.is_tensor(classes) else type(classes).__name__
            raise ValueError(f"labels[{image_index}]['class_labels'] must be an integer tensor [N], got {what}")
        if not torch.is_tensor(boxes) or not boxes.is_floating_point():
            what = boxes.dtype if torch.is_tensor(boxes) else type(boxes).__name__
            raise ValueError(f"labels[{image_index}]['boxes'] must be a float tensor [N, 4], got {what}")
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or boxes.shape[0] != classes.shape[0]:
            raise ValueError(
                f"labels[{image_index}]: 'boxes' must be [N, 4] with N = len(class_labels) = {len(classes)}, "
                f"got shape {tuple(boxes.shape)}"
            )
    sizes = [int(target["class_labels"].shape[0]) for target in labels]
    if not labels:
        return Targets(torch.empty(0, dtype=torch.long), torch.empty(0, 4), sizes)
    classes = torch.cat([t["class_labels"] for t in labels]).long()
    boxes = torch.cat([t["boxes"] for t in labels])
    targets = Targets(classes, boxes, sizes)
    if classes.shape[0] == 0:
        return targets
    # One check over the whole batch from per-coordinate extremes (a few tensor ops, one host sync; NaN
    # propagates through amin/amax and fails every comparison); only a failure pays for the search of
    # the first bad annotation.
    lowest, highest = boxes.amin(0), boxes.amax(0)
    low_class, high_class = classes.aminmax()
    good = torch.cat((lowest[:2] >= 0, lowest[2:] > 0, highest <= 1, torch.stack((low_class >= 0, high_class < num_labels))))
    if good.all():
        return targets
    bad = _bad_boxes(boxes) | (classes < 0) | (classes >= num_labels)
    position = int(bad.nonzero()[0])
    image_index = int(targets.image_index[position])
    position -= int(targets.starts[image_index])
    box, class_id = labels[image_index]["boxes"][position], int(labels[image_index]["class_labels"][position])
    what = (
        f"box {box.tolist()} is not a finite cxcywh box in [0, 1] with positive size"
        if _bad_boxes(box[None])[0]
        else f"class id {class_id} is outside [0, {num_labels})"
    )
    raise ValueError(f"labels[{image_index}], annotation {position}: {what}")


def _is_integer_vector(values) -> bool:
    integer = torch.is_tensor(values) and not (values.is_floating_point() or values.is_complex() or values.dtype == torch.bool)
    return integer and values.ndim == 1


def _bad_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """[N, 4] cxcywh -> [N] True where a box is not finite, leaves [0, 1] or has no size."""
    return ~(torch.isfinite(boxes).all(-1) & (boxes >= 0).all(-1) & (boxes <= 1).all(-1) & (boxes[:, 2:] > 0).all(-1))


__all__ = ["Targets", "check_labels"]
