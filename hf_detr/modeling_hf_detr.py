"""HfDetrModel and HfDetrForObjectDetection: DETR (Carion et al., 2020) and the later DETRs that change
its queries and its matching, in data-flow order.

    pixel_values [B, 3, H, W], pixel_mask [B, H, W]
      -> backbone                      feature map [B, C, h, w] + mask [B, h, w]
      -> 1x1 projection, sine position flattened features [B, h*w, D] + position embeddings [B, h*w, D]
      -> encoder                       memory [B, h*w, D]
      -> decoder queries               content queries (zeros in DETR) [B, T, D] + query positions [B, T, D]
                                       (+ reference points / boxes, self-attention mask: queries.py)
      -> decoder                       every layer's normalised output [L, B, T, D] (+ its references)
      -> shared heads                  logits [L, B, T, C], pred_boxes [L, B, T, 4] (sigmoid, cxcywh, 0..1)
      -> set criterion (with labels)   loss, loss_dict
    T = num_queries at inference; in training, + denoising queries and further query groups.

This file is part of the model surface: it is copied next to config.json on save, so it imports only
torch, transformers and its siblings (single-dot relative imports).
"""

import contextlib
import math
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoBackbone, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .box_ops import inverse_sigmoid
from .configuration_hf_detr import HfDetrConfig
from .kernels import apply_speed_kernels, padding_mask_or_none
from .layers import MLP, HfDetrAttention, HfDetrDecoderLayer, HfDetrEncoderLayer, HfDetrMLP
from .loss import CLASS_LOSSES, SetCriterion, check_labels
from .matching import MATCHERS
from .queries import QUERY_BUILDERS, DecoderQueries

logger = logging.get_logger(__name__)


@dataclass
class HfDetrModelOutput(ModelOutput):
    """The layout of transformers' `DetrModelOutput`, then hf_detr's own fields.

    last_hidden_state [B, Q, D]: the final decoder layer, normalised, for the Q queries a model predicts with.
    encoder_last_hidden_state [B, h*w, D]. Hidden states and attentions on request, one entry per layer.
    intermediate_hidden_states [L, B, T, D] (with `output_intermediate_hidden_states`, by default when
        config.auxiliary_loss): every decoder layer's output through the shared final norm, for all T
        queries of the pass (query groups and denoising queries in training: see `decoder_queries`).
    reference_boxes [L, B, T, 2 | 4] (with intermediate_hidden_states, for queries with references): per
        layer, the reference points (cx, cy) or boxes (cxcywh) its boxes are predicted relative to.
    decoder_queries (with `output_decoder_queries`): the decoder's start and the layout of the T queries."""

    last_hidden_state: torch.Tensor | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    intermediate_hidden_states: torch.Tensor | None = None
    reference_boxes: torch.Tensor | None = None
    decoder_queries: DecoderQueries | None = None


