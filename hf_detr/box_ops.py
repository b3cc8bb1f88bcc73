"""Pure tensor box functions. Formats: `cxcywh` = (center x, center y, width, height) and
`xyxy` = (x0, y0, x1, y1); both work in normalised (0..1) or pixel units alike.

Written here rather than imported from torchvision (not installable next to the CPU torch this
project targets) or transformers (whose versions are private helpers that validate on every call)."""

import torch


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] cxcywh -> [..., 4] xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [..., 4] cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [...] area."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _iou_union_enclosing(boxes1: tuple[torch.Tensor, ...], boxes2: tuple[torch.Tensor, ...]):
    """IoU, union and enclosing-box area of xyxy boxes given as coordinate tuples (x0, y0, x1, y1)
    whose tensors broadcast against each other.

    Working coordinate by coordinate keeps every broadcast on the trailing dimensions (a pairwise
    [..., N, 1] x [..., 1, M] never materialises a [..., N, M, 2] corner tensor), which on CPU is
    several times faster than broadcasting the corner pairs."""
    x0a, y0a, x1a, y1a = boxes1
    x0b, y0b, x1b, y1b = boxes2
    area1, area2 = (x1a - x0a) * (y1a - y0a), (x1b - x0b) * (y1b - y0b)
    inter = (torch.minimum(x1a, x1b) - torch.maximum(x0a, x0b)).clamp(min=0) * (
        torch.minimum(y1a, y1b) - torch.maximum(y0a, y0b)
    ).clamp(min=0)
    union = area1 + area2 - inter
    hull = (torch.maximum(x1a, x1b) - torch.minimum(x0a, x0b)).clamp(min=0) * (
        torch.maximum(y1a, y1b) - torch.minimum(y0a, y0b)
    ).clamp(min=0)
    return inter / union, union, hull


def _pairwise_coordinates(boxes1: torch.Tensor, boxes2: torch.Tensor):
    """boxes1 [..., N, 4], boxes2 [..., M, 4] -> their coordinates as contiguous [..., N, 1] and
    [..., 1, M] tensors (a small copy of the inputs; the [..., N, M] ops then read unit strides)."""
    return boxes1.movedim(-1, 0).unsqueeze(-1).contiguous().unbind(0), boxes2.movedim(-1, 0).unsqueeze(-2).contiguous().unbind(0)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: boxes1 [..., N, 4], boxes2 [..., M, 4] (xyxy) -> [..., N, M]."""
    return _iou_union_enclosing(*_pairwise_coordinates(boxes1, boxes2))[0]


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (https://giou.stanford.edu): boxes1 [..., N, 4], boxes2 [..., M, 4] (xyxy) -> [..., N, M]."""
    iou, union, hull = _iou_union_enclosing(*_pairwise_coordinates(boxes1, boxes2))
    return iou - (hull - union) / hull


def coordinate_generalized_box_iou(boxes1: tuple[torch.Tensor, ...], boxes2: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """GIoU of xyxy boxes given as coordinate tuples (x0, y0, x1, y1) of tensors that broadcast against
    each other (e.g. per-target [N, 1] against per-query [L, N, Q]), for callers that hold coordinate
    planes already."""
    iou, union, hull = _iou_union_enclosing(boxes1, boxes2)
    return iou - (hull - union) / hull


def elementwise_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of boxes that broadcast against each other (e.g. matched pairs [N, 4] and [N, 4] -> [N])."""
    iou, union, hull = _iou_union_enclosing(boxes1.unbind(-1), boxes2.unbind(-1))
    return iou - (hull - union) / hull
