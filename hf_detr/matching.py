"""Bipartite matching between predicted and ground-truth boxes. The extension point for matchers.

A matcher is called as `matcher(logits, pred_boxes, labels)` and returns one
`(query_indices, target_indices)` pair of LongTensors per image. `match_layers` does the same for the
outputs of every decoder layer at once; the loss calls it once per training step.
"""

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """DETR's optimal one-to-one assignment (sec. 3.1): cost = - class_cost * p(target class)
    + bbox_cost * L1(cxcywh) - giou_cost * GIoU(xyxy), solved per image with scipy's
    `linear_sum_assignment`. Queries left unmatched are trained towards "no object".

    The cost matrices of all layers and images are built in one batched computation (targets padded
    to the largest image) and cross to the CPU in one transfer.
    """

    def __init__(self, class_cost: float = 1.0, bbox_cost: float = 5.0, giou_cost: float = 2.0):
        super().__init__()
        if min(class_cost, bbox_cost, giou_cost) < 0:
            raise ValueError(f"matcher costs must be >= 0, got class={class_cost} bbox={bbox_cost} giou={giou_cost}")
        if class_cost == bbox_cost == giou_cost == 0:
            raise ValueError("matcher costs cannot all be 0")
        self.class_cost, self.bbox_cost, self.giou_cost = class_cost, bbox_cost, giou_cost

    @torch.no_grad()
    def cost_matrices(self, logits: torch.Tensor, pred_boxes: torch.Tensor, labels: list[dict]) -> torch.Tensor:
        """logits [L, B, Q, K+1], pred_boxes [L, B, Q, 4] (cxcywh, 0..1) -> cost [L, B, Q, T_max].

        Column t of image b is its target t; columns past that image's target count are padding.
        """
        num_targets = max(len(target["class_labels"]) for target in labels)
        batch = len(labels)
        target_ids = logits.new_zeros((batch, num_targets), dtype=torch.long)
        target_boxes = pred_boxes.new_tensor([0.5, 0.5, 1.0, 1.0]).repeat(batch, num_targets, 1)  # valid padding box
        for b, target in enumerate(labels):
            target_ids[b, : len(target["class_labels"])] = target["class_labels"]
            target_boxes[b, : len(target["boxes"])] = target["boxes"]

        probs = logits.softmax(-1)  # [L, B, Q, K+1]
        index = target_ids[None, :, None, :].expand(probs.shape[0], -1, probs.shape[2], -1)
        class_cost = -probs.gather(-1, index)  # [L, B, Q, T]
        bbox_cost = (pred_boxes.unsqueeze(-2) - target_boxes[None, :, None]).abs().sum(-1)  # L1, [L, B, Q, T]
        giou_cost = -generalized_box_iou(cxcywh_to_xyxy(pred_boxes), cxcywh_to_xyxy(target_boxes)[None])
        cost = self.bbox_cost * bbox_cost + self.class_cost * class_cost + self.giou_cost * giou_cost
        # A diverged prediction (NaN/inf box) must not crash the solver: make it the costliest choice.
        max_value = torch.finfo(cost.dtype).max
        return torch.nan_to_num(cost, nan=max_value, posinf=max_value, neginf=max_value)

    @torch.no_grad()
    def match_layers(
        self, logits: torch.Tensor, pred_boxes: torch.Tensor, labels: list[dict]
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """logits [L, B, Q, K+1], pred_boxes [L, B, Q, 4] -> indices[layer][image] = (query_idx, target_idx)."""
        sizes = [len(target["class_labels"]) for target in labels]
        num_layers, batch = logits.shape[:2]
        empty = torch.empty(0, dtype=torch.long)
        if max(sizes) == 0:
            return [[(empty, empty)] * batch for _ in range(num_layers)]
        cost = self.cost_matrices(logits, pred_boxes, labels).float().cpu().numpy()  # one host transfer
        indices = []
        for layer_cost in cost:
            layer = []
            for b, size in enumerate(sizes):
                if size == 0:
                    layer.append((empty, empty))
                    continue
                query_idx, target_idx = linear_sum_assignment(layer_cost[b, :, :size])
                layer.append((torch.as_tensor(query_idx, dtype=torch.long), torch.as_tensor(target_idx, dtype=torch.long)))
            indices.append(layer)
        return indices

    def forward(
        self, logits: torch.Tensor, pred_boxes: torch.Tensor, labels: list[dict]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """logits [B, Q, K+1], pred_boxes [B, Q, 4] (cxcywh, 0..1), labels: per image
        {"class_labels": Long[N], "boxes": Float[N, 4] cxcywh 0..1} -> per image (query_idx, target_idx)."""
        return self.match_layers(logits[None], pred_boxes[None], labels)[0]


MATCHERS = {"hungarian": HungarianMatcher}
