"""HfDetrModel and HfDetrForObjectDetection: DETR (Carion et al., 2020), in data-flow order.

    pixel_values [B, 3, H, W], pixel_mask [B, H, W]
      -> backbone                      feature map [B, C, h, w] + mask [B, h, w]
      -> 1x1 projection, sine position flattened features [B, h*w, D] + position embeddings [B, h*w, D]
      -> encoder                       memory [B, h*w, D]
      -> decoder queries               content queries (zeros) [B, Q, D] + learned query positions [B, Q, D]
      -> decoder                       every layer's normalised output [L, B, Q, D]
      -> shared heads                  logits [L, B, Q, K+1], pred_boxes [L, B, Q, 4] (sigmoid, cxcywh, 0..1)
      -> set criterion (with labels)   loss, loss_dict

This file is part of the model surface: it is copied next to config.json on save, so it imports only
torch, transformers and its siblings (single-dot relative imports).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoBackbone, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_hf_detr import HfDetrConfig
from .loss import SetCriterion, check_pixel_inputs
from .matching import HungarianMatcher
from .queries import QUERY_BUILDERS


@dataclass
class HfDetrModelOutput(ModelOutput):
    """last_hidden_state [B, Q, D]: the final decoder layer, normalised.
    intermediate_hidden_states [L, B, Q, D]: every decoder layer's output through the shared final norm.
    encoder_last_hidden_state [B, h*w, D]. Hidden states and attentions on request, one entry per layer."""

    last_hidden_state: torch.Tensor | None = None
    intermediate_hidden_states: torch.Tensor | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class HfDetrObjectDetectionOutput(ModelOutput):
    """The field names of transformers' `DetrObjectDetectionOutput`.

    loss: total loss (scalar) when labels are given; loss_dict: every term per layer (see loss.py).
    logits [B, Q, K+1]: class logits, the last class is "no object".
    pred_boxes [B, Q, 4]: boxes as (center x, center y, width, height), normalised to 0..1 by the
        un-padded image size.
    auxiliary_outputs: [{"logits", "pred_boxes"}] for each intermediate decoder layer (auxiliary_loss).
    """

    loss: torch.Tensor | None = None
    loss_dict: dict | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    auxiliary_outputs: list[dict] | None = None
    last_hidden_state: torch.Tensor | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None


# ---------------------------------------------------------------------------------------------- backbone


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (DETR trains with small batches, so
    batch statistics are never updated). eps 1e-5 as in torchvision's and transformers' versions.

    When the convolution before it runs the normalisation itself (`FoldedBatchNormConv2d`), `folded`
    is True and this module passes its input through; it still holds the buffers, under their keys."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.folded = eps, False
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), value))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # saved by nn.BatchNorm2d, meaningless here
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine map this layer applies per channel: y = x * scale + shift."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return x
        scale, shift = self.scale_and_shift()
        return x * scale[:, None, None] + shift[:, None, None]


class FoldedBatchNormConv2d(nn.Conv2d):
    """A convolution that also applies the FrozenBatchNorm2d after it, folded into its weight and bias:
    conv(x, w) * scale + shift == conv(x, w * scale) + shift (up to float rounding). One pass over the
    feature map instead of three (conv, multiply, add), and no normalisation pass in the backward.

    The batch norm keeps its buffers (the stored truth, under their state-dict keys) and this module
    only refers to it. The fold is recomputed on every call, a pass over the weights only (about 3% of
    a ResNet-50 forward at 800 pixels), so that it can never go stale, however weights or statistics
    change (loading, `.to()`, optimiser steps, in-place edits), and the gradient reaches `weight`."""

    @classmethod
    def fold(cls, conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> "FoldedBatchNormConv2d":
        folded = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
        )  # fmt: skip
        folded.weight, folded.bias = conv.weight, conv.bias  # the same parameters, not copies
        folded._norm = (norm,)  # a tuple: referenced, not registered (its buffers stay under its own keys)
        norm.folded = True
        return folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self._norm[0].scale_and_shift()
        weight = self.weight * scale.to(self.weight.dtype)[:, None, None, None]
        bias = (shift if self.bias is None else shift + self.bias * scale).to(weight.dtype)
        if self.kernel_size == (1, 1) and self.stride != (1, 1) and self.padding == (0, 0) and x.device.type == "cpu":
            # A strided 1x1 convolution (the ResNet shortcuts) reads every s-th pixel: take those
            # first and run a dense one, the same sums. oneDNN's strided 1x1 kernels run at under half
            # the speed of its dense ones on CPU (stage-2 shortcut forward + backward: 33 -> 14 ms);
            # on GPU the strided kernel is left alone (not measured there).
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
            return F.conv2d(x, weight, bias, 1, 0, self.dilation, self.groups)
        return self._conv_forward(x, weight, bias)


def freeze_batch_norm(module: nn.Module) -> None:
    """Replace every nn.BatchNorm2d below `module` by a FrozenBatchNorm2d holding its statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            if child.weight.device.type != "meta":
                for buffer in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, buffer).copy_(getattr(child, buffer).detach())
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)


