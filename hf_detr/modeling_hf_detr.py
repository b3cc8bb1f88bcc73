"""HfDetrModel and HfDetrForObjectDetection: DETR (Carion et al., 2020) and the later DETRs that change
its queries, its matching and its attention, in data-flow order.

    pixel_values [B, 3, H, W], pixel_mask [B, H, W]
      -> backbone                      feature maps [B, C_l, h_l, w_l] + masks, one per stage (backbone.py)
      -> feature levels                1x1 projections (+ extra levels), sine positions (+ level embeddings),
                                       flattened: EncoderMemory, features [B, S, D] (memory.py)
      -> encoder                       memory [B, S, D], self-attention of the config's kind (layers.py)
      -> (two-stage proposals)         every memory position scored and boxed; the top ones (memory.py)
      -> decoder queries               content queries (zeros in DETR) [B, T, D] + query positions [B, T, D]
                                       (+ reference points / boxes, self-attention mask: queries.py)
      -> decoder                       every layer's output [L, B, T, D] (+ its references)
      -> heads                         logits [L, B, T, C], pred_boxes [L, B, T, 4] (sigmoid, cxcywh, 0..1),
                                       shared by all layers or one per layer (heads.py)
      -> set criterion (with labels)   loss, loss_dict (loss.py, matching.py)
    S = sum of h_l * w_l over the feature levels (one level in DETR). T = num_queries at inference; in
    training, + denoising queries and further query groups.

This file is part of the model surface: it is copied next to config.json on save, so it imports only
torch, transformers and its siblings (single-dot relative imports).
"""

import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .backbone import HfDetrBackbone
from .configuration_hf_detr import HfDetrConfig
from .deformable import MultiScaleDeformableAttention
from .heads import HfDetrHeads, start_at_prior
from .kernels import apply_speed_kernels
from .layers import MLP, HfDetrAttention, HfDetrDecoderLayer, HfDetrEncoderLayer, HfDetrMLP
from .loss import CLASS_LOSSES, SetCriterion
from .matching import MATCHERS
from .memory import EncoderMemory, EncoderProposals, HfDetrFeatureLevels
from .queries import QUERY_BUILDERS, DecoderQueries, QueryBuilder
from .targets import Targets, check_labels

logger = logging.get_logger(__name__)


@dataclass
class HfDetrModelOutput(ModelOutput):
    """The layout of transformers' `DetrModelOutput`, then hf_detr's own fields.

    last_hidden_state [B, Q, D]: the final decoder layer, normalised, for the Q queries a model predicts with.
    encoder_last_hidden_state [B, h*w, D]. Hidden states and attentions on request, one entry per layer.
    encoder_last_hidden_state [B, S, D]: the memory, every feature level flattened (S = sum of h_l * w_l).
    intermediate_hidden_states [L, B, T, D] (with `output_intermediate_hidden_states`, by default when
        config.auxiliary_loss): every decoder layer's output (through the shared final norm, with
        config.decoder_final_norm), for all T queries of the pass (query groups and denoising queries in
        training: see `decoder_queries`).
    reference_boxes [L, B, T, 2 | 4] (with intermediate_hidden_states, for queries with references): per
        layer, the reference points (cx, cy) or boxes (cxcywh) its boxes are predicted relative to (where
        box refinement turns points into boxes, the points are given as boxes of sides 0.5, whose
        inverse-sigmoid is 0: the same predictions).
    decoder_queries (with `output_decoder_queries`): the decoder's start and the layout of the T queries.
    encoder_logits [B, S, C], encoder_pred_boxes [B, S, 4] (two-stage): the encoder stage's scores and boxes
        (sigmoid, cxcywh) of every memory position, from which the decoder's references were taken.
    Attentions: dense layers give probabilities [B, heads, T, S]; deformable ones (sampling_locations
        [B, T, heads, levels, points, 2] (x, y) in 0..1 of each level, weights [B, T, heads, levels, points])."""

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
    encoder_logits: torch.Tensor | None = None
    encoder_pred_boxes: torch.Tensor | None = None


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
    encoder_logits [B, S, C], encoder_pred_boxes [B, S, 4] (two-stage): the encoder stage's predictions.
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
    encoder_logits: torch.Tensor | None = None
    encoder_pred_boxes: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- inputs


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


# ------------------------------------------------------------------------------------------ transformer


