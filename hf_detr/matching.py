"""Bipartite matching between predicted and ground-truth boxes. The extension point for matchers.

A matcher subclasses `Matcher` and implements `match_pairs`: the matched (layer, image, query, target)
pairs of every decoder layer at once, as four flat index tensors; the loss calls it once per training
step. `Matcher` derives the per-image views from it: `match_layers(logits, pred_boxes, labels)` ->
`indices[layer][image] = (query_indices, target_indices)`, and `matcher(logits, pred_boxes, labels)`
for one layer. Logits are [..., K+1] (softmax, "no object" last) or [..., K] (sigmoid class losses).
`labels` is the per-image list of transformers' DETR or the batch's `Targets` (targets.py).

The class term of the cost belongs to the class loss (`class_loss.prepare` turns logits into scores,
`class_loss.matching_cost` a target class's score into its cost), so a new class loss never touches this
file. `scores`, when given, is `class_loss.prepare(logits)`, which the loss computes anyway.
"""

import math
from itertools import accumulate

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import center_planes, l1_and_generalized_box_iou_planes
from .loss import SoftmaxCrossEntropy
from .targets import Targets, check_labels

CPU_ENTRIES_PER_PASS = 1 << 16  # cost entries (layer x target x query) built together on CPU; see target_costs


class Matcher(nn.Module):
    """Base of the matchers: subclasses implement `match_pairs`."""

    def match_pairs(
        self, logits: torch.Tensor, pred_boxes: torch.Tensor, targets: Targets, scores: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits [L, B, Q, C], pred_boxes [L, B, Q, 4] (cxcywh, 0..1), targets: the batch's `Targets`
        -> (layer_idx, image_idx, query_idx, target_idx), LongTensors [M] on the CPU: every matched pair,
        ordered by layer, then image, then query; target_idx indexes the image's own targets."""
        raise NotImplementedError

    @staticmethod
    def targets_of(labels, logits: torch.Tensor) -> Targets:
        """Per-image labels (or Targets) as the batch's Targets, their class ids checked against the logits."""
        return check_labels(labels, logits.shape[-1], logits.shape[-3])

    @torch.no_grad()
    def match_layers(
        self, logits: torch.Tensor, pred_boxes: torch.Tensor, labels, scores: torch.Tensor | None = None
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """logits [L, B, Q, C], pred_boxes [L, B, Q, 4] -> indices[layer][image] = (query_idx, target_idx)."""
        targets = self.targets_of(labels, logits)
        layer_idx, image_idx, query_idx, target_idx = self.match_pairs(logits, pred_boxes, targets, scores)
        num_layers, batch = logits.shape[:2]
        counts = torch.bincount(layer_idx * batch + image_idx, minlength=num_layers * batch).tolist()
        queries, targets = query_idx.split(counts), target_idx.split(counts)
        return [[(queries[i], targets[i]) for i in range(layer * batch, (layer + 1) * batch)] for layer in range(num_layers)]

    def forward(self, logits: torch.Tensor, pred_boxes: torch.Tensor, labels) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """logits [B, Q, C], pred_boxes [B, Q, 4] (cxcywh, 0..1), labels: per image
        {"class_labels": Long[N], "boxes": Float[N, 4] cxcywh 0..1} -> per image (query_idx, target_idx)."""
        return self.match_layers(logits[None], pred_boxes[None], labels)[0]


class HungarianMatcher(Matcher):
    """DETR's optimal one-to-one assignment (sec. 3.1): cost = class_cost * class term
    + bbox_cost * L1(cxcywh) - giou_cost * GIoU(xyxy), solved per image with scipy's
    `linear_sum_assignment`. Queries left unmatched are trained towards "no object".

    class_loss: the model's class loss (loss.CLASS_LOSSES), whose `matching_cost` is the class term: -p(target
    class) for DETR's softmax (the default), the focal cost of the target class's logit for the sigmoid losses.

    The costs of all layers, images and targets are built batched (on CPU a few layers per pass),
    target-major (each target row against its own image's queries, no padding), and cross to the CPU in
    one transfer.
    """

    def __init__(self, class_cost: float = 1.0, bbox_cost: float = 5.0, giou_cost: float = 2.0, class_loss: nn.Module | None = None):
        super().__init__()
        costs = (class_cost, bbox_cost, giou_cost)
        if not all(math.isfinite(cost) and cost >= 0 for cost in costs):
            raise ValueError(f"matcher costs must be finite and >= 0, got class={class_cost} bbox={bbox_cost} giou={giou_cost}")
        if class_cost == bbox_cost == giou_cost == 0:
            raise ValueError("matcher costs cannot all be 0")
        self.class_cost, self.bbox_cost, self.giou_cost = costs
        # DETR's softmax cost needs no parameters (its `prepare` and `matching_cost` are static)
        self._class_loss = (class_loss if class_loss is not None else SoftmaxCrossEntropy,)  # referenced, not a submodule

    @property
    def class_loss(self):
        return self._class_loss[0]

    @classmethod
    def from_config(cls, config, class_loss: nn.Module) -> "HungarianMatcher":
        return cls(config.class_cost, config.bbox_cost, config.giou_cost, class_loss)

    @torch.no_grad()
    def target_costs(
        self,
        logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        labels,
        scores: torch.Tensor | None = None,
        layers_per_pass: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """logits [L, B, Q, C], pred_boxes [L, B, Q, 4], labels (per-image list or Targets) -> cost [L, N, Q] of the
        batch's N targets (image by image, in label order), each against the queries of its own image.
        scores: `class_loss.prepare(logits)` if the caller has it (saves a pass over the logits).
        layers_per_pass: how many layers' costs are built together (default: about
        `CPU_ENTRIES_PER_PASS` entries on CPU, all layers on GPU; the result is the same).
        dtype: of the returned costs, which are computed in fp32 (float64 saves the solver a conversion pass).

        Target-major, so that every pairwise op broadcasts a per-target scalar along the contiguous
        query axis: on CPU several times faster than a [..., Q, T] layout whose innermost axis is the
        few targets, and no work is spent on padding targets."""
        targets = self.targets_of(labels, logits)
        num_layers, batch, num_queries, num_classes = logits.shape
        image = targets.image_index.to(logits.device)  # [N]: each target's image
        target_ids = targets.class_labels.to(logits.device)
        target_boxes = targets.boxes.to(logits.device, torch.float32)
        scores = scores if scores is not None else self.class_loss.prepare(logits.detach())
        # Index of (target's image, query, target's class) in one layer's flattened [B, Q, C].
        query_offsets = torch.arange(0, num_queries * num_classes, num_classes, device=logits.device)
        flat = ((image * (num_queries * num_classes) + target_ids)[:, None] + query_offsets).flatten()  # [N * Q]
        target = center_planes(target_boxes)[:, None, :, None]  # [5, 1, N, 1]: cx, cy, w/2, h/2, area
        cost = torch.empty(num_layers, targets.num_targets, num_queries, device=logits.device, dtype=dtype)
        # The inputs are gathered for all layers at once; the pairwise L1/GIoU arithmetic (a dozen
        # temporaries) runs, on CPU, a few layers per pass, about 64k cost entries: enough for torch's
        # intra-op threads (grain 32k elements), while the temporaries stay small. All layers at once reached
        # ~8 MB for 6 layers x 32 images x 100 queries, which glibc can hand back to the kernel after
        # each call and re-fault on the next (the whole loss then took 7.5 ms instead of 3.0 ms). On
        # GPU the caching allocator has no such cost, and one pass launches the fewest kernels.
        if layers_per_pass is None:
            per_layer = cost[0].numel()
            layers_per_pass = max(1, CPU_ENTRIES_PER_PASS // max(per_layer, 1)) if logits.device.type == "cpu" else num_layers
        # The target class's score at [layer, target's image, query, target's class], then the class term on
        # the gathered [L, N, Q] only. (`gather` with the index expanded over layers: on CPU ~1.5x faster
        # than the same `index_select` along dim 1.)
        score = scores.detach().reshape(num_layers, -1).gather(1, flat.expand(num_layers, -1)).view(cost.shape)
        class_term = self.class_loss.matching_cost(score)
        # Boxes as contiguous planes (cx, cy, w/2, h/2, area): predictions [5, L, N, Q], gathered per
        # target, against the targets' [5, 1, N, 1].
        pred = center_planes(pred_boxes.float()).view(5 * num_layers, batch, num_queries).index_select(1, image)
        pred = pred.view(5, *cost.shape)
        for start in range(0, num_layers, layers_per_pass):
            layers = slice(start, start + layers_per_pass)
            cost[layers] = self._layer_costs(class_term[layers], pred[:, layers], target)
        return cost

    @torch.no_grad()
    def pair_costs(self, logits, pred_boxes, target: dict, query_idx, target_idx) -> dict[str, torch.Tensor]:
        """The cost of given pairs, term by term, as this matcher weighs them. One layer of one image:
        logits [Q, C], pred_boxes [Q, 4] (cxcywh, 0..1), target {"class_labels": [N], "boxes": [N, 4]},
        pairs (query_idx [M], target_idx [M]) -> {"class": the class term (-p(class) or the focal cost),
        "l1": L1 of the cxcywh boxes, "giou": their GIoU, "total": class_cost * class + bbox_cost * l1
        - giou_cost * giou}, each [M]; "total" is the entry of `target_costs` for the pair."""
        classes = target["class_labels"][target_idx].to(logits.device)
        class_term = self.class_loss.matching_cost(self.class_loss.prepare(logits.detach())[query_idx, classes])
        l1, giou = l1_and_generalized_box_iou_planes(
            center_planes(pred_boxes[query_idx].float()), center_planes(target["boxes"][target_idx].to(logits.device, torch.float32))
        )
        total = self.class_cost * class_term + self.bbox_cost * l1 - self.giou_cost * giou
        return {"class": class_term, "l1": l1, "giou": giou, "total": total}

    def _layer_costs(self, class_term, pred, target) -> torch.Tensor:
        """class_term [l, N, Q] and pred planes [5, l, N, Q] of a few layers, target planes [5, 1, N, 1] -> cost [l, N, Q]."""
        bbox_cost, giou = l1_and_generalized_box_iou_planes(pred, target)
        cost = bbox_cost.mul_(self.bbox_cost).add_(class_term, alpha=self.class_cost).sub_(giou.mul_(self.giou_cost))
        # A diverged prediction (NaN/inf box) must not crash the solver: make it the costliest choice.
        max_value = torch.finfo(cost.dtype).max
        return cost.nan_to_num_(nan=max_value, posinf=max_value, neginf=max_value)

    @torch.no_grad()
    def match_pairs(
        self, logits: torch.Tensor, pred_boxes: torch.Tensor, targets: Targets, scores: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """See `Matcher.match_pairs`; scores: optional `class_loss.prepare(logits)`."""
        sizes = targets.sizes
        num_layers, batch = logits.shape[:2]
        if max(sizes, default=0) == 0:
            return tuple(torch.empty(0, dtype=torch.long) for _ in range(4))
        # One host transfer, [L, N, Q], in the float64 scipy solves in (else it converts every problem);
        # on CPU the costs are written in float64 directly, pass by pass.
        on_cpu = logits.device.type == "cpu"
        cost = self.target_costs(logits, pred_boxes, targets, scores, dtype=torch.float64 if on_cpu else torch.float32)
        cost = cost.to("cpu", torch.float64).numpy()
        starts = list(accumulate(sizes, initial=0))  # each image's first row in the [L, N, Q] costs
        problems = [(layer, image, starts[image], size) for layer in range(num_layers) for image, size in enumerate(sizes) if size]
        # Solving each [T, Q] problem is what scipy does anyway for Q > T (it transposes); ordering each
        # problem's pairs by query afterwards gives the pairs in the order of the [Q, T] solve.
        solved = [linear_sum_assignment(cost[layer, start : start + size]) for layer, _, start, size in problems]
        counts = [query_idx.shape[0] for _, query_idx in solved]
        query_idx = np.concatenate([query_idx for _, query_idx in solved])
        target_idx = np.concatenate([target_idx for target_idx, _ in solved])
        layer_idx, image_idx = (np.repeat(np.array([p[i] for p in problems]), counts) for i in (0, 1))
        # Problems come in (layer, image) order, so one sort by (layer, image, query), as a single key, orders all pairs.
        order = np.argsort((layer_idx * batch + image_idx) * logits.shape[2] + query_idx)
        return tuple(torch.from_numpy(a[order]) for a in (layer_idx, image_idx, query_idx, target_idx))


MATCHERS = {"hungarian": HungarianMatcher}
