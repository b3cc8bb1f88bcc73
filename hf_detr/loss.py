"""DETR's set criterion: match predictions to targets, then cross-entropy (with a down-weighted
"no object" class), L1 and GIoU on the matched pairs, for the final decoder layer and every
intermediate one (auxiliary losses).

All layers are handled together: one matcher call (one host transfer), then the loss terms as flat
tensor ops over (layer, image, query) indices, with no Python loop over layers or images.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .box_ops import center_planes, l1_and_generalized_box_iou_planes


def check_pixel_inputs(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> None:
    """Raise a ValueError naming the argument and the shapes when the model cannot read the batch:
    pixel_values must be [B, C, H, W] with B >= 1; pixel_mask, if given, [B, H, W] with at least one
    real (non-zero) pixel per image (rather than a silent resize or broadcast, or an image with nothing
    to attend to). The per-image check reads the mask on the host; it is skipped while compiling or
    tracing, and on the meta device (no data)."""
    if pixel_values.ndim != 4 or pixel_values.shape[0] == 0:
        raise ValueError(f"pixel_values must be [batch_size >= 1, channels, height, width], got shape {tuple(pixel_values.shape)}")
    if pixel_mask is None:
        return
    batch, _, height, width = pixel_values.shape
    if tuple(pixel_mask.shape) != (batch, height, width):
        raise ValueError(
            f"pixel_mask must be [batch_size, height, width] = {(batch, height, width)} for pixel_values of shape "
            f"{tuple(pixel_values.shape)}, got {tuple(pixel_mask.shape)}"
        )
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or pixel_mask.device.type == "meta":
        return
    # Exact and cheap for DETR's padding (bottom / right): a real top-left pixel in every image is enough.
    if bool(pixel_mask[:, 0, 0].all()):
        return
    has_pixels = pixel_mask.flatten(1).any(1)
    if not bool(has_pixels.all()):
        empty = (~has_pixels).nonzero().flatten().tolist()
        raise ValueError(f"pixel_mask of image(s) {empty} is all zeros: every image needs at least one real pixel")


def check_labels(labels: list[dict], num_labels: int, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raise a ValueError naming the image index and annotation position of the first bad target:
    one dict per image of the batch (``batch_size``, when given), integer class ids in
    [0, num_labels), finite float cxcywh boxes in [0, 1] with positive size.
    -> every image's class_labels [N] and boxes [N, 4], concatenated in image order."""
    if not isinstance(labels, (list, tuple)):
        raise ValueError(f"labels must be a list with one dict per image, got {type(labels).__name__}")
    if batch_size is not None and len(labels) != batch_size:
        raise ValueError(f"labels has {len(labels)} entries for a batch of {batch_size} images: one dict per image")
    for image_index, target in enumerate(labels):
        if not isinstance(target, dict) or "class_labels" not in target or "boxes" not in target:
            got = f"keys {sorted(target)}" if isinstance(target, dict) else type(target).__name__
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
    if not labels:
        return torch.empty(0, dtype=torch.long), torch.empty(0, 4)
    classes, boxes = torch.cat([t["class_labels"] for t in labels]), torch.cat([t["boxes"] for t in labels])
    if classes.shape[0] == 0:
        return classes, boxes
    # One check over the whole batch from per-coordinate extremes (a few tensor ops, one host sync; NaN
    # propagates through amin/amax and fails every comparison); only a failure pays for the search of
    # the first bad annotation.
    lowest, highest = boxes.amin(0), boxes.amax(0)
    low_class, high_class = classes.aminmax()
    good = torch.cat((lowest[:2] >= 0, lowest[2:] > 0, highest <= 1, torch.stack((low_class >= 0, high_class < num_labels))))
    if good.all():
        return classes, boxes
    bad = _bad_boxes(boxes) | (classes < 0) | (classes >= num_labels)
    position = int(bad.nonzero()[0])
    sizes = torch.tensor([t["class_labels"].shape[0] for t in labels]).cumsum(0)
    image_index = int((sizes <= position).sum())
    position -= int(sizes[image_index - 1]) if image_index else 0
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


def num_boxes_across_processes(labels: list[dict], device: torch.device) -> float:
    """Target boxes in this batch, averaged over processes when torch.distributed runs, at least 1,
    so that every process normalises its loss by the same number."""
    num_boxes = float(sum(target["class_labels"].shape[0] for target in labels))
    if dist.is_available() and dist.is_initialized():
        total = torch.tensor(num_boxes, device=device)
        dist.all_reduce(total)
        num_boxes = total.item() / dist.get_world_size()
    return max(num_boxes, 1.0)


