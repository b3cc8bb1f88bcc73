"""DETR's set criterion: match predictions to targets, then a class loss, L1 and GIoU on the matched
pairs, for the final decoder layer and every intermediate one (auxiliary losses). Each group of
queries (Group DETR) is matched on its own; denoising queries (DN-DETR) reconstruct the targets they
were made from, without matching.

The class loss is one of `CLASS_LOSSES` (`HfDetrConfig.class_loss`); it also fixes the class head's
size (`sigmoid`: num_labels outputs, else num_labels + 1 with "no object" last) and owns the matcher's
class cost (`matching_cost`). With two-stage proposals, the encoder's scores and boxes of every memory
position get the same terms against class-agnostic targets (suffix "_enc").

All layers are handled together: one matcher call (one host transfer), then the loss terms as flat
tensor ops over (layer, image, query) indices, with no Python loop over layers or images.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .box_ops import center_planes, l1_and_generalized_box_iou_planes
from .targets import Targets, check_labels


def num_boxes_across_processes(targets: Targets, device: torch.device) -> float:
    """Target boxes in this batch, averaged over processes when torch.distributed runs, at least 1,
    so that every process normalises its loss by the same number."""
    num_boxes = float(targets.num_targets)
    if dist.is_available() and dist.is_initialized():
        total = torch.tensor(num_boxes, device=device)
        dist.all_reduce(total)
        num_boxes = total.item() / dist.get_world_size()
    return max(num_boxes, 1.0)


# ------------------------------------------------------------------------------------------ class losses


class SoftmaxCrossEntropy(nn.Module):
    """DETR's class loss: softmax over num_labels + 1 classes, the last "no object", cross-entropy with
    the no-object class weighted by eos_coefficient; per layer, the weighted mean over queries.
    Matching cost: -p(target class)."""

    sigmoid = False
    targets_iou = False

    def __init__(self, num_labels: int, eos_coefficient: float = 0.1):
        super().__init__()
        self.num_labels, self.eos_coefficient = num_labels, eos_coefficient
        # derived, on the model's device, out of the state dict (see SetCriterion.reset_buffers)
        self.register_buffer("class_weight", torch.empty(num_labels + 1), persistent=False)
        self.reset_buffers()

    @classmethod
    def from_config(cls, config) -> "SoftmaxCrossEntropy":
        return cls(config.num_labels, config.eos_coefficient)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        self.class_weight.fill_(1.0)
        self.class_weight[-1] = self.eos_coefficient

    @staticmethod
    def prepare(logits: torch.Tensor) -> torch.Tensor:
        """[..., K+1] -> fp32 log-probabilities: what the loss takes, and the matcher's class cost too."""
        return logits.float().log_softmax(-1)

    @staticmethod
    def matching_cost(log_prob: torch.Tensor) -> torch.Tensor:
        """The matcher's class term from the target class's log-probability: -p (DETR)."""
        return log_prob.exp().neg_()

    def forward(self, log_probs, target_classes, target_ious, num_boxes) -> torch.Tensor:
        """log_probs [L, R, K+1], target_classes [L, R] (K: no object) -> [L]."""
        weighted_nll = F.nll_loss(  # = cross_entropy(logits, ...), whose first step is the log_softmax
            log_probs.flatten(0, 1), target_classes.flatten(), self.class_weight, reduction="none"
        ).view(target_classes.shape)
        # the value of cross_entropy(..., weight, reduction="mean") per layer: a weighted mean
        return weighted_nll.sum(1) / self.class_weight[target_classes].sum(1)

    def predicts_object(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., K+1] -> bool [...]: argmax is a real class."""
        # without the (slow on CPU) argmax: the best real class reaches the no-object logit (argmax
        # takes the first of tied maxima) or is NaN (argmax picks NaN)
        best_real = logits[..., :-1].amax(-1)
        return (best_real >= logits[..., -1]) | best_real.isnan()


class SigmoidClassLoss(nn.Module):
    """Base of the sigmoid class losses: one sigmoid per real class, no "no object" class (an
    unmatched query's targets are all 0). Matching cost: the focal cost (Deformable DETR)."""

    sigmoid = True
    targets_iou = False

    def __init__(self, num_labels: int, alpha: float, gamma: float = 2.0):
        super().__init__()
        self.num_labels, self.alpha, self.gamma = num_labels, alpha, gamma

    def prepare(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float()

    def matching_cost(self, logit: torch.Tensor) -> torch.Tensor:
        """The matcher's class term from the target class's logit: the focal loss of calling the query that
        class, alpha (1 - p)^gamma (-log p), less its loss of calling it background, (1 - alpha) p^gamma (-log(1 - p))."""
        p, alpha, gamma = logit.sigmoid(), self.alpha, self.gamma
        positive = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
        negative = (1 - alpha) * p**gamma * -(1 - p + 1e-8).log()
        return positive - negative

    def one_hot(self, target_classes: torch.Tensor) -> torch.Tensor:
        """[L, R] classes (K: no object) -> [L, R, K] float one-hot (all 0 for no object)."""
        return F.one_hot(target_classes, self.num_labels + 1)[..., :-1].float()

    def predicts_object(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., K] -> bool [...]: some class has probability above 0.5."""
        return logits.amax(-1) > 0


class SigmoidFocalLoss(SigmoidClassLoss):
    """The focal loss (Lin et al., 2017) of Deformable and Conditional DETR: BCE weighted by
    alpha_t (1 - p_t)^gamma, summed over queries and classes, over the number of target boxes."""

    def __init__(self, num_labels: int, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__(num_labels, alpha, gamma)

    @classmethod
    def from_config(cls, config) -> "SigmoidFocalLoss":
        return cls(config.num_labels, config.focal_alpha, config.focal_gamma)

    def forward(self, logits, target_classes, target_ious, num_boxes) -> torch.Tensor:
        """logits [L, R, K], target_classes [L, R] (K: no object) -> [L]."""
        targets = self.one_hot(target_classes)
        prob = logits.sigmoid()
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p_t = prob * targets + (1 - prob) * (1 - targets)
        alpha_t = self.alpha * targets + (1 - self.alpha) * (1 - targets)
        return (alpha_t * (1 - p_t) ** self.gamma * loss).sum((1, 2)) / num_boxes


class IoUAwareLoss(SigmoidClassLoss):
    """An IoU-aware class loss (the varifocal loss, Zhang et al., 2021, as RT-DETR uses it): a matched
    query's target for its class is the IoU of its box with the target's (detached), so the score
    learns to rank boxes by localisation quality; negatives are weighted alpha * p^gamma, positives by
    their target. Summed over queries and classes, over the number of target boxes."""

    targets_iou = True

    def __init__(self, num_labels: int, alpha: float = 0.75, gamma: float = 2.0):
        super().__init__(num_labels, alpha, gamma)

    @classmethod
    def from_config(cls, config) -> "IoUAwareLoss":
        return cls(config.num_labels, config.iou_aware_alpha, config.focal_gamma)

    def forward(self, logits, target_classes, target_ious, num_boxes) -> torch.Tensor:
        """logits [L, R, K], target_classes [L, R] (K: no object), target_ious [L, R] -> [L]."""
        one_hot = self.one_hot(target_classes)
        targets = one_hot * target_ious.unsqueeze(-1)
        weight = self.alpha * logits.detach().sigmoid() ** self.gamma * (1 - one_hot) + targets
        loss = F.binary_cross_entropy_with_logits(logits, targets, weight=weight, reduction="none")
        return loss.sum((1, 2)) / num_boxes


CLASS_LOSSES = {"softmax": SoftmaxCrossEntropy, "focal": SigmoidFocalLoss, "iou_aware": IoUAwareLoss}


# ---------------------------------------------------------------------------------------------- criterion


class SetCriterion(nn.Module):
    """Args:
    matcher: a `Matcher`, called as `matcher.match_pairs(logits, pred_boxes, targets, scores=...)` (see matching.py).
    class_loss: one of CLASS_LOSSES, built for the model's labels.
    ce_coefficient, bbox_coefficient, giou_coefficient: weights of the three terms in the total loss.
    """

    def __init__(
        self,
        matcher: nn.Module,
        class_loss: nn.Module,
        ce_coefficient: float = 1.0,
        bbox_coefficient: float = 5.0,
        giou_coefficient: float = 2.0,
    ):
        super().__init__()
        self.matcher, self.class_loss = matcher, class_loss
        self.weights = {"loss_ce": ce_coefficient, "loss_bbox": bbox_coefficient, "loss_giou": giou_coefficient}
        # Derived from the numbers above, kept on the model's device (a per-step host-to-device copy would
        # wait for the GPU) and out of the state dict.
        self.register_buffer("term_weights", torch.empty(3), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the derived buffers, the class loss's too. from_pretrained builds models on the meta
        device and leaves buffers that are not in the checkpoint uninitialised, so the model's
        `_init_weights` calls this."""
        self.term_weights.copy_(torch.tensor(list(self.weights.values())))
        if hasattr(self.class_loss, "reset_buffers"):
            self.class_loss.reset_buffers()

    def forward(
        self, logits: torch.Tensor, pred_boxes: torch.Tensor, labels, queries=None, encoder_predictions=None, class_agnostic_encoder: bool = True
    ):
        """logits [L, B, T, C] and pred_boxes [L, B, T, 4] (cxcywh, 0..1) of every decoder layer, the
        last being the final output; labels: the batch's `Targets`, or per image {"class_labels": Long[N],
        "boxes": Float[N, 4] cxcywh 0..1}; queries: the decoder's `DecoderQueries` when T holds more than one
        group of queries (groups, denoising queries first), else None; encoder_predictions: two-stage, the
        encoder's (logits [B, S, C], pred_boxes [B, S, 4]) of every memory position, or None, trained against the
        targets as one class (class_agnostic_encoder, Deformable DETR) or with their classes (DINO).

        -> (loss, loss_dict). loss_dict has "loss_ce", "loss_bbox", "loss_giou" for the final layer,
        the same with suffix "_{i}" for intermediate layer i, with denoising queries the same terms with
        "_dn" before that suffix, with encoder predictions the same terms with suffix "_enc", and
        "cardinality_error" (a metric, not in loss).
        """
        num_layers = logits.shape[0]
        targets = check_labels(labels, self.class_loss.num_labels, logits.shape[1]).to(logits.device)
        num_boxes = num_boxes_across_processes(targets, logits.device)
        num_groups = queries.num_groups if queries is not None else 1
        matching = queries.matching_slice if queries is not None else slice(None)

        # Each group of queries is matched on its own: group g of image b is "image" b * G + g.
        match_logits, match_boxes = logits[:, :, matching], pred_boxes[:, :, matching]
        if num_groups > 1:
            match_logits, match_boxes = (x.unflatten(2, (num_groups, -1)).flatten(1, 2) for x in (match_logits, match_boxes))
        per_layer = {"": self.set_terms(match_logits, match_boxes, targets.repeated(num_groups), num_boxes * num_groups)}  # [3, L]
        if queries is not None and queries.num_denoising:
            dn = queries.denoising  # the same pairs in every layer
            pairs = (torch.arange(num_layers).repeat_interleave(len(dn.query_idx)),) + tuple(
                idx.repeat(num_layers) for idx in (dn.image_idx, dn.query_idx, dn.target_idx)
            )
            negatives = None
            if dn.negative_query_idx is not None:  # contrastive denoising: each negative learns "no object"
                negatives = (torch.arange(num_layers).repeat_interleave(len(dn.negative_query_idx)),) + tuple(
                    idx.repeat(num_layers) for idx in (dn.negative_image_idx, dn.negative_query_idx)
                )
            denoising = queries.denoising_slice
            per_layer["_dn"] = self.set_terms(
                logits[:, :, denoising], pred_boxes[:, :, denoising], targets, num_boxes * dn.num_groups, pairs, negatives
            )

        loss = sum((terms.sum(1) * self.term_weights).sum() for terms in per_layer.values())
        loss_dict = {}
        for part, terms in per_layer.items():
            keys = [name + part + ("" if i == num_layers - 1 else f"_{i}") for name in self.weights for i in range(num_layers)]
            loss_dict.update(zip(keys, terms.flatten().unbind()))
        if encoder_predictions is not None:
            # the first stage: every memory position against the targets (Deformable DETR: as one class, "an object")
            encoder_logits, encoder_boxes = (x[None] for x in encoder_predictions)
            encoder_targets = targets.relabelled(0) if class_agnostic_encoder else targets
            terms = self.set_terms(encoder_logits, encoder_boxes, encoder_targets, num_boxes)[:, 0]  # [3]
            loss = loss + (terms * self.term_weights).sum()
            loss_dict.update(zip((name + "_enc" for name in self.weights), terms.unbind()))
        loss_dict["cardinality_error"] = self.cardinality_error(match_logits[-1][:: num_groups], targets)
        return loss, loss_dict

    def set_terms(self, logits, pred_boxes, targets: Targets, num_boxes, pairs=None, negatives=None) -> torch.Tensor:
        """The three loss terms of every layer, [3, L] (class, L1, GIoU), for logits [L, B, Q, C] and
        pred_boxes [L, B, Q, 4] against the targets (on the logits' device). pairs: the fixed (layer, image,
        query, target) pairs of denoising queries (only those are supervised); None: the matcher pairs them,
        and every unmatched query is trained towards "no object". negatives: with fixed pairs, further
        (layer, image, query) rows, the same number in every layer, whose class target is "no object" (no box terms)."""
        num_layers, batch, num_queries = logits.shape[:3]
        device = logits.device
        # one pass over the logits serves the matcher's class cost (detached) and the class loss
        class_inputs = self.class_loss.prepare(logits)  # [L, B, Q, C]
        fixed = pairs is not None
        if not fixed:
            pairs = self.matcher.match_pairs(logits.detach(), pred_boxes.detach(), targets, scores=class_inputs.detach())
        layer_idx, image_idx, query_idx, target_idx = pairs
        # Each pair as a row of the flattened [L * B * Q] predictions and of the concatenated targets.
        prediction_row = ((layer_idx * batch + image_idx) * num_queries + query_idx).to(device)
        target_row = (target_idx + targets.starts[image_idx]).to(device)
        layer_idx = layer_idx.to(device)

        # L1 and GIoU of the pairs (and their IoU, if the class loss targets it)
        matched_boxes = center_planes(pred_boxes.reshape(-1, 4).index_select(0, prediction_row))  # [5, M]
        target_boxes = targets.boxes.to(pred_boxes.dtype)
        l1, giou, *iou = l1_and_generalized_box_iou_planes(
            matched_boxes, center_planes(target_boxes).index_select(1, target_row), with_iou=self.class_loss.targets_iou
        )

        # Classification: with matching, every query has a target class, "no object" (= K) unless
        # matched; with fixed pairs, only the paired queries, each its target's class.
        matched_classes = targets.class_labels[target_row]
        matched_ious = iou[0].detach().float() if iou else None
        if fixed:  # the same number of pairs in every layer, ordered by layer
            rows = class_inputs.reshape(-1, class_inputs.shape[-1]).index_select(0, prediction_row).view(num_layers, -1, class_inputs.shape[-1])
            classes = matched_classes.view(num_layers, -1)
            ious = matched_ious.view(num_layers, -1) if iou else None
            if negatives is not None:
                negative_row = ((negatives[0] * batch + negatives[1]) * num_queries + negatives[2]).to(device)
                negative_rows = class_inputs.reshape(-1, class_inputs.shape[-1]).index_select(0, negative_row)
                rows = torch.cat((rows, negative_rows.view(num_layers, -1, rows.shape[-1])), 1)
                classes = torch.cat((classes, classes.new_full((num_layers, negative_rows.shape[0] // num_layers), self.class_loss.num_labels)), 1)
                ious = torch.cat((ious, ious.new_zeros(classes.shape[0], classes.shape[1] - ious.shape[1])), 1) if iou else None
            loss_class = self.class_loss(rows, classes, ious, num_boxes)
        else:
            target_classes = torch.full((num_layers * batch * num_queries,), self.class_loss.num_labels, dtype=torch.long, device=device)
            target_classes[prediction_row] = matched_classes
            ious = None
            if iou:
                ious = torch.zeros(target_classes.shape, device=device).index_put_((prediction_row,), matched_ious).view(num_layers, -1)
            flat_inputs = class_inputs.reshape(num_layers, batch * num_queries, -1)
            loss_class = self.class_loss(flat_inputs, target_classes.view(num_layers, -1), ious, num_boxes)

        # Boxes: L1 and GIoU on the pairs, summed per layer, over the number of target boxes.
        per_pair = torch.stack((l1, 1 - giou))  # [2, M]
        box_terms = per_pair.new_zeros(2, num_layers).index_add(1, layer_idx, per_pair).div(num_boxes)
        return torch.cat((loss_class[None], box_terms))  # [3, L]: class, L1, GIoU

    @torch.no_grad()
    def cardinality_error(self, logits: torch.Tensor, targets: Targets) -> torch.Tensor:
        """Mean absolute error between the number of queries predicting an object and the number of
        targets, per image (logged, never back-propagated)."""
        predicted = self.class_loss.predicts_object(logits).sum(1).float()
        expected = torch.tensor(targets.sizes, dtype=torch.float32, device=logits.device)
        return (predicted - expected).abs().mean()
