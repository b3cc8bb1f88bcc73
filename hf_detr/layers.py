"""The transformer's building blocks: multi-head attention (one path: `attend`), the feed-forward
block, a small MLP, and the encoder and decoder layers.

Attention runs through transformers' attention interface (`config._attn_implementation`: "sdpa" by
default, or "eager", this file's `eager_attention`, which also gives the probabilities).

Positions never reach the values (DETR sec. A.3). They reach queries and keys in one of three ways:
- added before the shared projections, q = W_q (x + p) (DETR: `HfDetrAttention`, its callers add them);
- projected on their own, q = W_q x + W_q' p (Conditional DETR, DAB-DETR decoder self-attention:
  `PositionProjectedAttention`);
- concatenated per head, q_h = [W_q x ; W_s s]_h against k_h = [W_k m ; W_k' p]_h, so that attention
  sums a content and a spatial dot product (Conditional DETR's cross-attention: `SpatialCrossAttention`).

This file is part of the model surface (saved next to config.json): it imports only torch and transformers.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


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


class PositionProjectedAttention(HfDetrAttention):
    """Self-attention whose positions have projections of their own: q = W_q x + W_q' p,
    k = W_k x + W_k' p, v = W_v x (Conditional DETR and DAB-DETR's decoder self-attention)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, config=None):
        super().__init__(d_model, num_heads, dropout, config)
        self.q_pos_proj = nn.Linear(d_model, d_model)
        self.k_pos_proj = nn.Linear(d_model, d_model)

    def forward(self, hidden_states, position, mask=None, output_attentions=False):
        """hidden_states, position [B, T, D] -> (output [B, T, D], weights or None)."""
        q = self.heads(self.q_proj(hidden_states) + self.q_pos_proj(position))
        k = self.heads(self.k_proj(hidden_states) + self.k_pos_proj(position))
        return self.attend(q, k, self.heads(self.v_proj(hidden_states)), mask, output_attentions)


class SpatialCrossAttention(HfDetrAttention):
    """Conditional DETR's cross-attention (Meng et al., 2021, sec. 3.3): each head's query is its content
    part concatenated with its part of the spatial query, each key its content part with its part of
    the projected memory positions, so that the attention weight sums a content and a spatial dot
    product (scale 1 / sqrt(2 * head size)). In the first layer the query position and memory positions
    are also added to the content parts, as in DETR (`first_layer`)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, first_layer: bool, config=None):
        super().__init__(d_model, num_heads, dropout, config)
        self.k_pos_proj = nn.Linear(d_model, d_model)
        self.q_sine_proj = nn.Linear(d_model, d_model)
        self.q_pos_proj = nn.Linear(d_model, d_model) if first_layer else None

    def forward(self, hidden_states, query_position, spatial_query, memory, memory_position, mask=None, output_attentions=False):
        """hidden_states, query_position, spatial_query [B, T, D]; memory, memory_position [B, S, D]."""
        query, key = self.q_proj(hidden_states), self.k_proj(memory)
        key_position = self.k_pos_proj(memory_position)
        if self.q_pos_proj is not None:
            query = query + self.q_pos_proj(query_position)
            key = key + key_position
        q = torch.cat((self.heads(query), self.heads(self.q_sine_proj(spatial_query))), -1)
        k = torch.cat((self.heads(key), self.heads(key_position)), -1)
        return self.attend(q, k, self.heads(self.v_proj(memory)), mask, output_attentions)


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
    """Self-attention over the feature map (position added to queries and keys) + FFN."""

    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.self_attn = HfDetrAttention(d, config.encoder_attention_heads, config.attention_dropout, config)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.mlp = HfDetrMLP(d, config.encoder_ffn_dim, config.activation_function, config.activation_dropout)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout, self.normalize_before = config.dropout, config.normalize_before

    def forward(self, hidden_states, position_embeddings, key_padding_mask, output_attentions=False):
        """hidden_states, position_embeddings [B, S, D]; key_padding_mask [B, 1, 1, S] or None."""

        def self_attention(x):
            query_key = x + position_embeddings
            return self.self_attn(query_key, query_key, x, key_padding_mask, output_attentions)

        hidden_states, weights = self.block(self.self_attn_layer_norm, hidden_states, self_attention)
        hidden_states, _ = self.block(self.final_layer_norm, hidden_states, lambda x: (self.mlp(x), None))
        return hidden_states, weights


class HfDetrDecoderLayer(_Residual):
    """Self-attention among the queries, cross-attention to the encoder memory, FFN.

    DETR layers add the query position to queries (and self-attention keys) and the memory's spatial
    positions to the cross-attention keys. With `spatial_cross_attention` (Conditional DETR, DAB-DETR)
    the self-attention projects positions on their own and the cross-attention concatenates the
    builder's spatial query (`SpatialCrossAttention`)."""

    def __init__(self, config, spatial_cross_attention: bool = False, first_layer: bool = False):
        super().__init__()
        d, heads, dropout = config.d_model, config.decoder_attention_heads, config.attention_dropout
        self.spatial_cross_attention = spatial_cross_attention
        if spatial_cross_attention:
            self.self_attn = PositionProjectedAttention(d, heads, dropout, config)
            self.encoder_attn = SpatialCrossAttention(d, heads, dropout, first_layer, config)
        else:
            self.self_attn = HfDetrAttention(d, heads, dropout, config)
            self.encoder_attn = HfDetrAttention(d, heads, dropout, config)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.mlp = HfDetrMLP(d, config.decoder_ffn_dim, config.activation_function, config.activation_dropout)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout, self.normalize_before = config.dropout, config.normalize_before

    def forward(
        self, hidden_states, query_position, spatial_query, memory, memory_position, memory_key, memory_mask,
        self_attention_mask=None, output_attentions=False,
    ):  # fmt: skip
        """hidden_states, query_position, spatial_query (or None) [B, T, D]; memory, memory_position [B, S, D];
        memory_key: memory + memory_position, the DETR cross-attention keys (the same for every layer, so
        the decoder adds them once); memory_mask [B, 1, 1, S] or None; self_attention_mask [T, T] or None."""
        if self.spatial_cross_attention:

            def self_attention(x):
                return self.self_attn(x, query_position, self_attention_mask, output_attentions)

            def cross_attention(x):
                return self.encoder_attn(x, query_position, spatial_query, memory, memory_position, memory_mask, output_attentions)
        else:

            def self_attention(x):
                query_key = x + query_position
                return self.self_attn(query_key, query_key, x, self_attention_mask, output_attentions)

            def cross_attention(x):
                return self.encoder_attn(x + query_position, memory_key, memory, memory_mask, output_attentions)

        hidden_states, self_weights = self.block(self.self_attn_layer_norm, hidden_states, self_attention)
        hidden_states, cross_weights = self.block(self.encoder_attn_layer_norm, hidden_states, cross_attention)
        hidden_states, _ = self.block(self.final_layer_norm, hidden_states, lambda x: (self.mlp(x), None))
        return hidden_states, self_weights, cross_weights