def fold_frozen_batch_norm(module: nn.Module) -> int:
    """Fold each FrozenBatchNorm2d into the convolution it follows, for the conv + norm pairs of
    transformers' CNN backbones (a module with children `convolution` and `normalization`, applied in
    that order). The state dict keeps its keys and values. Returns the number of folded pairs."""
    count = 0
    for parent in list(module.modules()):
        conv, norm = getattr(parent, "convolution", None), getattr(parent, "normalization", None)
        if type(conv) is nn.Conv2d and isinstance(norm, FrozenBatchNorm2d) and not norm.folded:
            parent.convolution = FoldedBatchNormConv2d.fold(conv, norm)
            count += 1
    return count


def relu_in_place(module: nn.Module) -> None:
    """Let the ResNet's ReLUs overwrite their input (each follows a convolution, a batch norm or a
    residual sum, none of which needs its output for the backward): one feature-map allocation less each."""
    for child in module.modules():
        if type(child) is nn.ReLU:
            child.inplace = True


class HfDetrBackbone(nn.Module):
    """transformers' AutoBackbone (ResNet-50 last stage by default) with frozen batch norm.

    pixel_values [B, 3, H, W], pixel_mask [B, H, W] (1 = real pixel, 0 = padding)
    -> feature map [B, C, h, w], mask [B, h, w] (bool, True = real).

    Speed, at unchanged weights and state-dict keys: the frozen batch norms are folded into their
    convolutions, ReLUs work in place, and a convolutional backbone runs channels-last (NHWC), the
    layout oneDNN's CPU convolutions are fastest in."""

    def __init__(self, config: HfDetrConfig):
        super().__init__()
        if config.use_pretrained_backbone:
            self.model = AutoBackbone.from_pretrained(
                config.backbone_checkpoint, out_features=config.backbone_config.out_features
            )
        else:
            self.model = AutoBackbone.from_config(config.backbone_config)
        if config.freeze_backbone_batch_norm:
            with torch.no_grad():
                freeze_batch_norm(self.model)
        folded = fold_frozen_batch_norm(self.model)
        self.channels_last = folded > 0 or config.backbone_config.model_type == "resnet"
        if config.backbone_config.model_type == "resnet":
            relu_in_place(self.model)
        self.num_channels = self.model.channels[-1]
        frozen_prefixes = ("embedder.",) + tuple(f"encoder.stages.{i}." for i in range(config.freeze_backbone_stages))
        for name, parameter in self.model.named_parameters():
            # DETR trains the backbone except its stem and first stage (and none of it if asked).
            is_early = config.freeze_backbone_stages > 0 and name.startswith(frozen_prefixes)
            if not config.train_backbone or (config.backbone_config.model_type == "resnet" and is_early):
                parameter.requires_grad_(False)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        feature_map = self.model(pixel_values).feature_maps[-1]
        mask = F.interpolate(pixel_mask[None].float(), size=feature_map.shape[-2:])[0].bool()
        return feature_map, mask