@dataclass
class HfDetrObjectDetectionOutput(ModelOutput):
    """The field names of transformers' `DetrObjectDetectionOutput`.

    loss: total loss (scalar) when labels are given; loss_dict: every term per layer (see loss.py).
    logits [B, Q, C]: class logits; C = num_labels + 1 with the last "no object" for the softmax class
        loss, C = num_labels (one sigmoid each) for the sigmoid ones.
    pred_boxes [B, Q, 4]: boxes as (center x, center y, width, height), normalised to 0..1 by the
        un-padded image size.
    auxiliary_outputs: [{"logits", "pred_boxes"}] for each intermediate decoder layer (auxiliary_loss,
        with labels, as in transformers' DETR: the pipeline splits every output field by image).
    reference_boxes [L, B, Q, 2 | 4]: per layer, the reference points / boxes its boxes are relative to
        (query types with references; sigmoid space, cxcywh).
    Only the Q queries a model predicts with (query group 0) appear here, in training too.
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
    reference_boxes: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- backbone


def check_pixel_inputs(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> None:
    """Raise a ValueError naming the argument and the shapes when the model cannot read the batch:
    pixel_values must be [B, C, H, W] with B >= 1; pixel_mask, if given, [B, H, W] with at least one
    real (non-zero) pixel per image (rather than a silent resize or broadcast, or an image with nothing
    to attend to). pixel_values must be floating point (the processor's normalised pixels, not uint8
    ones) and channels first. The per-image check reads the mask on the host; it and the channels-last
    guess are skipped while compiling or tracing, and on the meta device (no data)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(
            f"pixel_values must be a torch.Tensor [batch_size, channels, height, width] (an image processor's output with "
            f"return_tensors='pt'), got {type(pixel_values).__name__} of shape {tuple(getattr(pixel_values, 'shape', ()))}"
        )
    shape = tuple(pixel_values.shape)
    if pixel_values.ndim != 4 or pixel_values.shape[0] == 0:
        one_image = " (one image? add the batch dimension: pixel_values[None])" if pixel_values.ndim == 3 else ""
        raise ValueError(f"pixel_values must be [batch_size >= 1, channels, height, width], got shape {shape}{one_image}")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be a floating-point tensor (the image processor's normalised pixels), got {pixel_values.dtype} "
            f"of shape {shape}"
        )
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    # [B, H, W, C] as PIL / numpy images come; the channel count is the model's (3 but for unusual backbones)
    if not tracing and pixel_values.shape[1] not in (1, 3, 4) and pixel_values.shape[-1] in (1, 3, 4):
        raise ValueError(
            f"pixel_values must be [batch_size, channels, height, width], got shape {shape}: channels last? "
            "pass pixel_values.permute(0, 3, 1, 2)"
        )
    if pixel_mask is None:
        return
    batch, _, height, width = pixel_values.shape
    if tuple(pixel_mask.shape) != (batch, height, width):
        raise ValueError(
            f"pixel_mask must be [batch_size, height, width] = {(batch, height, width)} for pixel_values of shape "
            f"{tuple(pixel_values.shape)}, got {tuple(pixel_mask.shape)}"
        )
    if tracing or pixel_mask.device.type == "meta":
        return
    # Exact and cheap for DETR's padding (bottom / right): a real top-left pixel in every image is enough.
    if bool(pixel_mask[:, 0, 0].all()):
        return
    has_pixels = pixel_mask.flatten(1).any(1)
    if not bool(has_pixels.all()):
        empty = (~has_pixels).nonzero().flatten().tolist()
        raise ValueError(f"pixel_mask of image(s) {empty} is all zeros: every image needs at least one real pixel")




