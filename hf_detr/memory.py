"""The encoder's memory: the backbone's feature levels projected to d_model, flattened and concatenated, with
their positions and padding mask (`EncoderMemory`); single-scale DETR is its one-level case. And the
two-stage proposals read from it (`EncoderProposals`).

    backbone stages [B, C_l, h_l, w_l] -> 1x1 projection per stage (+ GroupNorm), extra stride-2 3x3 levels
      -> sine positions (+ a learned level embedding) -> EncoderMemory: features [B, S, D], position [B, S, D],
         mask [B, S], spatial_shapes [L, 2], level_start_index [L], valid_ratios [B, L, 2]   (S = sum h_l * w_l)

This file is part of the model surface (saved next to config.json): it imports only torch and its siblings.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import downsample_mask
from .heads import HfDetrBoxHead
from .kernels import padding_mask_or_none


@dataclass
class EncoderMemory:
    """Every feature level, flattened row-major and concatenated, highest resolution first. The encoder's
    input, and (with `features` replaced by the encoder's output) what the decoder and the proposals read."""

    features: torch.Tensor  # [B, S, D]
    position: torch.Tensor  # [B, S, D] sine positions (+ level embedding); never added to values
    mask: torch.Tensor | None  # [B, S] bool, True = real position; None: nothing is padded (a CPU shortcut)
    spatial_shapes: torch.Tensor  # [L, 2] int64 (h_l, w_l)
    level_start_index: torch.Tensor  # [L] int64: each level's first position in S
    valid_ratios: torch.Tensor  # [B, L, 2] (width, height): the real fraction of each level of each image
    level_shapes: list[tuple[int, int]]  # the same shapes as Python values (for splits and grids)

    def replace(self, **changes) -> "EncoderMemory":
        return dataclasses.replace(self, **changes)

    def key_padding_mask(self) -> torch.Tensor | None:
        """[B, 1, 1, S] for dense attention (True: may attend), or None."""
        return None if self.mask is None else self.mask[:, None, None, :]

    def positions_in_levels(self) -> torch.Tensor:
        """[S, 2] every position's centre (x, y), normalised to its level's padded size: ((j + 0.5) / w, (i + 0.5) / h)."""
        centres = []
        for height, width in self.level_shapes:
            y = (torch.arange(height, device=self.features.device, dtype=self.features.dtype) + 0.5) / height
            x = (torch.arange(width, device=self.features.device, dtype=self.features.dtype) + 0.5) / width
            centres.append(torch.stack(torch.meshgrid(x, y, indexing="xy"), -1).reshape(-1, 2))
        return torch.cat(centres)

    def level_of_position(self) -> torch.Tensor:
        """[S] the level of every position (built from the shapes, not counts in a tensor: an exported graph keeps
        the levels' sizes symbolic)."""
        device = self.features.device
        return torch.cat([torch.full((h * w,), level, device=device) for level, (h, w) in enumerate(self.level_shapes)])

    def reference_points(self) -> torch.Tensor:
        """[B, S, L, 2] Deformable DETR's encoder references: each position's centre, relative to its level's real
        extent, then placed on every level's real extent (a position keeps its place in the image across levels)."""
        in_image = self.positions_in_levels()[None] / self.valid_ratios[:, self.level_of_position()]  # [B, S, 2]
        return in_image[:, :, None] * self.valid_ratios[:, None]


def sine_position_embedding(mask: torch.Tensor, d_model: int, temperature: int, dtype: torch.dtype, offset: float = 0.0) -> torch.Tensor:
    """DETR's 2D sine position embedding that counts only real (un-padded) positions.

    mask [B, h, w] (True = real) -> [B, h*w, d_model]: the first half encodes y, the second x, each as
    interleaved sin/cos of the position normalised to (0, 2*pi] over the real extent. offset: subtracted from
    the 1-based count before normalising (DETR 0, Deformable DETR 0.5: pixel centres)."""
    num_features = d_model // 2
    y = mask.cumsum(1, dtype=dtype)
    x = mask.cumsum(2, dtype=dtype)
    eps, scale = 1e-6, 2 * math.pi
    y = (y - offset) / (y[:, -1:, :] + eps) * scale
    x = (x - offset) / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_features, device=mask.device, dtype=torch.int64).to(dtype)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_features)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).flatten(1, 2)


def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, h, w] (True = real, padding at the bottom / right) -> [B, 2] (real width / w, real height / h)."""
    height, width = mask.shape[-2:]
    return torch.stack((mask[:, 0, :].sum(1) / width, mask[:, :, 0].sum(1) / height), -1).float()


def uses_level_embedding(config) -> bool:
    """Deformable DETR's input side, a GroupNorm after every projection and a learned embedding per level:
    with several levels, or with deformable attention (which is built around levels); DETR's one map has neither."""
    return config.num_feature_levels > 1 or "deformable" in (config.encoder_attention, config.decoder_cross_attention)


