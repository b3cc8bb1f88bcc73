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


def _iou_union_enclosing(boxes1: torch.Tensor, boxes2: torch.Tensor):
    """IoU, union and enclosing-box area of xyxy boxes held coordinate-first, [4, ...] (planes x0, y0,
    x1, y1), whose trailing dimensions broadcast against each other.

    Coordinate planes keep every broadcast on the trailing dimensions (a pairwise [..., N, 1] x [..., 1, M]
    never broadcasts along a size-2 corner axis), several times faster on CPU, and the x and y halves
    go through each op together."""
    # In-place ops only ever overwrite intermediates made here (autograd keeps what it needs), so the
    # large pairwise case allocates about half as much.
    area1 = (boxes1[2] - boxes1[0]).mul_(boxes1[3] - boxes1[1])
    area2 = (boxes2[2] - boxes2[0]).mul_(boxes2[3] - boxes2[1])
    inter_wh = torch.minimum(boxes1[2:], boxes2[2:]).sub_(torch.maximum(boxes1[:2], boxes2[:2])).clamp_(min=0)
    inter = inter_wh[0] * inter_wh[1]
    union = (area1 + area2).sub_(inter)
    hull_wh = torch.maximum(boxes1[2:], boxes2[2:]).sub_(torch.minimum(boxes1[:2], boxes2[:2])).clamp_(min=0)
    return inter.div_(union), union, hull_wh[0] * hull_wh[1]


def _pairwise_planes(boxes1: torch.Tensor, boxes2: torch.Tensor):
    """boxes1 [..., N, 4], boxes2 [..., M, 4] -> contiguous coordinate planes [4, ..., N, 1] and
    [4, ..., 1, M] (a small copy of the inputs; the [..., N, M] ops then read unit strides)."""
    return boxes1.movedim(-1, 0).unsqueeze(-1).contiguous(), boxes2.movedim(-1, 0).unsqueeze(-2).contiguous()


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: boxes1 [..., N, 4], boxes2 [..., M, 4] (xyxy) -> [..., N, M]."""
    return _iou_union_enclosing(*_pairwise_planes(boxes1, boxes2))[0]


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (https://giou.stanford.edu): boxes1 [..., N, 4], boxes2 [..., M, 4] (xyxy) -> [..., N, M]."""
    iou, union, hull = _iou_union_enclosing(*_pairwise_planes(boxes1, boxes2))
    return iou.sub_((hull - union).div_(hull))


def center_planes(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] cxcywh -> [5, ...] planes (cx, cy, w / 2, h / 2, w * h), what `l1_and_generalized_box_iou_planes` takes."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx, cy, 0.5 * w, 0.5 * h, w * h))


def l1_and_generalized_box_iou_planes(
    planes1: torch.Tensor, planes2: torch.Tensor, with_iou: bool = False
) -> tuple[torch.Tensor, ...]:
    """L1 distance of the cxcywh boxes and their GIoU, from `center_planes` [5, ...] that broadcast
    against each other (e.g. per-target [5, 1, N, 1] against per-query [5, L, N, Q] -> [L, N, Q]);
    with_iou: (l1, giou, iou).

    Per axis, with centre distance d and half sizes u, v, the overlap is u + v - max(d, |u - v|)
    (clamped at 0) and the enclosing box spans u + v + max(d, |u - v|): the lengths the corners give
    (x0 = c - u, x1 = c + u), in fewer passes, and d and |u - v| are the L1 terms too (|w1 - w2| = 2 |u - v|)."""
    diff = (planes1[:4] - planes2[:4]).abs_()  # d_x, d_y, |u_x - v_x|, |u_y - v_y|
    l1 = (diff[0] + diff[1]).add_(diff[2] + diff[3], alpha=2)
    reach = torch.maximum(diff[:2], diff[2:])
    half_sums = planes1[2:4] + planes2[2:4]
    overlap = (half_sums - reach).clamp_(min=0)
    inter = overlap[0] * overlap[1]
    hull_sides = half_sums.add_(reach)
    hull = hull_sides[0] * hull_sides[1]
    union = (planes1[4] + planes2[4]).sub_(inter)
    if with_iou:
        iou = inter / union
        return l1, iou - (hull - union).div_(hull), iou
    return l1, inter.div_(union).sub_((hull - union).div_(hull))


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) of x clamped to [0, 1], each side kept at eps or more (boxes refined in logit space)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
