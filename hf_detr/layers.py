"""The transformer's building blocks: the attention kinds, the feed-forward block, a small MLP, and the
encoder and decoder layers.

The attention kinds are values of the config, picked from this file's dicts: the encoder's self-attention
(`ENCODER_ATTENTION`, config.encoder_attention) and the decoder's cross-attention (`CROSS_ATTENTION`,
config.decoder_cross_attention). Every kind of a dict takes the same arguments, so the layers and the
decoder loop never know which one runs:
- "dense": multi-head attention over every memory position (DETR);
- "spatial": Conditional DETR's cross-attention, a content and a spatial dot product per head;
- "deformable": multi-scale deformable attention (Deformable DETR, deformable.py): each query reads a few
  sampled points around its reference on every feature level.

Dense attention runs through transformers' attention interface (`config._attn_implementation`: "sdpa" by
default, or "eager", this file's `eager_attention`, which also gives the probabilities).

Positions never reach the values (DETR sec. A.3). They reach queries and keys in one of three ways:
- added before the shared projections, q = W_q (x + p) (DETR: `HfDetrAttention`, its callers add them);
- projected on their own, q = W_q x + W_q' p (Conditional DETR, DAB-DETR decoder self-attention:
  `PositionProjectedAttention`);
- concatenated per head, q_h = [W_q x ; W_s s]_h against k_h = [W_k m ; W_k' p]_h, so that attention
  sums a content and a spatial dot product (Conditional DETR's cross-attention: `SpatialCrossAttention`).
Deformable attention adds them to its query, from which it predicts where to sample and how to weigh.

This file is part of the model surface (saved next to config.json): it imports only torch, transformers
and its siblings.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .deformable import MultiScaleDeformableAttention


def eager_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """The explicit attention path, with the probabilities: transformers' attention interface (its "eager";
    `sdpa` and the others come from transformers' ALL_ATTENTION_FUNCTIONS).

    query [B, H, T, E], key [B, H, S, E], value [B, H, S, Ev]; attention_mask: bool, True where a query
    may attend, broadcast to [B, H, T, S] ([B, 1, 1, S] key padding, [T, T] between queries), or None
    -> (output [B, T, H, Ev], probabilities [B, H, T, S])."""
    scores = (query @ key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = scores.softmax(-1)
    output = F.dropout(weights, dropout, module.training) @ value
    return output.transpose(1, 2), weights


class HfDetrAttention(nn.Module):
    """Multi-head attention over given queries, keys and values (positions already added by the
    caller to what becomes queries and keys). mask: see `eager_attention`.

    config: the model's config, read at call time for `_attn_implementation` ("sdpa" by default,
    "eager"; transformers' attention interface). The probabilities (`output_attentions`) always come
    from the eager path."""

    is_causal = False

    def __init__(self, d_model: int, num_heads: int, dropout: float, config=None):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout, self.config = num_heads, d_model // num_heads, dropout, config
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, H, T, D / H]."""
        return x.view(*x.shape[:2], self.num_heads, -1).transpose(1, 2)

    def attend(self, q, k, v, mask, output_attentions):
        """Head-split q, k, v -> (o_proj of the merged heads [B, T, D], weights or None); scale 1 / sqrt(q's head size)."""
        implementation = "eager" if output_attentions else getattr(self.config, "_attn_implementation", None) or "sdpa"
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        dropout = self.dropout if self.training else 0.0
        output, weights = attention(self, q, k, v, mask, scaling=q.shape[-1] ** -0.5, dropout=dropout, is_causal=False)
        return self.o_proj(output.flatten(2)), weights

    def forward(self, query, key, value, mask=None, output_attentions=False):
        """query [B, T, D], key and value [B, S, D] -> (output [B, T, D], weights [B, heads, T, S] or None)."""
        q, k, v = self.heads(self.q_proj(query)), self.heads(self.k_proj(key)), self.heads(self.v_proj(value))
        return self.attend(q, k, v, mask, output_attentions)


class DecoderSelfAttention(HfDetrAttention):
    """The decoder's self-attention among the queries, DETR's: the query position added to queries and keys."""

    @classmethod
    def from_config(cls, config) -> "DecoderSelfAttention":
        return cls(config.d_model, config.decoder_attention_heads, config.attention_dropout, config)

    def forward(self, hidden_states, position, mask=None, output_attentions=False):
        """hidden_states, position [B, T, D]; mask [T, T] (True: may attend) or None -> (output [B, T, D], weights or None)."""
        query_key = hidden_states + position
        return super().forward(query_key, query_key, hidden_states, mask, output_attentions)


