"""Bipartite matching between predicted and ground-truth boxes. The extension point for matchers.

A matcher is called as `matcher(logits, pred_boxes, labels)` and returns one
`(query_indices, target_indices)` pair of LongTensors per image. `match_layers` does the same for the
outputs of every decoder layer at once; the loss calls it once per training step.
"""

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.utils.rnn import pad_sequence

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
        return self._target_query_costs(logits, pred_boxes, labels).transpose(-1, -2)

    def _target_query_costs(self, logits: torch.Tensor, pred_boxes: torch.Tensor, labels: list[dict]) -> torch.Tensor:
        """The cost laid out target-major, [L, B, T_max, Q]: every pairwise op then broadcasts a
        per-target scalar along the contiguous query axis, several times faster on CPU than the
        query-major layout (whose innermost axis is the few targets)."""
        # Pad every image to the largest target count in one call each; the padding box is a valid box
        # (0.5, 0.5, 0.5, 0.5), so padded rows stay finite, and the padding class is 0.
        target_ids = pad_sequence([target["class_labels"] for target in labels], batch_first=True)  # [B, T]
        target_boxes = pad_sequence([target["boxes"] for target in labels], batch_first=True, padding_value=0.5)
        logits, pred_boxes = logits.float(), pred_boxes.float()  # costs in fp32 whatever the model ran in
        target_boxes = target_boxes.to(pred_boxes.dtype)

        # p(target class) = exp(log_softmax) at the target ids: log_softmax is the faster full pass on
        # CPU, and the exp runs on the gathered [L, B, Q, T] only.
        log_probs = logits.log_softmax(-1)  # [L, B, Q, K+1]
        index = target_ids[None, :, None, :].expand(log_probs.shape[0], -1, log_probs.shape[2], -1)
        class_cost = log_probs.gather(-1, index).transpose(-1, -2).exp()  # [L, B, T, Q]
        pred = pred_boxes.movedim(-1, 0).unsqueeze(-2).contiguous()  # [4, L, B, 1, Q]
        target = target_boxes.movedim(-1, 0).unsqueeze(-1)  # [4, B, T, 1]
        bbox_cost = (pred[0] - target[0]).abs()  # L1 over (cx, cy, w, h), [L, B, T, Q]
        for i in range(1, 4):
            bbox_cost += (pred[i] - target[i]).abs()
        giou = generalized_box_iou(cxcywh_to_xyxy(target_boxes), cxcywh_to_xyxy(pred_boxes))  # [L, B, T, Q]
        cost = bbox_cost.mul_(self.bbox_cost).sub_(class_cost.mul_(self.class_cost)).sub_(giou.mul_(self.giou_cost))
        # A diverged prediction (NaN/inf box) must not crash the solver: make it the costliest choice.
        max_value = torch.finfo(cost.dtype).max
        return cost.nan_to_num_(nan=max_value, posinf=max_value, neginf=max_value)

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
        cost = self._target_query_costs(logits, pred_boxes, labels).cpu().numpy()  # one host transfer, [L, B, T, Q]
        indices = []
        for layer_cost in cost:
            layer = []
            for b, size in enumerate(sizes):
                if size == 0:
                    layer.append((empty, empty))
                    continue
                # Solving the [T, Q] problem is what scipy does anyway for Q > T (it transposes); sorting
                # by query gives the pairs in the order of the [Q, T] solve.
                target_idx, query_idx = linear_sum_assignment(layer_cost[b, :size])
                order = query_idx.argsort()
                layer.append((torch.from_numpy(query_idx[order]), torch.from_numpy(target_idx[order])))
            indices.append(layer)
        return indices

    def forward(
        self, logits: torch.Tensor, pred_boxes: torch.Tensor, labels: list[dict]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """logits [B, Q, K+1], pred_boxes [B, Q, 4] (cxcywh, 0..1), labels: per image
        {"class_labels": Long[N], "boxes": Float[N, 4] cxcywh 0..1} -> per image (query_idx, target_idx)."""
        return self.match_layers(logits[None], pred_boxes[None], labels)[0]


MATCHERS = {"hungarian": HungarianMatcher}