class HfDetrFeatureLevels(nn.Module):
    """Backbone stages -> the EncoderMemory: a 1x1 projection of each stage to d_model (+ GroupNorm(32)), then
    `num_feature_levels - stages` extra levels, each a stride-2 3x3 convolution (+ GroupNorm) of the level
    before (the first of the last stage's features), sine positions of every level (+ a learned level
    embedding), all flattened and concatenated."""

    def __init__(self, config, backbone_channels: list[int]):
        super().__init__()
        d = config.d_model
        self.levels = uses_level_embedding(config)
        projections = [nn.Conv2d(channels, d, kernel_size=1) for channels in backbone_channels]
        in_channels = backbone_channels[-1]
        for _ in range(config.num_feature_levels - len(backbone_channels)):
            projections.append(nn.Conv2d(in_channels, d, kernel_size=3, stride=2, padding=1))
            in_channels = d
        if self.levels:
            projections = [nn.Sequential(conv, nn.GroupNorm(32, d)) for conv in projections]
            self.level_embed = nn.Parameter(torch.empty(config.num_feature_levels, d))
        self.projections = nn.ModuleList(projections)
        self.num_stages = len(backbone_channels)
        self.d_model, self.temperature, self.offset = d, config.position_embedding_temperature, config.position_embedding_offset

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.levels:
            nn.init.normal_(self.level_embed)

    def forward(self, stages: list[tuple[torch.Tensor, torch.Tensor]], pixel_mask: torch.Tensor) -> EncoderMemory:
        """stages: the backbone's (feature map [B, C_l, h_l, w_l], mask [B, h_l, w_l]) per stage."""
        maps, masks = [], []
        for projection, (feature_map, mask) in zip(self.projections, stages):
            maps.append(projection(feature_map))
            masks.append(mask)
        for projection in self.projections[self.num_stages :]:
            maps.append(projection(stages[-1][0] if len(maps) == self.num_stages else maps[-1]))
            masks.append(downsample_mask(pixel_mask, maps[-1]))
        positions = []
        for level, (feature_map, mask) in enumerate(zip(maps, masks)):
            position = sine_position_embedding(mask, self.d_model, self.temperature, feature_map.dtype, self.offset)
            positions.append(position + self.level_embed[level] if self.levels else position)
        level_shapes = [tuple(feature_map.shape[-2:]) for feature_map in maps]
        sizes = torch.tensor([h * w for h, w in level_shapes], device=maps[0].device)
        return EncoderMemory(
            features=torch.cat([feature_map.flatten(2).transpose(1, 2) for feature_map in maps], 1),
            position=torch.cat(positions, 1),
            mask=padding_mask_or_none(torch.cat([mask.flatten(1) for mask in masks], 1)),
            spatial_shapes=torch.tensor(level_shapes, dtype=torch.long, device=maps[0].device),
            level_start_index=sizes.cumsum(0) - sizes,
            valid_ratios=torch.stack([valid_ratios(mask) for mask in masks], 1).to(maps[0].dtype),
            level_shapes=level_shapes,
        )


# -------------------------------------------------------------------------------------- two-stage proposals


@dataclass
class Proposals:
    """The encoder stage of two-stage Deformable DETR: a scored box for every memory position, and the top ones."""

    logits: torch.Tensor  # [B, S, C] the encoder's class head on every position
    pred_boxes: torch.Tensor  # [B, S, 4] its boxes (sigmoid, cxcywh); 1.0 at padded and border positions
    selected_boxes: torch.Tensor  # [B, K, 4] the boxes of the K best-scoring positions, detached: the decoder's references
    selected_index: torch.Tensor  # [B, K] those positions


class EncoderProposals(nn.Module):
    """Two-stage Deformable DETR (Zhu et al., 2021, sec. A.4): every memory position proposes a box, a fixed box
    centred on it (sides 0.05 * 2^level of the real image), refined by the stage's own box head from a
    projected and normed copy of the memory; its own class head scores it; the `num_proposals` best-scoring
    positions go to the decoder. class_agnostic (Deformable DETR): the stage is trained as one class, "an
    object", and scored by its first class; else (DINO) trained with the targets' classes and scored by the
    best class. Positions that are padding, or whose fixed box is within 0.01 of the border, propose nothing
    useful: their box logits are +inf and their features zero, as in the paper's code."""

    def __init__(self, d_model: int, num_classes: int, num_proposals: int, class_agnostic: bool = True):
        super().__init__()
        self.output_proj = nn.Linear(d_model, d_model)
        self.output_norm = nn.LayerNorm(d_model)
        self.class_head = nn.Linear(d_model, num_classes)
        self.box_head = HfDetrBoxHead(d_model)
        self.num_proposals, self.class_agnostic = num_proposals, class_agnostic

    def fixed_boxes(self, memory: EncoderMemory) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (box logits [B, S, 4] in inverse-sigmoid space, valid [B, S] bool)."""
        centres = memory.positions_in_levels()  # [S, 2] relative to each level's padded size
        level_of_position = memory.level_of_position()
        centres = centres[None] / memory.valid_ratios[:, level_of_position]  # relative to the real extent
        sides = (0.05 * 2.0 ** level_of_position.to(centres.dtype))[None, :, None].expand_as(centres)
        boxes = torch.cat((centres, sides), -1)
        valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1)
        if memory.mask is not None:
            valid = valid & memory.mask
        logits = torch.log(boxes / (1 - boxes)).masked_fill(~valid[..., None], float("inf"))
        return logits, valid

    def forward(self, memory: EncoderMemory) -> Proposals:
        box_logits, valid = self.fixed_boxes(memory)
        features = self.output_norm(self.output_proj(memory.features.masked_fill(~valid[..., None], 0.0)))
        logits = self.class_head(features)
        coordinates = self.box_head.deltas(features) + box_logits  # [B, S, 4], inverse-sigmoid space
        if coordinates.shape[1] < self.num_proposals:
            raise ValueError(f"two-stage: {coordinates.shape[1]} memory positions for {self.num_proposals} proposals (num_queries)")
        scores = logits[..., 0] if self.class_agnostic else logits.max(-1).values
        selected_index = scores.topk(self.num_proposals, dim=1).indices  # [B, K]
        selected = coordinates.gather(1, selected_index[..., None].expand(-1, -1, 4))
        return Proposals(logits, coordinates.sigmoid(), selected.detach().sigmoid(), selected_index)


__all__ = ["EncoderMemory", "HfDetrFeatureLevels", "EncoderProposals", "Proposals", "sine_position_embedding", "uses_level_embedding"]