class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (DETR trains with small batches, so
    batch statistics are never updated). eps 1e-5 as in torchvision's and transformers' versions.

    `folded`: the convolution before it applies it (kernels.FoldedBatchNormConv2d), so this module
    passes its input through; it still holds the buffers, under their keys."""

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


@contextlib.contextmanager
def no_attention_choice(backbone_config):
    """The config's attention implementation ("sdpa", "eager") names the transformer's; a PreTrainedConfig hands it
    on to its sub-configs, and transformers' CNN backbones, which have no attention, refuse "sdpa". They are built
    with none chosen (their own default); the backbone config keeps the value it was given."""
    saved = getattr(backbone_config, "_attn_implementation_internal", None)
    if backbone_config is not None:
        backbone_config._attn_implementation_internal = None
    try:
        yield
    finally:
        if backbone_config is not None:
            backbone_config._attn_implementation_internal = saved


class HfDetrBackbone(nn.Module):
    """transformers' AutoBackbone (ResNet-50 last stage by default), or a timm `features_only` model
    (`use_timm_backbone`, through transformers' TimmBackbone), with frozen batch norm.

    pixel_values [B, 3, H, W], pixel_mask [B, H, W] (1 = real pixel, 0 = padding)
    -> feature map [B, C, h, w], mask [B, h, w] (bool, True = real).

    DETR trains the backbone except its stem and first stage (`freeze_backbone_stages`; for a timm
    model its stem and first stages by timm's feature_info), none of it without `train_backbone`."""

    def __init__(self, config: HfDetrConfig):
        super().__init__()
        self.timm = config.use_timm_backbone
        with no_attention_choice(config.backbone_config):
            is_early = self._build(config)
        for name, parameter in self.model.named_parameters():
            if not config.train_backbone or is_early(name):
                parameter.requires_grad_(False)

    def _build(self, config: HfDetrConfig):
        """Builds self.model; -> whether a parameter name is in the stem or the frozen first stages."""
        if self.timm:
            kwargs = {k: v for k, v in (config.backbone_kwargs or {}).items() if k not in ("out_indices", "output_stride")}
            backbone = AutoBackbone.from_config(config.backbone_config, pretrained=config.use_pretrained_backbone, **kwargs)
            if config.freeze_backbone_batch_norm:
                backbone.freeze_batch_norm_2d()  # timm's own, for its BatchNorm2d and BatchNormAct2d
            self.model = backbone._backbone  # timm's module: its parameters keep timm's names (as DETR's published weights)
            self.num_channels = self.model.feature_info.channels()[-1]
            return self._timm_early_parameters(config.freeze_backbone_stages).__contains__
        else:
            if config.use_pretrained_backbone:
                self.model = AutoBackbone.from_pretrained(config.backbone_checkpoint, out_features=config.backbone_config.out_features)
            else:
                self.model = AutoBackbone.from_config(config.backbone_config)
            if config.freeze_backbone_batch_norm:
                with torch.no_grad():
                    freeze_batch_norm(self.model)
            self.num_channels = self.model.channels[-1]
            prefixes = ("embedder.",) + tuple(f"encoder.stages.{i}." for i in range(config.freeze_backbone_stages))
            resnet = config.backbone_config.model_type == "resnet"
            return lambda name: resnet and config.freeze_backbone_stages > 0 and name.startswith(prefixes)

    def _timm_early_parameters(self, stages: int) -> set[str]:
        """The timm model's parameters up to the end of its `stages`-th stage, a stage being a feature level
        of stride 4 or more (ResNet: layer1 with stages=1; whatever comes before is the stem)."""
        levels = [level["module"] for level in self.model.feature_info.info if level["reduction"] >= 4]
        if stages == 0 or not levels:
            return set()
        last = levels[min(stages, len(levels)) - 1]
        prefixes = (last + ".", last.replace(".", "_") + ".")  # features_only models may flatten module names
        names = [name for name, _ in self.model.named_parameters()]
        end = max(i for i, name in enumerate(names) if name.startswith(prefixes))
        return set(names[: end + 1])

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model(pixel_values)
        feature_map = features[-1] if self.timm else features.feature_maps[-1]
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


class HfDetrEncoder(nn.Module):
    """The encoder layers; `scale_encoder_positions` (DAB-DETR): each layer's positions scaled
    element-wise by an MLP of its input."""

    def __init__(self, config: HfDetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(HfDetrEncoderLayer(config) for _ in range(config.encoder_layers))
        d = config.d_model
        self.position_scale = MLP(d, d, d, 2) if config.scale_encoder_positions else None
        # pre-norm layers leave their output un-normalised; DETR then adds a final norm
        self.layernorm = nn.LayerNorm(d) if config.normalize_before else nn.Identity()
        self.dropout = config.dropout

    def forward(self, features, position_embeddings, mask, output_attentions=False, output_hidden_states=False):
        """features, position_embeddings [B, S, D], mask [B, S] (True = real; None: nothing padded)
        -> memory [B, S, D], states, attentions."""
        hidden_states = F.dropout(features, self.dropout, self.training)
        key_padding_mask = None if mask is None else mask[:, None, None, :]
        all_states, all_weights = (hidden_states,), ()
        for layer in self.layers:
            position = position_embeddings if self.position_scale is None else position_embeddings * self.position_scale(hidden_states)
            hidden_states, weights = layer(hidden_states, position, key_padding_mask, output_attentions)
            all_states += (hidden_states,)
            all_weights += (weights,)
        hidden_states = self.layernorm(hidden_states)
        return hidden_states, all_states if output_hidden_states else None, all_weights if output_attentions else None


class HfDetrDecoder(nn.Module):
    """The decoder layers, fed and refined by the query builder."""

    def __init__(self, config: HfDetrConfig, spatial_cross_attention: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            HfDetrDecoderLayer(config, spatial_cross_attention, first_layer=i == 0) for i in range(config.decoder_layers)
        )
        self.layernorm = nn.LayerNorm(config.d_model)  # shared by all layers' outputs before the heads
        self.normalize_between_layers = config.normalize_between_decoder_layers

    def forward(
        self, builder, queries: DecoderQueries, memory, memory_position, memory_mask, box_head=None,
        output_attentions=False, output_hidden_states=False,
    ):  # fmt: skip
        """builder: the query builder (queries.py); queries: its start; memory, memory_position [B, S, D];
        memory_mask [B, S] or None; box_head: the shared box head, for builders that refine their
        references with it -> (every layer's output through the shared final norm [L, B, T, D], the
        references its boxes are relative to [L, B, T, r] or None, states, self- and cross-attentions).

        As in the original DETR, the norm is applied to what goes to the heads only; each layer
        receives the previous layer's un-normalised output. With `normalize_between_decoder_layers`
        (transformers' DETR and Conditional DETR with auxiliary losses), each layer receives the normed
        output and the last output is normed twice."""
        hidden_states, reference, prediction_reference = queries.content, queries.reference, queries.reference
        outputs, references = [], []
        all_states, self_weights, cross_weights = (hidden_states,), (), ()
        memory_key = None if builder.spatial_cross_attention else memory + memory_position  # DETR's cross-attention keys
        memory_mask = None if memory_mask is None else memory_mask[:, None, None, :]
        for i, layer in enumerate(self.layers):
            query_position, spatial_query = builder.layer_positions(i, hidden_states, queries, reference)
            hidden_states, self_w, cross_w = layer(
                hidden_states, query_position, spatial_query, memory, memory_position, memory_key, memory_mask,
                queries.self_attention_mask, output_attentions,
            )  # fmt: skip
            outputs.append(self.layernorm(hidden_states))
            if self.normalize_between_layers:
                hidden_states = outputs[-1]
            references.append(prediction_reference)
            reference, prediction_reference = builder.refine(i, hidden_states, reference, box_head)
            all_states += (hidden_states,)
            self_weights += (self_w,)
            cross_weights += (cross_w,)
        if self.normalize_between_layers:
            outputs[-1] = self.layernorm(outputs[-1])
        references = torch.stack(references) if queries.reference is not None else None
        attentions = (self_weights, cross_weights) if output_attentions else (None, None)
        return torch.stack(outputs), references, all_states if output_hidden_states else None, *attentions


class HfDetrBoxHead(MLP):
    """DETR's 3-layer box MLP: [..., D] -> [..., 4] boxes (sigmoid, cxcywh, 0..1). Given reference points
    or boxes [..., r] (sigmoid space), it predicts offsets to them: sigmoid(delta + inverse_sigmoid(reference))
    on the first r coordinates (Conditional DETR: the centre; DAB-DETR: the whole box)."""

    def __init__(self, d_model: int, num_layers: int = 3):
        super().__init__(d_model, d_model, 4, num_layers)

    def forward(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        delta = super().forward(x)
        if reference is not None:
            delta = delta + F.pad(inverse_sigmoid(reference), (0, 4 - reference.shape[-1]))
        return delta.sigmoid()


# ------------------------------------------------------------------------------------------------ models


# Every Auto class a checkpoint answers to with trust_remote_code. transformers writes only the saved
# class's own entry, so a detection checkpoint would not load through AutoModel without the others.
AUTO_MAP = {
    "AutoConfig": "configuration_hf_detr.HfDetrConfig",
    "AutoModel": "modeling_hf_detr.HfDetrModel",
    "AutoModelForObjectDetection": "modeling_hf_detr.HfDetrForObjectDetection",
}
FOCAL_PRIOR_PROBABILITY = 0.01  # sigmoid class heads start at p = 0.01 per class (RetinaNet, Deformable DETR)
# from_pretrained's arguments that say where a checkpoint is (on the Hub, in its cache)
HUB_ARGUMENTS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def checkpoint_model_type(pretrained_model_name_or_path, **hub_arguments) -> str | None:
    """The `model_type` of a checkpoint folder or Hub id's config.json; None without one (from_pretrained
    then says why)."""
    if pretrained_model_name_or_path is None:
        return None
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_arguments)
    except (OSError, ValueError):
        return None
    return config_dict.get("model_type")


class HfDetrPreTrainedModel(PreTrainedModel):
    config_class = HfDetrConfig
    config: HfDetrConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["HfDetrEncoderLayer", "HfDetrDecoderLayer"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def post_init(self):
        super().post_init()
        apply_speed_kernels(self)  # kernels.py: the same weights and keys, faster math; off while exporting

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`; a checkpoint of transformers' DETR, Conditional DETR or DAB-DETR (a
        folder or Hub id whose config.json has model_type "detr", "conditional_detr" or "dab-detr", such as
        facebook/detr-resnet-50) is converted on the fly (`hf_detr.convert`, logged), then loaded with the
        same arguments (new labels, `ignore_mismatched_sizes`, dtype, ...). `save_pretrained` the result to
        skip the conversion next time."""
        from .convert import CONFIG_CONVERTERS, convert_checkpoint  # convert.py imports this file

        hub_arguments = {name: kwargs[name] for name in HUB_ARGUMENTS if name in kwargs}
        model_type = checkpoint_model_type(pretrained_model_name_or_path, **hub_arguments)
        if model_type not in CONFIG_CONVERTERS:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        logger.warning(
            f"{pretrained_model_name_or_path} is a transformers {model_type!r} checkpoint: converting it to "
            f"hf_detr on the fly (save_pretrained the result to skip this next time)"
        )
        converted = convert_checkpoint(pretrained_model_name_or_path, revision=hub_arguments.get("revision"))
        local_arguments = {name: value for name, value in kwargs.items() if name not in HUB_ARGUMENTS}
        with tempfile.TemporaryDirectory() as folder:
            converted.save_pretrained(folder)
            model = super().from_pretrained(folder, *model_args, **local_arguments)
        loaded = model[0] if isinstance(model, tuple) else model  # output_loading_info=True
        loaded.config._name_or_path = str(pretrained_model_name_or_path)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config and the model-surface files, with every `auto_map` entry."""
        self.config.auto_map = {**AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        # a string names the transformer's attention; the backbone (a CNN, no attention) keeps its own
        if isinstance(attn_implementation, str):
            attn_implementation = {"": attn_implementation}
        return super().set_attn_implementation(attn_implementation, *args, **kwargs)

    def _initialize_weights(self, module, is_custom_code: bool = False):
        # transformers skips the modules without parameters of their own in custom code (whose init might
        # write loaded weights in place, unguarded); this `_init_weights` uses torch's init functions, which
        # transformers' guard keeps off loaded weights, so every module gets its call.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module):
        # DETR's init: xavier-uniform transformer weights (gain `init_xavier_std`) with zero biases, torch's
        # default for the heads, the input projection and the query builders' modules (each module's own
        # `reset_parameters`: a builder owns its init through the modules it is made of); the backbone
        # keeps its own init (or weights). transformers calls this for every module whose weights a
        # checkpoint lacks (e.g. a class head resized by `ignore_mismatched_sizes`), children before parents.
        if isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding):
            module.reset_parameters()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, HfDetrAttention | HfDetrMLP):
            for linear in module.children():
                if isinstance(linear, nn.Linear):
                    nn.init.xavier_uniform_(linear.weight, gain=self.config.init_xavier_std)
                    nn.init.zeros_(linear.bias)
        elif isinstance(module, SetCriterion):
            module.reset_buffers()
        elif isinstance(module, HfDetrForObjectDetection):
            if module.criterion.class_loss.sigmoid:
                prior = FOCAL_PRIOR_PROBABILITY
                nn.init.constant_(module.class_labels_classifier.bias, -math.log((1 - prior) / prior))
            if module.model.queries.reference_size:  # the first boxes are the references themselves
                nn.init.zeros_(module.bbox_predictor.layers[-1].weight)
                nn.init.zeros_(module.bbox_predictor.layers[-1].bias)


class HfDetrModel(HfDetrPreTrainedModel):
    """Backbone + transformer, without heads. forward(pixel_values [B, 3, H, W], pixel_mask [B, H, W])
    -> HfDetrModelOutput."""

    def __init__(self, config: HfDetrConfig):
        super().__init__(config)
        self.backbone = HfDetrBackbone(config)
        self.input_projection = nn.Conv2d(self.backbone.num_channels, config.d_model, kernel_size=1)
        self.queries = QUERY_BUILDERS[config.query_type].from_config(config)
        self.encoder = HfDetrEncoder(config)
        self.decoder = HfDetrDecoder(config, self.queries.spatial_cross_attention)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        labels: list[dict] | None = None,
        box_head: nn.Module | None = None,
        output_intermediate_hidden_states: bool | None = None,
        output_decoder_queries: bool = False,
        **kwargs,
    ) -> HfDetrModelOutput | tuple:
        """labels: the targets, for builders that make denoising queries from them in training;
        box_head: the shared box head, for builders that refine their references with it (given by
        HfDetrForObjectDetection; without it, anchors are not refined);
        output_intermediate_hidden_states (default: config.auxiliary_loss) and output_decoder_queries:
        see HfDetrModelOutput."""
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
        mask = padding_mask_or_none(mask.flatten(1))
        memory, encoder_states, encoder_attentions = self.encoder(features, position, mask, output_attentions, output_hidden_states)
        queries = self.queries(batch, memory, mask, labels)
        decoded, references, decoder_states, self_attentions, cross_attentions = self.decoder(
            self.queries, queries, memory, position, mask, box_head, output_attentions, output_hidden_states
        )

        if output_intermediate_hidden_states is None:
            output_intermediate_hidden_states = self.config.auxiliary_loss
        output = HfDetrModelOutput(
            last_hidden_state=decoded[-1, :, queries.num_denoising :][:, : self.config.num_queries],
            decoder_hidden_states=decoder_states,
            decoder_attentions=self_attentions,
            cross_attentions=cross_attentions,
            encoder_last_hidden_state=memory,
            encoder_hidden_states=encoder_states,
            encoder_attentions=encoder_attentions,
            intermediate_hidden_states=decoded if output_intermediate_hidden_states else None,
            reference_boxes=references if output_intermediate_hidden_states else None,
            decoder_queries=queries if output_decoder_queries else None,
        )
        return output if return_dict else output.to_tuple()


class HfDetrForObjectDetection(HfDetrPreTrainedModel):
    """HfDetrModel + the class head and box head, the same two heads applied to every decoder layer.
    With labels, the loss of every layer (auxiliary_loss). The class loss (`config.class_loss`) fixes
    the class head's size: num_labels + 1 (last: no object) for softmax, num_labels for sigmoid losses."""

    def __init__(self, config: HfDetrConfig):
        super().__init__(config)
        self.model = HfDetrModel(config)
        class_loss = CLASS_LOSSES[config.class_loss].from_config(config)
        self.class_labels_classifier = nn.Linear(config.d_model, config.num_labels + (0 if class_loss.sigmoid else 1))
        self.bbox_predictor = HfDetrBoxHead(config.d_model)
        matcher = MATCHERS[config.matcher_type].from_config(config, class_cost_type=class_loss.matching_cost)
        self.criterion = SetCriterion(
            matcher,
            class_loss,
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
        if labels is not None:
            check_labels(labels, self.config.num_labels, pixel_values.shape[0])  # before any query is made from them
        outputs = self.model(
            pixel_values, pixel_mask, output_attentions, output_hidden_states, return_dict=True, labels=labels,
            box_head=self.bbox_predictor, output_intermediate_hidden_states=True, output_decoder_queries=True,
        )  # fmt: skip

        # the same heads on every decoder layer: [L, B, T, C] and [L, B, T, 4]
        decoded, references = outputs.intermediate_hidden_states, outputs.reference_boxes
        if not self.config.auxiliary_loss:
            decoded, references = decoded[-1:], None if references is None else references[-1:]
        all_logits, all_boxes = self.layer_predictions(decoded, references)

        loss = loss_dict = None
        if labels is not None:
            loss, loss_dict = self.criterion(all_logits, all_boxes, labels, outputs.decoder_queries)
        # what the model predicts with: query group 0, after any denoising queries
        group_0 = slice(outputs.decoder_queries.num_denoising, outputs.decoder_queries.num_denoising + self.config.num_queries)
        all_logits, all_boxes = all_logits[:, :, group_0], all_boxes[:, :, group_0]
        auxiliary_outputs = None
        if self.config.auxiliary_loss and labels is not None:
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
            reference_boxes=None if outputs.reference_boxes is None else outputs.reference_boxes[:, :, group_0],
        )
        return output if return_dict else output.to_tuple()

    def layer_predictions(self, hidden_states: torch.Tensor, references: torch.Tensor | None = None):
        """The shared heads on decoder outputs: hidden_states [L, B, T, D] (intermediate_hidden_states),
        references [L, B, T, r] or None -> (logits [L, B, T, C], pred_boxes [L, B, T, 4])."""
        return self.class_labels_classifier(hidden_states), self.bbox_predictor(hidden_states, references)


# Saving a model copies the model-surface files next to config.json (remote code loading).
HfDetrModel.register_for_auto_class("AutoModel")
HfDetrForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")

__all__ = ["HfDetrModel", "HfDetrForObjectDetection", "HfDetrPreTrainedModel"]