class PositionProjectedAttention(DecoderSelfAttention):
    """Self-attention whose positions have projections of their own: q = W_q x + W_q' p,
    k = W_k x + W_k' p, v = W_v x (Conditional DETR and DAB-DETR's decoder self-attention)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, config=None):
        super().__init__(d_model, num_heads, dropout, config)
        self.q_pos_proj = nn.Linear(d_model, d_model)
        self.k_pos_proj = nn.Linear(d_model, d_model)

    def forward(self, hidden_states, position, mask=None, output_attentions=False):
        q = self.heads(self.q_proj(hidden_states) + self.q_pos_proj(position))
        k = self.heads(self.k_proj(hidden_states) + self.k_pos_proj(position))
        return self.attend(q, k, self.heads(self.v_proj(hidden_states)), mask, output_attentions)


# ---------------------------------------------------------------------------------- encoder self-attention
# forward(hidden_states [B, S, D], position [B, S, D], memory: EncoderMemory (its mask and levels),
#         reference_points [B, S, L, 2] or None, output_attentions) -> (output [B, S, D], attention or None)


class DenseSelfAttention(HfDetrAttention):
    """DETR's encoder self-attention: every position attends to every real one, positions added to queries and keys."""

    needs_reference_points = False

    @classmethod
    def from_config(cls, config) -> "DenseSelfAttention":
        return cls(config.d_model, config.encoder_attention_heads, config.attention_dropout, config)

    def forward(self, hidden_states, position, memory, reference_points=None, output_attentions=False):
        query_key = hidden_states + position
        return super().forward(query_key, query_key, hidden_states, memory.key_padding_mask(), output_attentions)


class DeformableSelfAttention(MultiScaleDeformableAttention):
    """Deformable DETR's encoder self-attention: each position samples a few points around itself on every level."""

    needs_reference_points = True

    @classmethod
    def from_config(cls, config) -> "DeformableSelfAttention":
        return cls(config.d_model, config.encoder_attention_heads, config.num_feature_levels, config.encoder_n_points)

    def forward(self, hidden_states, position, memory, reference_points=None, output_attentions=False):
        return super().forward(
            hidden_states + position, reference_points, hidden_states, memory.mask, memory.spatial_shapes, output_sampling=output_attentions
        )  # fmt: skip


ENCODER_ATTENTION = {"dense": DenseSelfAttention, "deformable": DeformableSelfAttention}


# --------------------------------------------------------------------------------- decoder cross-attention
# forward(hidden_states [B, T, D], query_position [B, T, D], spatial_query [B, T, D] or None, reference
#         [B, T, 2 | 4] or None (sigmoid space), memory: EncoderMemory, output_attentions)
# -> (output [B, T, D], attention or None). `self_attention`: the decoder self-attention that goes with it.


class DenseCrossAttention(HfDetrAttention):
    """DETR's cross-attention: query position added to the queries, memory positions to the keys."""

    self_attention = DecoderSelfAttention

    @classmethod
    def from_config(cls, config, first_layer: bool = False) -> "DenseCrossAttention":
        return cls(config.d_model, config.decoder_attention_heads, config.attention_dropout, config)

    def forward(self, hidden_states, query_position, spatial_query, reference, memory, output_attentions=False):
        key = memory.features + memory.position
        return super().forward(hidden_states + query_position, key, memory.features, memory.key_padding_mask(), output_attentions)


class SpatialCrossAttention(HfDetrAttention):
    """Conditional DETR's cross-attention (Meng et al., 2021, sec. 3.3): each head's query is its content
    part concatenated with its part of the spatial query, each key its content part with its part of
    the projected memory positions, so that the attention weight sums a content and a spatial dot
    product (scale 1 / sqrt(2 * head size)). In the first layer the query position and memory positions
    are also added to the content parts, as in DETR (`first_layer`)."""

    self_attention = PositionProjectedAttention

    def __init__(self, d_model: int, num_heads: int, dropout: float, first_layer: bool, config=None):
        super().__init__(d_model, num_heads, dropout, config)
        self.k_pos_proj = nn.Linear(d_model, d_model)
        self.q_sine_proj = nn.Linear(d_model, d_model)
        self.q_pos_proj = nn.Linear(d_model, d_model) if first_layer else None

    @classmethod
    def from_config(cls, config, first_layer: bool = False) -> "SpatialCrossAttention":
        return cls(config.d_model, config.decoder_attention_heads, config.attention_dropout, first_layer, config)

    def forward(self, hidden_states, query_position, spatial_query, reference, memory, output_attentions=False):
        query, key = self.q_proj(hidden_states), self.k_proj(memory.features)
        key_position = self.k_pos_proj(memory.position)
        if self.q_pos_proj is not None:
            query = query + self.q_pos_proj(query_position)
            key = key + key_position
        q = torch.cat((self.heads(query), self.heads(self.q_sine_proj(spatial_query))), -1)
        k = torch.cat((self.heads(key), self.heads(key_position)), -1)
        return self.attend(q, k, self.heads(self.v_proj(memory.features)), memory.key_padding_mask(), output_attentions)