class HfDetrEncoder(nn.Module):
    """The encoder layers over the memory; `scale_encoder_positions` (DAB-DETR): each layer's positions scaled
    element-wise by an MLP of its input."""

    def __init__(self, config: HfDetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(HfDetrEncoderLayer(config) for _ in range(config.encoder_layers))
        d = config.d_model
        self.position_scale = MLP(d, d, d, 2) if config.scale_encoder_positions else None
        # pre-norm layers leave their output un-normalised; DETR then adds a final norm
        self.layernorm = nn.LayerNorm(d) if config.normalize_before else nn.Identity()
        self.dropout = config.dropout

    def forward(self, memory: EncoderMemory, output_attentions=False, output_hidden_states=False):
        """memory: the feature levels -> (the same with features [B, S, D] encoded, states, attentions)."""
        hidden_states = F.dropout(memory.features, self.dropout, self.training)
        reference_points = memory.reference_points() if self.layers and self.layers[0].self_attn.needs_reference_points else None
        all_states, all_weights = (hidden_states,), ()
        for layer in self.layers:
            position = memory.position if self.position_scale is None else memory.position * self.position_scale(hidden_states)
            hidden_states, weights = layer(hidden_states, position, memory, reference_points, output_attentions)
            all_states += (hidden_states,)
            all_weights += (weights,)
        memory = memory.replace(features=self.layernorm(hidden_states))
        return memory, all_states if output_hidden_states else None, all_weights if output_attentions else None


class HfDetrDecoder(nn.Module):
    """The decoder layers, fed and refined by the query builder."""

    def __init__(self, config: HfDetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(HfDetrDecoderLayer(config, first_layer=i == 0) for i in range(config.decoder_layers))
        # DETR: one norm shared by all layers' outputs before the heads; Deformable DETR has none
        self.layernorm = nn.LayerNorm(config.d_model) if config.decoder_final_norm else nn.Identity()
        self.normalize_between_layers = config.normalize_between_decoder_layers

    def forward(
        self, builder: QueryBuilder, heads: HfDetrHeads, queries: DecoderQueries, memory: EncoderMemory,
        output_attentions=False, output_hidden_states=False,
    ):  # fmt: skip
        """builder: the query builder (queries.py); heads: the model's heads, whose box heads refine the
        references of builders that refine; queries: the builder's start; memory: the encoder's
        -> (every layer's output [L, B, T, D], the references its boxes are relative to [L, B, T, r] or None,
        states, self- and cross-attentions).

        As in the original DETR, the norm is applied to what goes to the heads only; each layer
        receives the previous layer's un-normalised output. With `normalize_between_decoder_layers`
        (transformers' DETR and Conditional DETR with auxiliary losses), each layer receives the normed
        output and the last output is normed twice."""
        hidden_states, reference, prediction_reference = queries.content, queries.reference, queries.reference
        outputs, references = [], []
        all_states, self_weights, cross_weights = (hidden_states,), (), ()
        for i, layer in enumerate(self.layers):
            query_position, spatial_query = builder.layer_positions(i, hidden_states, queries, reference)
            hidden_states, self_w, cross_w = layer(
                hidden_states, query_position, spatial_query, reference, memory.features, memory.position, memory,
                queries.self_attention_mask, output_attentions,
            )  # fmt: skip
            outputs.append(self.layernorm(hidden_states))
            if self.normalize_between_layers:
                hidden_states = outputs[-1]
            references.append(prediction_reference)
            reference, prediction_reference = builder.refine(i, hidden_states, reference, heads.box_head(i))
            all_states += (hidden_states,)
            self_weights += (self_w,)
            cross_weights += (cross_w,)
        if self.normalize_between_layers:
            outputs[-1] = self.layernorm(outputs[-1])
        attentions = (self_weights, cross_weights) if output_attentions else (None, None)
        return torch.stack(outputs), stack_references(references), all_states if output_hidden_states else None, *attentions


def stack_references(references: list) -> torch.Tensor | None:
    """Per layer [B, T, 2 | 4] -> [L, B, T, r]. Where box refinement turned reference points into boxes, the
    points become boxes of sides 0.5: inverse-sigmoid 0, so the box head predicts the same boxes from them."""
    if references[0] is None:
        return None
    size = max(reference.shape[-1] for reference in references)
    return torch.stack([F.pad(reference, (0, size - reference.shape[-1]), value=0.5) for reference in references])


# ------------------------------------------------------------------------------------------------ models


# Every Auto class a checkpoint answers to with trust_remote_code. transformers writes only the saved
# class's own entry, so a detection checkpoint would not load through AutoModel without the others.
AUTO_MAP = {
    "AutoConfig": "configuration_hf_detr.HfDetrConfig",
    "AutoModel": "modeling_hf_detr.HfDetrModel",
    "AutoModelForObjectDetection": "modeling_hf_detr.HfDetrForObjectDetection",
}
FOCAL_PRIOR_PROBABILITY = 0.01  # sigmoid class heads start at p = 0.01 per class (RetinaNet, Deformable DETR)
# Keys of hf_detr checkpoints saved before the heads and input projections moved into HfDetrModel -> today's
LEGACY_KEYS = {
    r"^class_labels_classifier\.": "model.heads.class_heads.0.",
    r"^bbox_predictor\.": "model.heads.box_heads.0.",
    r"^model\.input_projection\.": "model.feature_levels.projections.0.",
}
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
    # model_type -> a function converting such a checkpoint (a folder or Hub id) to an HfDetrForObjectDetection.
    # `import hf_detr` fills it (hf_detr/convert.py): the model files know no converter, so a saved checkpoint
    # carries the model's code only; loaded as remote code without hf_detr, other families are refused by name.
    checkpoint_converters: dict = {}

    def post_init(self):
        super().post_init()
        apply_speed_kernels(self)  # kernels.py: the same weights and keys, faster math; off while exporting

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`; a checkpoint of another family that hf_detr converts (with hf_detr
        installed: transformers' DETR, Conditional DETR, DAB-DETR and Deformable DETR, a folder or Hub id whose
        config.json names their model_type, such as facebook/detr-resnet-50) is converted on the fly
        (`hf_detr.convert`, logged), then loaded with the same arguments (new labels, `ignore_mismatched_sizes`,
        dtype, ...). `save_pretrained` the result to skip the conversion next time. A checkpoint of any other
        family is a ValueError naming its model_type. hf_detr checkpoints saved with an older key layout load too."""
        hub_arguments = {name: kwargs[name] for name in HUB_ARGUMENTS if name in kwargs}
        model_type = checkpoint_model_type(pretrained_model_name_or_path, **hub_arguments)
        if model_type in (None, HfDetrConfig.model_type):
            kwargs.setdefault("key_mapping", LEGACY_KEYS)
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            loaded = model[0] if isinstance(model, tuple) else model  # output_loading_info=True
            loaded._weight_conversions = None  # saved again in today's layout, not the one it was read in
            return model
        if model_type not in cls.checkpoint_converters:
            convertible = f"it converts {sorted(cls.checkpoint_converters)}" if cls.checkpoint_converters else "install hf_detr to convert other families"
            raise ValueError(
                f"{pretrained_model_name_or_path} is a {model_type!r} checkpoint, not an hf_detr one, and hf_detr cannot convert it ({convertible})"
            )
        logger.warning(
            f"{pretrained_model_name_or_path} is a transformers {model_type!r} checkpoint: converting it to "
            f"hf_detr on the fly (save_pretrained the result to skip this next time)"
        )
        converted = cls.checkpoint_converters[model_type](pretrained_model_name_or_path, revision=hub_arguments.get("revision"))
        local_arguments = {name: value for name, value in kwargs.items() if name not in HUB_ARGUMENTS}
        with tempfile.TemporaryDirectory() as folder:
            converted.save_pretrained(folder)
            model = super().from_pretrained(folder, *model_args, **local_arguments)
        loaded = model[0] if isinstance(model, tuple) else model
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
        # default for the input projections and the queries' modules, then each of our modules' own
        # `reset_parameters` (Deformable DETR's sampling offsets, level embeddings, the heads' priors, a query
        # builder's own); the backbone keeps its own init (or weights). transformers calls this for every
        # module whose weights a checkpoint lacks (e.g. a class head resized by `ignore_mismatched_sizes`),
        # children before parents.
        if isinstance(module, nn.Linear | nn.Conv2d | nn.Embedding | nn.GroupNorm):
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
        elif isinstance(module, MultiScaleDeformableAttention | HfDetrHeads | HfDetrFeatureLevels | QueryBuilder):
            module.reset_parameters()
        elif isinstance(module, EncoderProposals):
            module.box_head.start_at_reference()
            if CLASS_LOSSES[self.config.class_loss].sigmoid:
                start_at_prior(module.class_head, FOCAL_PRIOR_PROBABILITY)


class HfDetrModel(HfDetrPreTrainedModel):
    """Backbone + transformer + the prediction heads the decoder refines its references with.
    forward(pixel_values [B, 3, H, W], pixel_mask [B, H, W]) -> HfDetrModelOutput."""

    def __init__(self, config: HfDetrConfig):
        super().__init__(config)
        self.backbone = HfDetrBackbone(config)
        self.feature_levels = HfDetrFeatureLevels(config, self.backbone.channels)
        self.encoder = HfDetrEncoder(config)
        num_classes = config.num_labels + (0 if CLASS_LOSSES[config.class_loss].sigmoid else 1)
        self.proposals = None
        if config.two_stage:
            self.proposals = EncoderProposals(config.d_model, num_classes, config.num_queries, config.two_stage_class_agnostic)
        self.queries = QUERY_BUILDERS[config.query_type].from_config(config)
        self.decoder = HfDetrDecoder(config)
        self.heads = HfDetrHeads(
            config.d_model, num_classes, config.decoder_layers, per_layer=config.with_box_refine,
            prior_probability=FOCAL_PRIOR_PROBABILITY if CLASS_LOSSES[config.class_loss].sigmoid else None,
            start_at_reference=self.queries.reference_size > 0, box_size_logit=getattr(self.queries, "box_size_logit", 0.0),
        )  # fmt: skip
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        labels: list[dict] | Targets | None = None,
        output_intermediate_hidden_states: bool | None = None,
        output_decoder_queries: bool = False,
        **kwargs,
    ) -> HfDetrModelOutput | tuple:
        """labels: the targets, for builders that make denoising queries from them in training;
        output_intermediate_hidden_states (default: config.auxiliary_loss) and output_decoder_queries:
        see HfDetrModelOutput."""
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        check_pixel_inputs(pixel_values, pixel_mask)
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((batch, height, width), dtype=torch.long, device=pixel_values.device)
        targets = None if labels is None else check_labels(labels, self.config.num_labels, batch)

        stages = self.backbone(pixel_values, pixel_mask)
        memory = self.feature_levels(stages, pixel_mask)
        memory, encoder_states, encoder_attentions = self.encoder(memory, output_attentions, output_hidden_states)
        proposals = self.proposals(memory) if self.proposals is not None else None
        queries = self.queries(batch, memory, proposals, targets)
        decoded, references, decoder_states, self_attentions, cross_attentions = self.decoder(
            self.queries, self.heads, queries, memory, output_attentions, output_hidden_states
        )

        if output_intermediate_hidden_states is None:
            output_intermediate_hidden_states = self.config.auxiliary_loss
        output = HfDetrModelOutput(
            last_hidden_state=decoded[-1, :, queries.prediction_slice],
            decoder_hidden_states=decoder_states,
            decoder_attentions=self_attentions,
            cross_attentions=cross_attentions,
            encoder_last_hidden_state=memory.features,
            encoder_hidden_states=encoder_states,
            encoder_attentions=encoder_attentions,
            intermediate_hidden_states=decoded if output_intermediate_hidden_states else None,
            reference_boxes=references if output_intermediate_hidden_states else None,
            decoder_queries=queries if output_decoder_queries else None,
            encoder_logits=None if proposals is None else proposals.logits,
            encoder_pred_boxes=None if proposals is None else proposals.pred_boxes,
        )
        return output if return_dict else output.to_tuple()


class HfDetrForObjectDetection(HfDetrPreTrainedModel):
    """HfDetrModel + the set criterion. Every decoder layer's output goes through the model's class and box
    heads (the same two for all layers in DETR); with labels, the loss of every layer (auxiliary_loss). The
    class loss (`config.class_loss`) fixes the class head's size: num_labels + 1 (last: no object) for
    softmax, num_labels for sigmoid losses."""

    def __init__(self, config: HfDetrConfig):
        super().__init__(config)
        self.model = HfDetrModel(config)
        class_loss = CLASS_LOSSES[config.class_loss].from_config(config)
        self.criterion = SetCriterion(
            MATCHERS[config.matcher_type].from_config(config, class_loss),
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
        # checked once, before any query is made from them
        targets = None if labels is None else check_labels(labels, self.config.num_labels, pixel_values.shape[0])
        outputs = self.model(
            pixel_values, pixel_mask, output_attentions, output_hidden_states, return_dict=True, labels=targets,
            output_intermediate_hidden_states=True, output_decoder_queries=True,
        )  # fmt: skip

        # the heads on every decoder layer: [L, B, T, C] and [L, B, T, 4]
        decoded, references, first_layer = outputs.intermediate_hidden_states, outputs.reference_boxes, 0
        if not self.config.auxiliary_loss:
            decoded, references, first_layer = decoded[-1:], None if references is None else references[-1:], decoded.shape[0] - 1
        all_logits, all_boxes = self.model.heads(decoded, references, first_layer)

        queries = outputs.decoder_queries
        loss = loss_dict = None
        if targets is not None:
            encoder = None if outputs.encoder_logits is None else (outputs.encoder_logits, outputs.encoder_pred_boxes)
            loss, loss_dict = self.criterion(
                all_logits, all_boxes, targets, queries, encoder, class_agnostic_encoder=self.config.two_stage_class_agnostic
            )
        predicted = queries.prediction_slice
        all_logits, all_boxes = all_logits[:, :, predicted], all_boxes[:, :, predicted]
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
            reference_boxes=None if outputs.reference_boxes is None else outputs.reference_boxes[:, :, predicted],
            encoder_logits=outputs.encoder_logits,
            encoder_pred_boxes=outputs.encoder_pred_boxes,
        )
        return output if return_dict else output.to_tuple()


# Saving a model copies the model-surface files next to config.json (remote code loading).
HfDetrModel.register_for_auto_class("AutoModel")
HfDetrForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")

__all__ = ["HfDetrModel", "HfDetrForObjectDetection", "HfDetrPreTrainedModel"]
