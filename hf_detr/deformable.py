"""TEMPORARY reference version (replaced by the real implementation): multi-scale deformable attention."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init


def multi_scale_deformable_attention(value, spatial_shapes, sampling_locations, attention_weights):
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (value_l, (h, w)) in enumerate(zip(value.split(sizes, 1), spatial_shapes.tolist())):
        value_l = value_l.flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, int(h), int(w))
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (torch.stack(sampled, -2).flatten(-2) * weights).sum(-1).view(batch, heads * head_dim, queries)
    return out.transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    def __init__(self, d_model, num_heads, num_levels, num_points):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(d_model, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(d_model, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        init.copy_(self.sampling_offsets.bias, grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query, reference_points, value, value_mask, spatial_shapes, output_sampling=False):
        batch, num_queries, _ = query.shape
        value = self.value_proj(value)
        if value_mask is not None:
            value = value.masked_fill(~value_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], self.num_heads, -1)
        shape = (batch, num_queries, self.num_heads, self.num_levels, self.num_points)
        offsets = self.sampling_offsets(query).view(*shape, 2)
        weights = self.attention_weights(query).view(*shape[:3], -1).softmax(-1).view(shape)
        if reference_points.shape[-1] == 2:
            normaliser = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(query.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        else:
            locations = reference_points[:, :, None, :, None, :2] + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5
        output = self.output_proj(multi_scale_deformable_attention(value, spatial_shapes, locations, weights))
        return output, ((locations, weights) if output_sampling else None)