class DeformableCrossAttention(MultiScaleDeformableAttention):
    """Deformable DETR's cross-attention: each query samples a few points around its reference point (or
    within its reference box) on every level, the reference scaled to each level's real extent."""

    self_attention = DecoderSelfAttention

    @classmethod
    def from_config(cls, config, first_layer: bool = False) -> "DeformableCrossAttention":
        return cls(config.d_model, config.decoder_attention_heads, config.num_feature_levels, config.decoder_n_points)

    def forward(self, hidden_states, query_position, spatial_query, reference, memory, output_attentions=False):
        ratios = memory.valid_ratios if reference.shape[-1] == 2 else memory.valid_ratios.repeat(1, 1, 2)
        reference = reference[:, :, None] * ratios[:, None]  # [B, T, L, 2 | 4]
        return super().forward(
            hidden_states + query_position, reference, memory.features, memory.mask, memory.spatial_shapes, output_sampling=output_attentions
        )  # fmt: skip


CROSS_ATTENTION = {"dense": DenseCrossAttention, "spatial": SpatialCrossAttention, "deformable": DeformableCrossAttention}


class HfDetrMLP(nn.Module):
    """The transformer layers' feed-forward block: fc1 -> activation -> fc2."""

    def __init__(self, d_model: int, ffn_dim: int, activation: str, activation_dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, ffn_dim), nn.Linear(ffn_dim, d_model)
        self.activation, self.activation_dropout = ACT2FN[activation], activation_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(self.activation(self.fc1(x)), self.activation_dropout, self.training))


class MLP(nn.Module):
    """A small perceptron, ReLU between its `num_layers` linear layers (DETR's box head; the query
    builders' and DAB-DETR encoder's position MLPs)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        sizes = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class _Residual(GradientCheckpointingLayer):
    """The layers' residual blocks: x + dropout(f(x)), the norm after (post-norm, the paper's) or before.
    A transformers GradientCheckpointingLayer: `model.gradient_checkpointing_enable()` recomputes the
    layer in the backward instead of keeping its activations."""

    def block(self, norm, hidden_states, compute):
        inner = norm(hidden_states) if self.normalize_before else hidden_states
        output, weights = compute(inner)
        hidden_states = hidden_states + F.dropout(output, self.dropout, self.training)
        return (hidden_states if self.normalize_before else norm(hidden_states)), weights


class HfDetrEncoderLayer(_Residual):
    """Self-attention over the memory (the kind config.encoder_attention names) + FFN."""

    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.self_attn = ENCODER_ATTENTION[config.encoder_attention].from_config(config)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.mlp = HfDetrMLP(d, config.encoder_ffn_dim, config.activation_function, config.activation_dropout)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout, self.normalize_before = config.dropout, config.normalize_before

    def forward(self, hidden_states, position, memory, reference_points=None, output_attentions=False):
        """hidden_states, position [B, S, D]; memory: the EncoderMemory (mask, levels); reference_points
        [B, S, L, 2] for the kinds that need them."""

        def self_attention(x):
            return self.self_attn(x, position, memory, reference_points, output_attentions)

        hidden_states, weights = self.block(self.self_attn_layer_norm, hidden_states, self_attention)
        hidden_states, _ = self.block(self.final_layer_norm, hidden_states, lambda x: (self.mlp(x), None))
        return hidden_states, weights


class HfDetrDecoderLayer(_Residual):
    """Self-attention among the queries, cross-attention to the encoder memory (the kind
    config.decoder_cross_attention names, with the self-attention that goes with it), FFN."""

    def __init__(self, config, first_layer: bool = False):
        super().__init__()
        d = config.d_model
        cross_attention = CROSS_ATTENTION[config.decoder_cross_attention]
        self.self_attn = cross_attention.self_attention.from_config(config)
        self.encoder_attn = cross_attention.from_config(config, first_layer)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.mlp = HfDetrMLP(d, config.decoder_ffn_dim, config.activation_function, config.activation_dropout)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout, self.normalize_before = config.dropout, config.normalize_before

    def forward(
        self, hidden_states, query_position, spatial_query, reference, memory_features, memory_position, memory,
        self_attention_mask=None, output_attentions=False,
    ):  # fmt: skip
        """hidden_states, query_position, spatial_query (or None) [B, T, D]; reference [B, T, 2 | 4] or None;
        memory: the EncoderMemory. Its features and positions [B, S, D] also come on their own: gradient
        checkpointing (reentrant) passes gradients only through a layer's tensor arguments.
        self_attention_mask [T, T] or None."""
        memory = memory.replace(features=memory_features, position=memory_position)

        def self_attention(x):
            return self.self_attn(x, query_position, self_attention_mask, output_attentions)

        def cross_attention(x):
            return self.encoder_attn(x, query_position, spatial_query, reference, memory, output_attentions)

        hidden_states, self_weights = self.block(self.self_attn_layer_norm, hidden_states, self_attention)
        hidden_states, cross_weights = self.block(self.encoder_attn_layer_norm, hidden_states, cross_attention)
        hidden_states, _ = self.block(self.final_layer_norm, hidden_states, lambda x: (self.mlp(x), None))
        return hidden_states, self_weights, cross_weights