def sine_position_embedding(mask: torch.Tensor, d_model: int, temperature: int, dtype: torch.dtype) -> torch.Tensor:
    """DETR's 2D sine position embedding that counts only real (un-padded) positions.

    mask [B, h, w] (True = real) -> [B, h*w, d_model]: the first half encodes y, the second x, each as
    interleaved sin/cos of the position normalised to (0, 2*pi] over the real extent."""
    num_features = d_model // 2
    y = mask.cumsum(1, dtype=dtype)
    x = mask.cumsum(2, dtype=dtype)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_features, device=mask.device, dtype=torch.int64).to(dtype)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_features)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).flatten(1, 2)


# ------------------------------------------------------------------------------------------ transformer


# oneDNN runs fp32 products at the CPU's peak on x86 with AVX2 or AVX-512; see Linear.
_ONEDNN_PRODUCTS = torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability() in {"AVX2", "AVX512"}
_ONEDNN_MIN_MACS = 12_000_000  # smaller products stay faster in sgemm (measured: 0.9x at 8.4M, 1.1x at 13M multiply-adds)


class Linear(nn.Linear):
    """nn.Linear (the same parameters, state-dict keys and initialisation) whose fp32 product on an
    x86 CPU runs through oneDNN, as a 1x1 convolution over a channels-last [1, in, 1, N] view of the
    N input rows. torch gives fp32 matmuls to MKL's sgemm, which on the AMD EPYC (Zen 5) we measure
    on runs at ~215 GFLOP/s on this model's shapes, against ~460 for oneDNN on the same products
    (fp32 arithmetic both, summed in another order: outputs agree to ~1e-7 relative). Forward and
    backward both take the oneDNN path: 1.7-2.1x on the encoder's and FFNs' products. Products under
    12M multiply-adds, where sgemm is as fast or faster, and everything else (GPU, autocast, other
    CPUs, `torch.backends.mkldnn.enabled = False`) use nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            _ONEDNN_PRODUCTS
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and x.numel() * self.out_features >= _ONEDNN_MIN_MACS
            and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu")
        ):
            return super().forward(x)
        rows = x.reshape(1, 1, -1, self.in_features).permute(0, 3, 1, 2)  # [1, in, 1, N], channels-last
        out = F.conv2d(rows, self.weight[:, :, None, None], self.bias)  # [1, out, 1, N], channels-last
        return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], self.out_features)


class HfDetrAttention(nn.Module):
    """Multi-head attention. Positions are added by the caller to what becomes queries and keys,
    never to values (DETR sec. A.3). key_padding_mask [B, S] is True on real positions."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, d_model // num_heads, dropout
        self.q_proj = Linear(d_model, d_model)
        self.k_proj = Linear(d_model, d_model)
        self.v_proj = Linear(d_model, d_model)
        self.o_proj = Linear(d_model, d_model)

    def forward(self, query, key, value, key_padding_mask=None, output_attentions=False):
        """query [B, T, D], key and value [B, S, D] -> (output [B, T, D], weights [B, heads, T, S] or None)."""
        batch, target_len, _ = query.shape
        q = self.q_proj(query).view(batch, target_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            # SDPA does not return the probabilities; compute them once and use them for the output too.
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(-1)
            output = F.dropout(weights, dropout, self.training) @ v
        else:
            output = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        output = output.transpose(1, 2).reshape(batch, target_len, -1)
        return self.o_proj(output), weights


class HfDetrMLP(nn.Module):
    """The transformer layers' feed-forward block: fc1 -> activation -> fc2."""

    def __init__(self, d_model: int, ffn_dim: int, activation: str, activation_dropout: float):
        super().__init__()
        self.fc1, self.fc2 = Linear(d_model, ffn_dim), Linear(ffn_dim, d_model)
        self.activation, self.activation_dropout = ACT2FN[activation], activation_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(self.activation(self.fc1(x)), self.activation_dropout, self.training))


