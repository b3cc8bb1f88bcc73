"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021), in plain PyTorch.

Each query reads a few bilinearly sampled points of every feature level, at learned offsets from its
reference point, and sums them with learned weights (a softmax over all levels and points of a head).

- `multi_scale_deformable_attention`: the sampling op (the paper's CUDA kernel, here without a custom op);
- `MultiScaleDeformableAttention`: the layer around it, with the parameter names of transformers'
  `DeformableDetrMultiscaleDeformableAttention`, so that weights map 1:1.

How the op runs. A bilinear sample is a weighted sum of four pixels, so the whole op is, per
(batch, query, head), one weighted sum of 4 corners x L levels x P points rows of the value. The
corners' row indices into the flattened [B * S * H, Dh] value and their weights (attention weight x
the two bilinear factors, zero outside the map) are computed for all levels at once, with index
arithmetic on `spatial_shapes` (no copy of the value, no Python ints taken out of the tensor, so
exported graphs keep height and width dynamic). Then
- eagerly, `F.embedding_bag(mode="sum", per_sample_weights=...)` gathers and sums those rows in one
  pass without materialising them, a chunk of queries at a time. transformers' op instead runs one
  grid_sample per level into a [B * H, Dh, Q, L * P] stack (80 MB per level for an 800x1200 encoder)
  and weights and sums it afterwards. The backward (`_DeformableSampling`) recomputes the corners
  chunk by chunk: d/d(corner weight) = value row . output gradient (embedding_bag's own gradient for
  its per-sample weights), d/d(value) = index_add of weighted output gradients (autograd of
  embedding_bag would sort all indices for it: ~3x slower), and autograd through the corner code
  gives d/d(locations) and d/d(attention weights).
- while exporting or tracing, the same rows are gathered with index_select and summed with a matmul,
  one corner at a time (Gather + MatMul in ONNX). onnxscript lowers embedding_bag to an ONNX Loop
  over bags, which onnxruntime ran ~30x slower (7.1 s against 0.24 s for 20k bags of 64 rows).

Measured (fp32, one thread of a 2-core VM, the encoder of an 800x1200 image: 19947 queries x 8 heads
x 4 levels x 4 points, forward): transformers' op 1.5 s. The gather-sum alone, given the corners:
index_select + bmm 1.2 s (64 rows materialised per bag, then a batched matrix-vector product),
index_select + multiply + sum 0.5 s, embedding_bag 0.05 s; the whole op with embedding_bag 0.17-0.3 s.
Layer against layer, and the op alone: `python scripts/benchmark.py --rows deform`.

This file is part of the model surface (saved next to config.json): it imports only torch and transformers.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import initialization as init

# Eager mode works through the (batch, query) rows in chunks of about CHUNK_CORNERS corners: int32
# indices and fp32 weights, 16 MB each, under glibc's 32 MB mmap threshold, above which every
# allocation faults its pages in again (~3 us per 4 KB page on a 2-core VM). The backward scatters the
# value gradient SCATTER_CORNERS weighted rows at a time (64 MB at Dh 32), through one buffer per call.
# Otherwise chunks are as large as possible: each costs ~25 ops forward, ~50 backward (+3 per scatter),
# and on CPU every op is a thread-pool synchronisation, which waits for a scheduler time slice (~10 ms)
# when other processes hold the cores (measured at load 6 on 2 cores: a 1M-element add took 12 ms on
# 2 threads, 0.9 ms on 1; 2**17-corner chunks made the op 4x slower than transformers' there).
CHUNK_CORNERS = 2**22
SCATTER_CORNERS = 2**19