class SetCriterion(nn.Module):
    """Args:
    matcher: a `Matcher`, called as `matcher.match_pairs(logits, pred_boxes, labels, log_probs=...)` (see matching.py).
    num_labels: K, the number of real classes; class K is "no object".
    eos_coefficient: cross-entropy weight of the "no object" class.
    ce_coefficient, bbox_coefficient, giou_coefficient: weights of the three terms in the total loss.
    """

    def __init__(
        self,
        matcher: nn.Module,
        num_labels: int,
        eos_coefficient: float = 0.1,
        ce_coefficient: float = 1.0,
        bbox_coefficient: float = 5.0,
        giou_coefficient: float = 2.0,
    ):
        super().__init__()
        self.matcher = matcher
        self.num_labels = num_labels
        self.eos_coefficient = eos_coefficient
        self.weights = {"loss_ce": ce_coefficient, "loss_bbox": bbox_coefficient, "loss_giou": giou_coefficient}
        # Derived from the numbers above, kept on the model's device (a per-step host-to-device copy would
        # wait for the GPU) and out of the state dict: the cross-entropy weight of each class, and the weights
        # of the three terms.
        self.register_buffer("class_weight", torch.empty(num_labels + 1), persistent=False)
        self.register_buffer("term_weights", torch.empty(3), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the derived buffers. from_pretrained builds models on the meta device and leaves
        buffers that are not in the checkpoint uninitialised, so the model's `_init_weights` calls this."""
        self.class_weight.fill_(1.0)
        self.class_weight[-1] = self.eos_coefficient
        self.term_weights.copy_(torch.tensor(list(self.weights.values())))

    def forward(self, logits: torch.Tensor, pred_boxes: torch.Tensor, labels: list[dict]):
        """logits [L, B, Q, K+1] and pred_boxes [L, B, Q, 4] (cxcywh, 0..1) of every decoder layer, the
        last being the final output; labels: per image {"class_labels": Long[N], "boxes": Float[N, 4] cxcywh 0..1}.

        -> (loss, loss_dict). loss_dict has "loss_ce", "loss_bbox", "loss_giou" for the final layer,
        the same with suffix "_{i}" for intermediate layer i, and "cardinality_error" (a metric, not in loss).
        """
        num_layers, batch, num_queries = logits.shape[:3]
        device = logits.device
        target_classes_all, target_boxes_all = check_labels(labels, self.num_labels, batch)  # concatenated, [N], [N, 4]
        target_classes_all, target_boxes_all = target_classes_all.to(device), target_boxes_all.to(device, pred_boxes.dtype)
        # One log-softmax serves the matcher's class cost (detached) and the cross-entropy below.
        log_probs = logits.float().log_softmax(-1)  # [L, B, Q, K+1]
        layer_idx, image_idx, query_idx, target_idx = self.matcher.match_pairs(
            logits.detach(), pred_boxes.detach(), labels, log_probs=log_probs.detach()
        )
        # Each matched pair as a row of the flattened [L * B * Q] predictions and of the concatenated targets.
        offsets = torch.tensor([0] + [t["class_labels"].shape[0] for t in labels[:-1]]).cumsum(0)
        prediction_row = ((layer_idx * batch + image_idx) * num_queries + query_idx).to(device)
        target_row = (target_idx + offsets[image_idx]).to(device)
        layer_idx = layer_idx.to(device)

        # Classification: every query has a target class, "no object" (= K) unless matched.
        target_classes = torch.full((num_layers * batch * num_queries,), self.num_labels, dtype=torch.long, device=device)
        target_classes[prediction_row] = target_classes_all[target_row]
        weighted_nll = F.nll_loss(  # = cross_entropy(logits, ...), whose first step is this log_softmax
            log_probs.reshape(-1, log_probs.shape[-1]), target_classes, self.class_weight, reduction="none"
        ).view(num_layers, -1)
        # Same value as cross_entropy(..., weight, reduction="mean") per layer: a weighted mean.
        loss_ce = weighted_nll.sum(1) / self.class_weight[target_classes].view(num_layers, -1).sum(1)

        # Boxes: L1 and GIoU on the matched pairs, summed per layer, over the number of target boxes.
        num_boxes = num_boxes_across_processes(labels, device)
        matched_boxes = center_planes(pred_boxes.reshape(-1, 4).index_select(0, prediction_row))  # [5, M]
        l1, giou = l1_and_generalized_box_iou_planes(matched_boxes, center_planes(target_boxes_all).index_select(1, target_row))
        per_pair = torch.stack((l1, 1 - giou))  # [2, M]
        box_terms = per_pair.new_zeros(2, num_layers).index_add(1, layer_idx, per_pair).div(num_boxes)

        per_layer = torch.cat((loss_ce[None], box_terms))  # [3, L]: loss_ce, loss_bbox, loss_giou
        loss = (per_layer.sum(1) * self.term_weights).sum()
        keys = [name if i == num_layers - 1 else f"{name}_{i}" for name in self.weights for i in range(num_layers)]
        loss_dict = dict(zip(keys, per_layer.flatten().unbind()))
        loss_dict["cardinality_error"] = self.cardinality_error(logits[-1], labels)
        return loss, loss_dict

    @torch.no_grad()
    def cardinality_error(self, logits: torch.Tensor, labels: list[dict]) -> torch.Tensor:
        """Mean absolute error between the number of queries predicting an object and the number of
        targets, per image (logged, never back-propagated)."""
        # argmax != "no object", without the (slow on CPU) argmax: the best real class reaches the
        # no-object logit (argmax takes the first of tied maxima) or is NaN (argmax picks NaN).
        best_real = logits[..., :-1].amax(-1)
        predicted = ((best_real >= logits[..., -1]) | best_real.isnan()).sum(1).float()
        expected = torch.tensor([float(t["class_labels"].shape[0]) for t in labels], device=logits.device)
        return (predicted - expected).abs().mean()