class HfDetrEncoderLayer(nn.Module):
    """Self-attention over the feature map (position added to queries and keys) + FFN; post-norm as
    in the paper, or pre-norm with config.normalize_before."""

    def __init__(self, config: HfDetrConfig):
        super().__init__()
        d = config.d_model
        self.self_attn = HfDetrAttention(d, config.encoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.mlp = HfDetrMLP(d, config.encoder_ffn_dim, config.activation_function, config.activation_dropout)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout, self.normalize_before = config.dropout, config.normalize_before

    def forward(self, hidden_states, position_embeddings, key_padding_mask, output_attentions=False):
        residual = hidden_states
        if self.normalize_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        query_key = hidden_states + position_embeddings
        hidden_states, weights = self.self_attn(query_key, query_key, hidden_states, key_padding_mask, output_attentions)
        hidden_states = residual + F.dropout(hidden_states, self.dropout, self.training)
        if not self.normalize_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        residual = hidden_states
        if self.normalize_before:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = residual + F.dropout(self.mlp(hidden_states), self.dropout, self.training)
        if not self.normalize_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states, weights


class HfDetrDecoderLayer(nn.Module):
    """Self-attention among the queries, cross-attention to the encoder memory, FFN. The query
    position embeddings are added to queries (and self-attention keys) at every layer; the memory's
    spatial position embeddings to the cross-attention keys."""

    def __init__(self, config: HfDetrConfig):
        super().__init__()
        d = config.d_model
        self.self_attn = HfDetrAttention(d, config.decoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = HfDetrAttention(d, config.decoder_attention_heads, config.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.mlp = HfDetrMLP(d, config.decoder_ffn_dim, config.activation_function, config.activation_dropout)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout, self.normalize_before = config.dropout, config.normalize_before

    def _block(self, norm, hidden_states, compute):
        """residual + dropout(compute(x)), with the norm before (pre-norm) or after (post-norm)."""
        inner = norm(hidden_states) if self.normalize_before else hidden_states
        output, weights = compute(inner)
        hidden_states = hidden_states + F.dropout(output, self.dropout, self.training)
        return (hidden_states if self.normalize_before else norm(hidden_states)), weights

    def forward(self, hidden_states, query_position, memory, memory_key, memory_mask, output_attentions=False):
        """memory_key: memory + its spatial position embeddings, the cross-attention keys (the same for
        every layer, so the decoder adds them once)."""

        def self_attention(x):
            query_key = x + query_position
            return self.self_attn(query_key, query_key, x, None, output_attentions)

        def cross_attention(x):
            return self.encoder_attn(x + query_position, memory_key, memory, memory_mask, output_attentions)

        hidden_states, self_weights = self._block(self.self_attn_layer_norm, hidden_states, self_attention)
        hidden_states, cross_weights = self._block(self.encoder_attn_layer_norm, hidden_states, cross_attention)
        hidden_states, _ = self._block(self.final_layer_norm, hidden_states, lambda x: (self.mlp(x), None))
        return hidden_states, self_weights, cross_weights


class HfDetrEncoder(nn.Module):
    def __init__(self, config: HfDetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(HfDetrEncoderLayer(config) for _ in range(config.encoder_layers))
        # pre-norm layers leave their output un-normalised; DETR then adds a final norm
        self.layernorm = nn.LayerNorm(config.d_model) if config.normalize_before else nn.Identity()
        self.dropout = config.dropout

    def forward(self, features, position_embeddings, mask, output_attentions=False, output_hidden_states=False):
        """features, position_embeddings [B, S, D], mask [B, S] (True = real; None: nothing padded)
        -> memory [B, S, D], states, attentions."""
        hidden_states = F.dropout(features, self.dropout, self.training)
        all_states, all_weights = (hidden_states,), ()
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, position_embeddings, mask, output_attentions)
            all_states += (hidden_states,)
            all_weights += (weights,)
        hidden_states = self.layernorm(hidden_states)
        return hidden_states, all_states if output_hidden_states else None, all_weights if output_attentions else None


class HfDetrDecoder(nn.Module):
    def __init__(self, config: HfDetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(HfDetrDecoderLayer(config) for _ in range(config.decoder_layers))
        self.layernorm = nn.LayerNorm(config.d_model)  # shared by all layers' outputs before the heads

    def forward(self, queries, query_position, memory, memory_position, memory_mask, output_attentions=False, output_hidden_states=False):
        """queries, query_position [B, Q, D]; memory, memory_position [B, S, D]; memory_mask [B, S] or None
        -> every layer's output through the shared final norm [L, B, Q, D], states, attentions.

        As in the original DETR, the norm is applied to what goes to the heads only; each layer
        receives the previous layer's un-normalised output."""
        hidden_states, outputs = queries, []
        all_states, self_weights, cross_weights = (hidden_states,), (), ()
        memory_key = memory + memory_position
        for layer in self.layers:
            hidden_states, self_w, cross_w = layer(hidden_states, query_position, memory, memory_key, memory_mask, output_attentions)
            outputs.append(self.layernorm(hidden_states))
            all_states += (hidden_states,)
            self_weights += (self_w,)
            cross_weights += (cross_w,)
        attentions = (self_weights, cross_weights) if output_attentions else (None, None)
        return torch.stack(outputs), all_states if output_hidden_states else None, *attentions


# ------------------------------------------------------------------------------------------------ models


# Every Auto class a checkpoint answers to with trust_remote_code. transformers writes only the saved
# class's own entry, so a detection checkpoint would not load through AutoModel without the others.
AUTO_MAP = {
    "AutoConfig": "configuration_hf_detr.HfDetrConfig",
    "AutoModel": "modeling_hf_detr.HfDetrModel",
    "AutoModelForObjectDetection": "modeling_hf_detr.HfDetrForObjectDetection",
}


class HfDetrPreTrainedModel(PreTrainedModel):
    config_class = HfDetrConfig
    config: HfDetrConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["HfDetrEncoderLayer", "HfDetrDecoderLayer"]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config and the model-surface files, with every `auto_map` entry."""
        self.config.auto_map = {**AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        # DETR's init: xavier-uniform transformer weights, torch's default for the heads and the input
        # projection; the backbone keeps its own init (or weights). transformers calls this for the modules
        # whose weights a checkpoint lacks (e.g. a class head resized by `ignore_mismatched_sizes`), and
        # its guard keeps torch's init functions from touching loaded ones.
        if isinstance(module, nn.Linear | nn.Conv2d):
            module.reset_parameters()  # the attention and FFN layers get xavier below, from their parent
        if isinstance(module, HfDetrAttention | HfDetrMLP):
            for linear in module.children():
                if isinstance(linear, nn.Linear):
                    nn.init.xavier_uniform_(linear.weight, gain=self.config.init_xavier_std)
                    nn.init.zeros_(linear.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight)
        elif isinstance(module, SetCriterion):
            module.reset_buffers()


def _attention_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """[B, S] key padding mask (True = real) -> itself, or None when nothing is padded: SDPA's unmasked
    kernel is faster and gives the same result. Checked on CPU only (on a GPU the check would wait for it)."""
    if mask.device.type == "cpu" and not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask


class HfDetrModel(HfDetrPreTrainedModel):
    """Backbone + transformer, without heads. forward(pixel_values [B, 3, H, W], pixel_mask [B, H, W])
    -> HfDetrModelOutput."""

    def __init__(self, config: HfDetrConfig):
        super().__init__(config)
        self.backbone = HfDetrBackbone(config)
        self.input_projection = nn.Conv2d(self.backbone.num_channels, config.d_model, kernel_size=1)
        self.queries = QUERY_BUILDERS[config.query_type](num_queries=config.num_queries, d_model=config.d_model)
        self.encoder = HfDetrEncoder(config)
        self.decoder = HfDetrDecoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HfDetrModelOutput | tuple:
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        check_pixel_inputs(pixel_values, pixel_mask)
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((batch, height, width), dtype=torch.long, device=pixel_values.device)

        feature_map, mask = self.backbone(pixel_values, pixel_mask)
        features = self.input_projection(feature_map).flatten(2).transpose(1, 2)
        position = sine_position_embedding(mask, self.config.d_model, self.config.position_embedding_temperature, features.dtype)
        mask = _attention_mask(mask.flatten(1))
        memory, encoder_states, encoder_attentions = self.encoder(features, position, mask, output_attentions, output_hidden_states)
        queries, query_position = self.queries(batch)
        decoded, decoder_states, self_attentions, cross_attentions = self.decoder(
            queries, query_position, memory, position, mask, output_attentions, output_hidden_states
        )

        output = HfDetrModelOutput(
            last_hidden_state=decoded[-1],
            intermediate_hidden_states=decoded,
            decoder_hidden_states=decoder_states,
            decoder_attentions=self_attentions,
            cross_attentions=cross_attentions,
            encoder_last_hidden_state=memory,
            encoder_hidden_states=encoder_states,
            encoder_attentions=encoder_attentions,
        )
        return output if return_dict else output.to_tuple()


class HfDetrBoxHead(nn.Module):
    """DETR's 3-layer box MLP: [..., D] -> [..., 4] boxes (sigmoid, cxcywh, 0..1)."""

    def __init__(self, d_model: int, num_layers: int = 3):
        super().__init__()
        sizes = [d_model] * num_layers + [4]
        self.layers = nn.ModuleList(Linear(n, k) for n, k in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x).sigmoid()


class HfDetrForObjectDetection(HfDetrPreTrainedModel):
    """HfDetrModel + the class head (num_labels + 1, last = no object) and box head, the same two
    heads applied to every decoder layer. With labels, the loss of every layer (auxiliary_loss)."""

    def __init__(self, config: HfDetrConfig):
        super().__init__(config)
        self.model = HfDetrModel(config)
        self.class_labels_classifier = Linear(config.d_model, config.num_labels + 1)
        self.bbox_predictor = HfDetrBoxHead(config.d_model)
        matcher = HungarianMatcher(config.class_cost, config.bbox_cost, config.giou_cost)
        self.criterion = SetCriterion(
            matcher,
            num_labels=config.num_labels,
            eos_coefficient=config.eos_coefficient,
            ce_coefficient=config.ce_loss_coefficient,
            bbox_coefficient=config.bbox_loss_coefficient,
            giou_coefficient=config.giou_loss_coefficient,
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict] | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HfDetrObjectDetectionOutput | tuple:
        """pixel_values [B, 3, H, W] (normalised), pixel_mask [B, H, W] (1 = real pixel, 0 = padding),
        labels: per image {"class_labels": Long[N], "boxes": Float[N, 4] cxcywh normalised 0..1}."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(pixel_values, pixel_mask, output_attentions, output_hidden_states, return_dict=True)

        # the same heads on every decoder layer: [L, B, Q, K+1] and [L, B, Q, 4]
        decoded = outputs.intermediate_hidden_states if self.config.auxiliary_loss else outputs.intermediate_hidden_states[-1:]
        all_logits = self.class_labels_classifier(decoded)
        all_boxes = self.bbox_predictor(decoded)

        loss = loss_dict = None
        if labels is not None:
            loss, loss_dict = self.criterion(all_logits, all_boxes, labels)
        auxiliary_outputs = None
        if self.config.auxiliary_loss:
            auxiliary_outputs = [{"logits": logits, "pred_boxes": boxes} for logits, boxes in zip(all_logits[:-1], all_boxes[:-1])]

        output = HfDetrObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=all_logits[-1],
            pred_boxes=all_boxes[-1],
            auxiliary_outputs=auxiliary_outputs,
            last_hidden_state=outputs.last_hidden_state,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )
        return output if return_dict else output.to_tuple()


# Saving a model copies the model-surface files next to config.json (remote code loading).
HfDetrModel.register_for_auto_class("AutoModel")
HfDetrForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")

__all__ = ["HfDetrModel", "HfDetrForObjectDetection", "HfDetrPreTrainedModel"]