def exporting() -> bool:
    """True while torch.export / ONNX export / jit tracing records the op: it then takes the path of
    plain ops in one graph. torch.compile (not exporting) runs the eager path behind a graph break."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def multi_scale_deformable_attention(
    value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor
) -> torch.Tensor:
    """Bilinear samples of every level, weighted and summed per head.

    Args:
        value: [B, S, H, Dh], the levels flattened row-major and concatenated in order
            (S = sum over levels of h_l * w_l).
        spatial_shapes: [L, 2] int64, (h_l, w_l) of each level.
        sampling_locations: [B, Q, H, L, P, 2], (x, y) normalised to 0..1 over each level's (padded)
            map, grid_sample's align_corners=False convention: pixel i's centre is at (i + 0.5) / w_l.
            Samples outside a map read zeros (grid_sample's padding_mode="zeros").
        attention_weights: [B, Q, H, L, P].

    Returns:
        [B, Q, H * Dh]: per head, the sum over levels and points of attention weight x bilinear sample.
    """
    if exporting():
        return _sample_one_graph(value, spatial_shapes, sampling_locations, attention_weights)
    return _sample_eager(value, spatial_shapes, sampling_locations, attention_weights)


@torch.compiler.disable
def _sample_eager(value, spatial_shapes, sampling_locations, attention_weights):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (value, sampling_locations, attention_weights)):
        return _DeformableSampling.apply(value, spatial_shapes, sampling_locations, attention_weights)
    return _sample_in_chunks(value, spatial_shapes, sampling_locations, attention_weights)


# ------------------------------------------------------------------------------------------ corners


class _Layout:
    """Sizes of one call and its per-level constants, shared by every chunk of (batch, query) rows."""

    def __init__(self, value: torch.Tensor, spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor):
        self.batch, self.length, self.num_heads, self.head_dim = value.shape
        _, self.num_queries, _, self.num_levels, self.num_points, _ = sampling_locations.shape
        self.device = value.device
        # corner arithmetic in at least fp32: bf16 would misplace samples on large maps
        self.dtype = torch.promote_types(sampling_locations.dtype, torch.float32)
        self.levels = _level_constants(spatial_shapes, self.num_heads, self.num_points, self.dtype)

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """[B, Q, H, L, P, ...] -> [B * Q, H, L, P, ...]: one row per (batch, query)."""
        return tensor.reshape(self.batch * self.num_queries, *tensor.shape[2:])

    def chunks(self) -> list[tuple[int, int]]:
        """(first, last) (batch, query) rows of each chunk of about CHUNK_CORNERS corners."""
        size = max(1, CHUNK_CORNERS // (4 * self.num_heads * self.num_levels * self.num_points))
        total = self.batch * self.num_queries
        return [(first, min(first + size, total)) for first in range(0, max(total, 1), size)]  # (0, 0) if empty

    def bags(self, locations: torch.Tensor, weights: torch.Tensor, first, last) -> tuple[torch.Tensor, torch.Tensor]:
        """`_corners` of the (batch, query) rows first..last: locations [n, H, L, P, 2], weights [n, H, L, P]
        -> indices, corner weights [n * H, 4 * L * P], one bag per (batch, query, head)."""
        rows = torch.arange(first, last, device=self.device, dtype=torch.int32)
        # bag (b, q, h) reads rows b * S * H + s * H + h of the value
        bag_rows = (rows // self.num_queries * (self.length * self.num_heads))[:, None] + torch.arange(
            self.num_heads, device=self.device, dtype=torch.int32
        )
        return _corners(
            self.levels,
            locations.reshape(-1, self.num_levels, self.num_points, 2).to(self.dtype),
            weights.reshape(-1, self.num_levels, self.num_points).to(self.dtype),
            bag_rows.flatten(),
            self.num_heads,
            self.batch * self.length * self.num_heads - 1,
        )


def _level_constants(spatial_shapes: torch.Tensor, num_heads: int, num_points: int, dtype: torch.dtype) -> dict:
    """Per (level, point) constants, materialised as [L, P] / [L, P, 2] blocks: every broadcast against
    the per-sample tensors [m, L, P(, 2)] then runs over one contiguous inner block (broadcasting a
    [L, 1, 2] constant instead was several times slower on CPU)."""
    shapes = spatial_shapes.long()
    num_levels = shapes.shape[0]

    def per_point(t):
        return t[:, None].expand(num_levels, num_points, *t.shape[1:]).contiguous()

    size = shapes.flip(-1).to(dtype)  # (w, h)
    areas = shapes[:, 0] * shapes[:, 1]
    width = shapes[:, 1]
    # rows of the corners (x0, y0), (x1, y0), (x0, y1), (x1, y1) after the first, in the [B * S * H, Dh] value
    corner_rows = torch.stack([torch.zeros_like(width), torch.ones_like(width), width, width + 1]) * num_heads
    return {
        "half_size": per_point(size / 2),
        "minus_half": per_point(torch.full_like(size, -0.5)),
        "zero": per_point(torch.zeros_like(size)),
        "last": per_point(size - 1),
        "width": per_point(size[:, 0]),
        "level_start": per_point((areas.cumsum(0) - areas).to(dtype)),
        "corner_rows": corner_rows[:, :, None].expand(4, num_levels, num_points).int(),
    }


def _corners(levels: dict, locations, weights, bag_rows, num_heads: int, last_row) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear corners of every sample, the attention weight folded into the corner weights.

    Args:
        levels: `_level_constants`.
        locations: [m, L, P, 2] (x, y) in 0..1, one row per (batch, query, head) bag.
        weights: [m, L, P] attention weights.
        bag_rows: [m] int32, the value row of the bag's batch and head at s = 0.
        last_row: B * S * H - 1. Corners outside their level (weight 0) are clamped into range.

    Returns:
        (int32 indices into the [B * S * H, Dh] value, corner weights), both [m, 4 * L * P], ordered
        (corner, level, point) with the corners (x0, y0), (x1, y0), (x0, y1), (x1, y1).
    """
    # grid_sample's own arithmetic to the bit (it unnormalises 2 * loc - 1 with a fused multiply-add):
    # one rounding apart, a sample at a pixel edge would get the other corner's gradient
    pixel = torch.addcmul(levels["minus_half"], (locations * 2 - 1) + 1, levels["half_size"])
    low = pixel.floor()
    frac = pixel - low
    corners = torch.stack([low, low + 1], 1)  # [m, 2 (low, high), L, P, 2 (x, y)]
    inside = corners.clamp(levels["zero"], levels["last"]) == corners
    factors = torch.stack([1 - frac, frac], 1) * inside  # bilinear factors, 0 outside the map
    y_factors = factors[..., 1] * weights[:, None]  # [m, 2, L, P]
    corner_weights = y_factors[:, :, None] * factors[:, None, ..., 0]  # [m, 2 (y), 2 (x), L, P]

    top_left = torch.addcmul(low[..., 0] + levels["level_start"], low[..., 1], levels["width"]).int()
    indices = (top_left * num_heads + bag_rows[:, None, None])[:, None] + levels["corner_rows"]  # [m, 4, L, P]
    return indices.clamp_(0, last_row).flatten(1), corner_weights.flatten(1)


# ------------------------------------------------------------------------------- the three paths


def _sample_in_chunks(value, spatial_shapes, sampling_locations, attention_weights):
    layout = _Layout(value, spatial_shapes, sampling_locations)
    heads, head_dim = layout.num_heads, layout.head_dim
    table = value.reshape(-1, head_dim)
    locations, weights = layout.rows(sampling_locations), layout.rows(attention_weights)
    outputs = []
    for first, last in layout.chunks():
        indices, corner_weights = layout.bags(locations[first:last], weights[first:last], first, last)
        outputs.append(F.embedding_bag(indices, table, per_sample_weights=corner_weights.to(table.dtype), mode="sum"))
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return output.view(layout.batch, layout.num_queries, heads * head_dim)


class _DeformableSampling(torch.autograd.Function):
    """`_sample_in_chunks` with a backward that recomputes the corners chunk by chunk: nothing but the
    inputs is kept between forward and backward."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, sampling_locations, attention_weights):
        ctx.save_for_backward(value, spatial_shapes, sampling_locations, attention_weights)
        return _sample_in_chunks(value, spatial_shapes, sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, sampling_locations, attention_weights = ctx.saved_tensors
        need_value, _, need_locations, need_weights = ctx.needs_input_grad
        layout = _Layout(value, spatial_shapes, sampling_locations)
        heads, head_dim = layout.num_heads, layout.head_dim
        table = value.reshape(-1, head_dim)
        grad_output = grad_output.reshape(-1, head_dim)  # one row per (batch, query, head)
        locations, weights = layout.rows(sampling_locations), layout.rows(attention_weights)
        grad_table = torch.zeros_like(table) if need_value else None
        weighted = None  # the scatter buffer, allocated once
        grad_locations = torch.zeros_like(locations) if need_locations else None
        grad_weights = torch.zeros_like(weights) if need_weights else None
        for first, last in layout.chunks():
            with torch.enable_grad():
                chunk_locations = locations[first:last].detach().requires_grad_(need_locations)
                chunk_weights = weights[first:last].detach().requires_grad_(need_weights)
                indices, corner_weights = layout.bags(chunk_locations, chunk_weights, first, last)
            grad_chunk = grad_output[first * heads : last * heads]
            if need_locations or need_weights:
                # d output / d corner weight = value row . output gradient: embedding_bag's own gradient
                # for its per-sample weights, one loop that never materialises the rows
                with torch.enable_grad():
                    leaf = corner_weights.detach().to(table.dtype).requires_grad_()
                    summed = F.embedding_bag(indices, table.detach(), per_sample_weights=leaf, mode="sum")
                (grad_corners,) = torch.autograd.grad(summed, leaf, grad_chunk)
                wanted = [t for t in (chunk_locations, chunk_weights) if t.requires_grad]
                grads = iter(torch.autograd.grad(corner_weights, wanted, grad_corners.to(corner_weights.dtype)))
                if need_locations:
                    grad_locations[first:last] = next(grads)
                if need_weights:
                    grad_weights[first:last] = next(grads)
            if need_value:  # (embedding_bag's value gradient would sort all indices: 3x slower)
                scatter_weights = corner_weights.detach().to(table.dtype)
                step = max(1, SCATTER_CORNERS // indices.shape[1])
                if weighted is None:
                    weighted = grad_chunk.new_empty(min(step, indices.shape[0]), indices.shape[1], head_dim)
                for bag in range(0, indices.shape[0], step):
                    rows = weighted[: min(step, indices.shape[0] - bag)]
                    torch.mul(scatter_weights[bag : bag + step, :, None], grad_chunk[bag : bag + step, None], out=rows)
                    # int64: index_add_ then runs as one scatter_add (2x faster than its int32 loop)
                    grad_table.index_add_(0, indices[bag : bag + step].flatten().long(), rows.flatten(0, 1))
        return (
            None if grad_table is None else grad_table.view_as(value),
            None,
            None if grad_locations is None else grad_locations.view_as(sampling_locations),
            None if grad_weights is None else grad_weights.view_as(attention_weights),
        )


def _sample_one_graph(value, spatial_shapes, sampling_locations, attention_weights):
    """The export path: all (batch, query) rows at once, with ops every exporter maps to plain ONNX
    (Gather, MatMul). One corner at a time, the gathered rows are [B * Q * H, L * P, Dh]."""
    layout = _Layout(value, spatial_shapes, sampling_locations)
    rows = layout.batch * layout.num_queries
    table = value.reshape(-1, layout.head_dim)
    indices, corner_weights = layout.bags(layout.rows(sampling_locations), layout.rows(attention_weights), 0, rows)
    bags = indices.shape[0]
    indices = indices.view(bags, 4, -1)
    corner_weights = corner_weights.to(table.dtype).view(bags, 4, 1, -1)
    output = None
    for corner in range(4):
        gathered = table.index_select(0, indices[:, corner].reshape(-1)).view(bags, -1, layout.head_dim)
        term = torch.matmul(corner_weights[:, corner], gathered)  # [bags, 1, Dh]
        output = term if output is None else output + term
    return output.view(layout.batch, layout.num_queries, layout.num_heads * layout.head_dim)


# ------------------------------------------------------------------------------------------ the layer


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention of queries over multi-level feature maps.

    Parameters (the names and shapes of transformers' `DeformableDetrMultiscaleDeformableAttention`):
    `sampling_offsets` (d_model -> H * L * P * 2), `attention_weights` (d_model -> H * L * P),
    `value_proj` and `output_proj` (d_model -> d_model).
    """

    def __init__(self, d_model: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model, self.num_heads, self.num_levels, self.num_points = d_model, num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(d_model, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(d_model, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Deformable DETR's initialisation. The offsets start independent of the query: head h looks
        along the direction at angle 2 pi h / H, scaled so that its larger coordinate is 1 (a point of
        the square around the reference), and point k sits k + 1 such steps away: k + 1 pixels of every
        level (2-D references), or (k + 1) / P of the way to the box's edge (4-D references). Attention starts uniform
        over levels and points; the projections are Xavier-uniform with zero bias."""
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        angles = torch.arange(heads, dtype=torch.float32) * (2 * math.pi / heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().amax(-1, keepdim=True)
        steps = torch.arange(1, points + 1, dtype=torch.float32)
        offsets = directions[:, None, None, :] * steps[None, None, :, None]  # [H, 1, P, 2]
        nn.init.zeros_(self.sampling_offsets.weight)
        # whole tensors through transformers' guarded init only: from_pretrained runs this too, on loaded weights
        init.copy_(self.sampling_offsets.bias, offsets.expand(heads, levels, points, 2).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        value_mask: torch.Tensor | None,
        spatial_shapes: torch.Tensor,
        output_sampling: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """
        Args:
            query: [B, Q, D], position embedding already added.
            reference_points: [B, Q, L, 2] (x, y) or [B, Q, L, 4] (cx, cy, w, h), normalised 0..1 over
                each level's padded map (already scaled by the level's valid ratio).
            value: [B, S, D], the flattened levels (before value_proj).
            value_mask: [B, S] bool, True at real positions (padded ones are zeroed before sampling), or None.
            spatial_shapes: [L, 2] int64, (h_l, w_l) of each level.
            output_sampling: also return where each query sampled and with which weight.

        Returns:
            (output [B, Q, D], sampling): sampling is None, or with `output_sampling`
            (sampling_locations [B, Q, H, L, P, 2] (x, y) in 0..1, attention_weights [B, Q, H, L, P]).
        """
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if value_mask is not None:
            value = value.masked_fill(~value_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], heads, self.d_model // heads)

        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        if reference_points.shape[-1] == 2:  # offsets in pixels of each level
            size = spatial_shapes.flip(-1)[None, None, None, :, None, :]  # (w, h)
            locations = reference_points[:, :, None, :, None, :] + offsets / size
        elif reference_points.shape[-1] == 4:  # offsets in box sizes: P points reach half the box
            boxes = reference_points[:, :, None, :, None, :]
            locations = boxes[..., :2] + offsets / points * boxes[..., 2:] * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got {tuple(reference_points.shape)}")

        output = self.output_proj(multi_scale_deformable_attention(value, spatial_shapes, locations, weights))
        return output, ((locations, weights) if output_sampling else None)
