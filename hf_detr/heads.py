"""The prediction heads: a class head (one linear layer) and a box head (DETR's 3-layer MLP) on every decoder
layer's output, one pair shared by all layers (the paper's DETR) or one pair per layer (Deformable DETR's
iterative box refinement, `with_box_refine`). The model ties them once: the decoder refines its references
with the same box heads that predict the boxes.

This file is part of the model surface (saved next to config.json): it imports only torch and its siblings.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .box_ops import inverse_sigmoid
from .layers import MLP


class HfDetrBoxHead(MLP):
    """DETR's 3-layer box MLP: [..., D] -> [..., 4] boxes (sigmoid, cxcywh, 0..1). Given reference points
    or boxes [..., r] (sigmoid space), it predicts offsets to them: sigmoid(delta + inverse_sigmoid(reference))
    on the first r coordinates (Conditional DETR: the centre; DAB-DETR: the whole box)."""

    def __init__(self, d_model: int, num_layers: int = 3):
        super().__init__(d_model, d_model, 4, num_layers)

    def deltas(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., 4] the MLP's output, in inverse-sigmoid space."""
        return super().forward(x)

    def forward(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        delta = self.deltas(x)
        if reference is not None:
            delta = delta + F.pad(inverse_sigmoid(reference), (0, 4 - reference.shape[-1]))
        return delta.sigmoid()

    @torch.no_grad()
    def start_at_reference(self, size_logit: float = 0.0) -> None:
        """Zero the last layer, so that the first boxes are the references themselves (and a box around a
        reference point has sides sigmoid(size_logit)). Whole tensors through transformers' guarded init
        functions only: from_pretrained runs this too, and must leave loaded weights alone."""
        last = self.layers[-1]
        nn.init.zeros_(last.weight)
        init.copy_(last.bias, torch.tensor([0.0, 0.0, size_logit, size_logit], dtype=last.bias.dtype, device=last.bias.device))


def start_at_prior(class_head: nn.Linear, prior_probability: float) -> None:
    """A sigmoid class head whose every class starts at probability `prior_probability` (RetinaNet, Deformable DETR)."""
    nn.init.constant_(class_head.bias, -math.log((1 - prior_probability) / prior_probability))


class HfDetrHeads(nn.Module):
    """The class and box heads of the decoder layers.

    num_classes: the class head's outputs (num_labels + 1 with "no object" last for the softmax class loss,
    num_labels for the sigmoid ones); per_layer: one pair per decoder layer (with_box_refine) instead of one
    shared pair. Initialisation (`reset_parameters`): sigmoid class heads start at `prior_probability`;
    with references, box heads start at the reference (`start_at_reference`; the first layer's boxes around
    reference points with sides of logit `box_size_logit`)."""

    def __init__(
        self, d_model: int, num_classes: int, num_layers: int, per_layer: bool = False, prior_probability: float | None = None,
        start_at_reference: bool = False, box_size_logit: float = 0.0,
    ):  # fmt: skip
        super().__init__()
        count = num_layers if per_layer else 1
        self.class_heads = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(count))
        self.box_heads = nn.ModuleList(HfDetrBoxHead(d_model) for _ in range(count))
        self.per_layer = per_layer
        self.prior_probability, self.start_at_reference, self.box_size_logit = prior_probability, start_at_reference, box_size_logit

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The heads' own init, after their layers' default one."""
        for layer, (class_head, box_head) in enumerate(zip(self.class_heads, self.box_heads)):
            if self.prior_probability is not None:
                start_at_prior(class_head, self.prior_probability)
            if self.start_at_reference:  # the size logit is for the boxes around the first layer's reference points
                box_head.start_at_reference(self.box_size_logit if layer == 0 else 0.0)

    def box_head(self, layer: int) -> HfDetrBoxHead:
        return self.box_heads[layer if self.per_layer else 0]

    def forward(self, hidden_states: torch.Tensor, references: torch.Tensor | None = None, first_layer: int = 0):
        """hidden_states [L, B, T, D] of decoder layers first_layer ... first_layer + L - 1, references
        [L, B, T, r] or None -> (logits [L, B, T, C], pred_boxes [L, B, T, 4] sigmoid cxcywh)."""
        if not self.per_layer:  # one product over every layer
            return self.class_heads[0](hidden_states), self.box_heads[0](hidden_states, references)
        layers = range(first_layer, first_layer + hidden_states.shape[0])
        logits = torch.stack([self.class_heads[layer](hidden_states[i]) for i, layer in enumerate(layers)])
        boxes = [self.box_heads[layer](hidden_states[i], None if references is None else references[i]) for i, layer in enumerate(layers)]
        return logits, torch.stack(boxes)


__all__ = ["HfDetrBoxHead", "HfDetrHeads", "start_at_prior"]
