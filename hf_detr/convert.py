"""Published DETR weights -> hf_detr: DETR, and transformers' Conditional DETR, DAB-DETR and Deformable DETR.

Three DETR key layouts reach us, all mapped by the same table of renames onto our state dict:
- a live transformers v5 `DetrForObjectDetection` (AutoBackbone ResNet, `mlp.fc1`, `o_proj` ...);
- a transformers checkpoint on the Hub as saved by transformers v4 (`facebook/detr-resnet-50`):
  `model.backbone.conv_encoder.model.` + timm ResNet keys (`conv1`, `layer1.0.bn1`), or the
  `no_timm` revision's AutoBackbone keys, and `out_proj` / `fc1` at layer level;
- the original facebookresearch/detr `.pth` (`backbone.0.body.`, `transformer.`, fused `in_proj_weight`).
timm and torchvision ResNets share their key names, so both map onto transformers' ResNet.
transformers' `ConditionalDetrForObjectDetection` and `DabDetrForObjectDetection` (live or saved) map
onto the "conditional" and "anchor" query types through the same table, and its
`DeformableDetrForObjectDetection` (plain, with box refinement, two-stage; live, or saved by transformers v4 as
the SenseTime/deformable-detr* checkpoints are) onto the "deformable" query type with deformable attention
(`_DEFORMABLE_RENAMES`, then `_deformable_layout` for what depends on the config).

`convert_checkpoint` reads any of them from disk or the Hub; scripts/convert_detr_checkpoint.py wraps it.
"""

import argparse
import math
import re
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedConfig, ResNetConfig

from .configuration_hf_detr import HfDetrConfig
from .modeling_hf_detr import LEGACY_KEYS, HfDetrForObjectDetection, HfDetrPreTrainedModel

# COCO 2017 category id -> name; ids missing here (12, 26, ...) are unused slots ("N/A"), as in DETR's 91 classes.
COCO_CATEGORIES = dict(enumerate([
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]))  # fmt: skip

_BACKBONE = "model.backbone.model."
# Deformable DETR's names (live transformers v5 and saved v4 alike) that are not DETR's; they go first. The
# per-layer heads keep their index here: `_deformable_layout` sorts them out with the config.
_DEFORMABLE_RENAMES = [
    # the decoder's copies of the heads (tied; a v5 save keeps them instead of the top-level ones)
    (r"^model\.decoder\.(bbox|class)_embed\.", r"\1_embed."),
    (r"^model\.level_embed$", "model.feature_levels.level_embed"),
    (r"^model\.input_proj\.", "model.feature_levels.projections."),
    (r"^model\.reference_points\.", "model.queries.reference_points."),
    (r"^model\.enc_output\.", "model.proposals.output_proj."),
    (r"^model\.enc_output_norm\.", "model.proposals.output_norm."),
    (r"^model\.pos_trans\.", "model.queries.proposal_projection."),
    (r"^model\.pos_trans_norm\.", "model.queries.proposal_norm."),
    (r"^class_embed\.(\d+)\.", r"model.heads.class_heads.\1."),
    (r"^bbox_embed\.(\d+)\.", r"model.heads.box_heads.\1."),
]
# (pattern, replacement) applied in order to every key; the first group of rules brings each
# layout's prefixes to ours, the rest rename inside.
_RENAMES = [
    (r"^model\.backbone\.conv_encoder\.model\.", _BACKBONE),  # transformers v4
    (r"^backbone\.0\.body\.", _BACKBONE),  # original DETR
    (r"^input_proj\.", "model.input_projection."),
    (r"^(model\.)?query(_position)?_embed(dings)?\.", "model.queries.position_embeddings."),
    (r"^transformer\.(en|de)coder\.layers\.", r"model.\1coder.layers."),
    (r"^transformer\.decoder\.norm\.", "model.decoder.layernorm."),
    (r"^transformer\.encoder\.norm\.", "model.encoder.layernorm."),
    (r"^class_embed\.", "class_labels_classifier."),
    (r"^bbox_embed\.", "bbox_predictor."),

    # transformer layers: v4 and original names -> ours
    (r"\.(self_attn|encoder_attn|multihead_attn)\.out_proj\.", r".\1.o_proj."),
    (r"\.multihead_attn\.", ".encoder_attn."),
    (r"(layers\.\d+)\.(fc|linear)([12])\.", r"\1.mlp.fc\3."),
    (r"(coder\.layers\.\d+)\.norm1\.", r"\1.self_attn_layer_norm."),
    (r"(encoder\.layers\.\d+)\.norm2\.", r"\1.final_layer_norm."),
    (r"(decoder\.layers\.\d+)\.norm2\.", r"\1.encoder_attn_layer_norm."),
    (r"(decoder\.layers\.\d+)\.norm3\.", r"\1.final_layer_norm."),
    # Conditional DETR: the query builder's MLPs, content / position projections (transformers v5 live
    # names, then the saved / original ones: sa_qcontent_proj, ca_qpos_sine_proj, ...)
    (r"(decoder\.layers\.\d+)\.(sa|ca)_(qcontent|qpos|kcontent|kpos|v|qpos_sine)_proj\.",
     lambda m: f"{m[1]}.{ {'sa': 'self_attn', 'ca': 'encoder_attn'}[m[2]] }.{_CONDITIONAL_PROJECTIONS[m[3]]}."),
    (r"^model\.decoder\.(query_scale|ref_point_head|ref_anchor_head)\.", r"model.queries.\1."),
    (r"\.([qk])_content_proj\.", r".\1_proj."),
    (r"\.q_pos_sine_proj\.", ".q_sine_proj."),
    # DAB-DETR (transformers): anchors, the encoder's position MLP, its nested decoder-layer names, PReLU
    (r"^model\.query_refpoint_embeddings\.", "model.queries.anchor_embeddings."),
    (r"^model\.encoder\.query_scale\.", "model.encoder.position_scale."),
    (r"\.(self_attn|cross_attn)\.(self_attn|cross_attn)_(layer_norm)\.", lambda m: f".{_DAB_ATTENTION[m[1]]}_layer_norm."),
    (r"\.(self_attn|cross_attn)\.(?:self_attn|cross_attn)\.output_proj\.", lambda m: f".{_DAB_ATTENTION[m[1]]}.o_proj."),
    (r"\.(self_attn|cross_attn)\.(?:self_attn|cross_attn)_(query|key|value)_(content_|pos_|pos_sine_)?proj\.",
     lambda m: f".{_DAB_ATTENTION[m[1]]}.{m[2][0]}_{ {'content_': '', 'pos_': 'pos_', 'pos_sine_': 'sine_', None: ''}[m[3]] }proj."),
    (r"(decoder\.layers\.\d+)\.mlp\.final_layer_norm\.", r"\1.final_layer_norm."),
    (r"(layers\.\d+)\.(?:mlp\.)?activation_fn\.", r"\1.mlp.activation."),
]
# timm / torchvision ResNet -> transformers ResNet (AutoBackbone); left out for a timm backbone, which keeps them
_TIMM_RESNET_RENAMES = [
    (rf"^{_BACKBONE}conv1\.", _BACKBONE + "embedder.embedder.convolution."),
    (rf"^{_BACKBONE}bn1\.", _BACKBONE + "embedder.embedder.normalization."),
    (rf"^{_BACKBONE}layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"{_BACKBONE}encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.convolution."),
    (rf"^{_BACKBONE}layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"{_BACKBONE}encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.normalization."),
    (rf"^{_BACKBONE}layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"{_BACKBONE}encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.convolution."),
    (rf"^{_BACKBONE}layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"{_BACKBONE}encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.normalization."),
]
_DAB_ATTENTION = {"self_attn": "self_attn", "cross_attn": "encoder_attn"}
_CONDITIONAL_PROJECTIONS = {
    "qcontent": "q_proj", "qpos": "q_pos_proj", "kcontent": "k_proj", "kpos": "k_pos_proj", "v": "v_proj", "qpos_sine": "q_sine_proj",
}  # fmt: skip
# Conditional DETR's original code (and transformers v4) keeps a query-position projection in the
# cross-attention of every decoder layer but uses it in the first only; hf_detr has it there only.
_UNUSED = r"decoder\.layers\.[1-9]\d*\.encoder_attn\.q_pos_proj\."


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], timm_backbone: bool = False, config: HfDetrConfig | None = None
) -> dict[str, torch.Tensor]:
    """Any of the DETR key layouts -> hf_detr's keys. Fused `in_proj_weight` / `in_proj_bias`
    (torch.nn.MultiheadAttention, original DETR) are split into q/k/v projections; DAB-DETR's and Deformable
    DETR's copies of the heads inside their decoders (tied to the top-level heads) and unused projections
    (`_UNUSED`) are dropped. timm_backbone: for a model with a timm backbone, whose ResNet keeps timm's (=
    torchvision's) names. config: the converted model's, for Deformable DETR (see `_deformable_layout`)."""
    renames = _DEFORMABLE_RENAMES + (_RENAMES if timm_backbone else _RENAMES + _TIMM_RESNET_RENAMES) + list(LEGACY_KEYS.items())
    converted = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if re.search(_UNUSED, key):
            continue
        if key.endswith((".in_proj_weight", ".in_proj_bias")):
            prefix, kind = key.rsplit(".in_proj_", 1)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                converted[f"{prefix}.{name}.{kind}"] = part
        else:
            converted[key] = value
    return _deformable_layout(converted, config) if config is not None and config.query_type == "deformable" else converted


def _deformable_layout(converted: dict[str, torch.Tensor], config: HfDetrConfig) -> dict[str, torch.Tensor]:
    """Deformable DETR's tensors whose place depends on the config:
    - its object query [Q, 2D] is the position (first half) and the content query (second half);
    - its heads: one per decoder layer with box refinement, else one shared (the copies per layer are the same
      tensors); with two-stage the one after the last layer is the encoder stage's;
    - its two-stage proposal embedding is (x, y, w, h), hf_detr's sine embedding of boxes (y, x, w, h): the
      projection's input columns of x and y swap."""
    layout = {}
    if config.with_box_refine and "model.heads.class_heads.1.weight" not in converted:
        # transformers v5 ties the class heads of every layer and saves the first alone: the same head on every layer
        shared = {key: value for key, value in converted.items() if key.startswith("model.heads.class_heads.0.")}
        for layer in range(1, config.decoder_layers):
            converted.update({key.replace(".0.", f".{layer}.", 1): value for key, value in shared.items()})
    for key, value in converted.items():
        if key == "model.queries.position_embeddings.weight" and value.shape[1] == 2 * config.d_model:
            position, content = value.chunk(2, dim=1)
            layout["model.queries.position_embeddings.weight"], layout["model.queries.content_embeddings.weight"] = position, content
            continue
        if key == "model.queries.proposal_projection.weight":
            quarter = value.shape[1] // 4
            value = torch.cat((value[:, quarter : 2 * quarter], value[:, :quarter], value[:, 2 * quarter :]), 1)
        head = re.match(r"model\.heads\.(class|box)_heads\.(\d+)\.(.*)", key)
        if head:
            kind, layer, rest = head[1], int(head[2]), head[3]
            if layer == config.decoder_layers and config.two_stage:
                key = f"model.proposals.{kind}_head.{rest}"
            elif layer >= (config.decoder_layers if config.with_box_refine else 1):
                continue  # a shared head's copy for another layer
        layout[key] = value
    return layout


def resnet_backbone_config(depth: int, stages: list[int] | None = None) -> ResNetConfig:
    """transformers' ResNet config equal to timm's / torchvision's resnet{depth}, giving the `stages` (1-4; default
    the last only)."""
    depths = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
    if depth not in depths:
        raise ValueError(f"no ResNet-{depth} layout known; DETR was published with ResNet-50 and ResNet-101")
    out_features = [f"stage{stage}" for stage in stages or [4]]
    return ResNetConfig(depths=depths[depth], layer_type="bottleneck", hidden_sizes=[256, 512, 1024, 2048], out_features=out_features)


def _timm_stages(timm_config) -> list[int]:
    """A TimmBackboneConfig's `out_indices` as ResNet stages 1-4 (-1: the last)."""
    return [4 if index == -1 else int(index) for index in (getattr(timm_config, "out_indices", None) or [-1])]


def _coco_names_if_default(id2label: dict[int, str]) -> dict[int, str]:
    """DETR's 91 COCO slots get their names when a checkpoint only has transformers' LABEL_i ones."""
    if len(id2label) == len(COCO_CATEGORIES) and all(name == f"LABEL_{i}" for i, name in id2label.items()):
        return dict(COCO_CATEGORIES)
    return dict(id2label)


def timm_resnet_backbone(resnet_config: ResNetConfig) -> dict:
    """transformers' ResNet config -> the same network as a timm backbone (use_timm_backbone): its name
    and the timm.create_model keywords that give it these depths and widths."""
    if resnet_config.embedding_size != 64:
        raise ValueError(f"timm's ResNet stem has 64 channels; this ResNet's has {resnet_config.embedding_size}")
    bottleneck = resnet_config.layer_type == "bottleneck"
    widths = [size // 4 for size in resnet_config.hidden_sizes] if bottleneck else list(resnet_config.hidden_sizes)
    kwargs = {"layers": list(resnet_config.depths), "channels": widths}
    if resnet_config.out_features != ["stage4"]:  # timm's feature index i is ResNet stage i (0: the stem)
        kwargs["out_indices"] = [int(name.removeprefix("stage")) for name in resnet_config.out_features]
    return {"use_timm_backbone": True, "backbone": "resnet50" if bottleneck else "resnet18", "backbone_kwargs": kwargs}


def config_from_detr_config(detr_config, eos_coefficient: bool = True, timm_backbone: bool = False, **overrides) -> HfDetrConfig:
    """transformers' DetrConfig -> HfDetrConfig with the same architecture, costs and labels (also the
    shared part of its Conditional DETR and DAB-DETR configs: eos_coefficient=False, overrides).
    timm_backbone: keep (or make) the backbone a timm model, else a transformers AutoBackbone ResNet
    (which needs no timm; timm's ResNet maps onto it)."""
    if getattr(detr_config, "position_embedding_type", "sine") != "sine":
        raise ValueError(f"only the sine position embedding is supported, got {detr_config.position_embedding_type!r}")
    backbone = detr_config.backbone_config
    backbone_fields = {"backbone_config": backbone}
    if backbone.model_type == "timm_backbone":
        if getattr(detr_config, "dilation", False):
            raise ValueError("DETR-DC5 (dilation=True) is not supported")
        # the stages the model reads: DETR the last; Deformable DETR the last num_feature_levels (at most all)
        stages = _timm_stages(backbone)[-getattr(detr_config, "num_feature_levels", 1) :]
        if timm_backbone:
            backbone_fields = {"use_timm_backbone": True, "backbone": backbone.backbone}
            if stages != [4]:
                backbone_fields["backbone_kwargs"] = {"out_indices": stages}
        else:
            backbone_fields = {"backbone_config": resnet_backbone_config(int(re.sub(r"\D", "", backbone.backbone)), stages)}
    elif timm_backbone:
        if backbone.model_type != "resnet":
            raise ValueError(f"only a ResNet backbone maps onto timm, got {backbone.model_type!r}")
        backbone_fields = timm_resnet_backbone(backbone)
    same = [
        "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
        "encoder_ffn_dim", "decoder_ffn_dim", "activation_function", "dropout", "attention_dropout",
        "activation_dropout", "init_xavier_std", "num_queries", "auxiliary_loss",
    ] + ["d_model"] * ("d_model" not in overrides) + ["eos_coefficient"] * eos_coefficient  # fmt: skip
    kwargs = {name: getattr(detr_config, name) for name in same}
    kwargs["num_channels"] = getattr(detr_config, "num_channels", 3)
    # transformers' DETR and Conditional DETR feed normed states between decoder layers with auxiliary losses
    kwargs["normalize_between_decoder_layers"] = detr_config.model_type != "dab-detr" and detr_config.auxiliary_loss
    kwargs.update({name: float(getattr(detr_config, name)) for name in ("class_cost", "bbox_cost", "giou_cost")})
    kwargs.update({name: float(getattr(detr_config, name)) for name in ("bbox_loss_coefficient", "giou_loss_coefficient")})
    kwargs.update({name: float(kwargs[name]) for name in ("dropout", "attention_dropout", "activation_dropout")})
    return HfDetrConfig(**backbone_fields, id2label=_coco_names_if_default(detr_config.id2label), **{**kwargs, **overrides})


def config_from_conditional_detr_config(conditional_config, timm_backbone: bool = False) -> HfDetrConfig:
    """transformers' ConditionalDetrConfig -> HfDetrConfig with query_type "conditional" and the focal
    class loss. transformers' loss weights its class term by 1 (its `cls_loss_coefficient` is unused), and
    so does the converted model, so that both compute the same loss."""
    return config_from_detr_config(
        conditional_config, eos_coefficient=False, timm_backbone=timm_backbone, query_type="conditional", class_loss="focal",
        focal_alpha=float(conditional_config.focal_alpha), ce_loss_coefficient=1.0,
    )  # fmt: skip


def config_from_dab_detr_config(dab_config, timm_backbone: bool = False) -> HfDetrConfig:
    """transformers' DabDetrConfig -> HfDetrConfig with query_type "anchor", the focal class loss, DAB's
    encoder position scaling and spatial temperature, and look_forward_twice (transformers' DAB-DETR, as
    the original, predicts each layer's boxes relative to the un-detached refined anchors). Its class
    term is weighted by 1, as in transformers' loss."""
    unsupported = {
        "num_patterns": dab_config.num_patterns != 0, "keep_query_pos": dab_config.keep_query_pos,
        "query_dim": dab_config.query_dim != 4, "normalize_before": dab_config.normalize_before,
        "temperature_height != temperature_width": dab_config.temperature_height != dab_config.temperature_width,
        "sine_position_embedding_scale": dab_config.sine_position_embedding_scale not in (None, 2 * math.pi),
    }  # fmt: skip
    if any(unsupported.values()):
        raise ValueError(f"DAB-DETR options hf_detr does not implement: {[k for k, v in unsupported.items() if v]}")
    return config_from_detr_config(
        dab_config, eos_coefficient=False, timm_backbone=timm_backbone, d_model=dab_config.hidden_size, query_type="anchor", class_loss="focal",
        focal_alpha=float(dab_config.focal_alpha), ce_loss_coefficient=1.0, scale_encoder_positions=True,
        position_embedding_temperature=dab_config.temperature_height, look_forward_twice=True,
    )  # fmt: skip


def config_from_deformable_detr_config(deformable_config, timm_backbone: bool = False) -> HfDetrConfig:
    """transformers' DeformableDetrConfig -> HfDetrConfig with query_type "deformable", deformable attention in
    the encoder and the decoder's cross-attention, its levels and points, box refinement and two-stage as
    set (two-stage: `two_stage_num_proposals` queries), Deformable DETR's positions (pixel centres) and decoder
    (no final norm), and the focal class loss weighted 1 as in transformers' loss."""
    if getattr(deformable_config, "encoder_layerdrop", 0.0):
        raise ValueError(f"Deformable DETR's encoder_layerdrop is not supported, got {deformable_config.encoder_layerdrop}")
    num_queries = deformable_config.two_stage_num_proposals if deformable_config.two_stage else deformable_config.num_queries
    return config_from_detr_config(
        deformable_config, eos_coefficient=False, timm_backbone=timm_backbone, query_type="deformable", class_loss="focal",
        focal_alpha=float(deformable_config.focal_alpha), ce_loss_coefficient=1.0, encoder_attention="deformable",
        decoder_cross_attention="deformable", num_feature_levels=deformable_config.num_feature_levels,
        encoder_n_points=deformable_config.encoder_n_points, decoder_n_points=deformable_config.decoder_n_points,
        with_box_refine=deformable_config.with_box_refine, two_stage=deformable_config.two_stage,
        position_embedding_offset=0.5, decoder_final_norm=False, normalize_between_decoder_layers=False, num_queries=num_queries,
    )  # fmt: skip


# transformers' model_type -> the config mapping; convert_transformers_detr takes a model of any of them.
CONFIG_CONVERTERS = {
    "detr": config_from_detr_config,
    "conditional_detr": config_from_conditional_detr_config,
    "dab-detr": config_from_dab_detr_config,
    "deformable_detr": config_from_deformable_detr_config,
}


def config_from_original_state_dict(
    state_dict: dict[str, torch.Tensor], num_heads: int = 8, backbone_config: PreTrainedConfig | None = None, timm_backbone: bool = False
) -> HfDetrConfig:
    """Infer the architecture of an original facebookresearch/detr checkpoint from its tensors.

    The head count is not stored in the weights: DETR's published models all use 8. The backbone is
    ResNet-50 or -101, told apart by the block count of layer3 (6 or 23), unless `backbone_config`
    (an AutoBackbone config with the same layout, e.g. a tiny ResNet in tests) is given."""
    def count(prefix):
        return len({k.split(".")[3] for k in state_dict if k.startswith(prefix)})

    if "class_embed.weight" not in state_dict:
        raise ValueError("not an original DETR detection state dict (no `class_embed.weight`; panoptic models are not supported)")
    num_classes = state_dict["class_embed.weight"].shape[0] - 1
    if backbone_config is None:
        layer3_blocks = len({k.split(".")[4] for k in state_dict if k.startswith("backbone.0.body.layer3.")})
        if layer3_blocks not in (6, 23):
            raise ValueError(f"layer3 has {layer3_blocks} blocks: neither ResNet-50 (6) nor ResNet-101 (23); pass backbone_config")
        backbone_config = resnet_backbone_config({6: 50, 23: 101}[layer3_blocks])
    backbone_fields = timm_resnet_backbone(backbone_config) if timm_backbone else {"backbone_config": backbone_config}
    return HfDetrConfig(
        **backbone_fields,
        d_model=state_dict["query_embed.weight"].shape[1],
        num_queries=state_dict["query_embed.weight"].shape[0],
        encoder_layers=count("transformer.encoder.layers."),
        decoder_layers=count("transformer.decoder.layers."),
        encoder_attention_heads=num_heads,
        decoder_attention_heads=num_heads,
        encoder_ffn_dim=state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0],
        decoder_ffn_dim=state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0],
        normalize_before="transformer.encoder.norm.weight" in state_dict,
        id2label=dict(COCO_CATEGORIES) if num_classes == len(COCO_CATEGORIES) else None,
        num_labels=num_classes,
    )


def load_converted(config: HfDetrConfig, state_dict: dict[str, torch.Tensor]) -> HfDetrForObjectDetection:
    """Build the model and load converted weights, failing loudly on any key left over or missing."""
    model = HfDetrForObjectDetection(config)
    converted = convert_state_dict(state_dict, timm_backbone=config.use_timm_backbone, config=config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"DETR weights do not fit hf_detr: missing {sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}")
    return model.eval()


def convert_transformers_detr(model, timm_backbone: bool = False) -> HfDetrForObjectDetection:
    """A transformers `DetrForObjectDetection`, `ConditionalDetrForObjectDetection`, `DabDetrForObjectDetection`
    or `DeformableDetrForObjectDetection` in, an `HfDetrForObjectDetection` with the same weights (and matching
    outputs) out: query_type "detr", "conditional", "anchor" or "deformable". timm_backbone: see
    config_from_detr_config."""
    return load_converted(config_from_transformers_config(model.config, timm_backbone), model.state_dict())


def config_from_transformers_config(config, timm_backbone: bool = False) -> HfDetrConfig:
    if config.model_type not in CONFIG_CONVERTERS:
        raise ValueError(f"hf_detr cannot convert a {config.model_type!r} model; it converts {sorted(CONFIG_CONVERTERS)}")
    return CONFIG_CONVERTERS[config.model_type](config, timm_backbone=timm_backbone)


def read_original_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], argparse.Namespace | None]:
    """A facebookresearch/detr `.pth` -> (its "model" state dict, its training `args` if saved).
    Read with weights_only=True: tensors and containers only, plus the plain attribute bag
    argparse.Namespace that DETR's main.py stores beside the weights of its training checkpoints."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path}: expected a DETR checkpoint {{'model': state_dict, ...}}")
    return checkpoint["model"], checkpoint.get("args")


def read_transformers_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The raw state dict of a transformers checkpoint folder: model*.safetensors, else pytorch_model*.bin
    (weights_only). Keys are left as saved; convert_state_dict maps them."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if shards := sorted(folder.glob("model*.safetensors")):
        return {key: value for shard in shards for key, value in load_file(shard).items()}
    if shards := sorted(folder.glob("pytorch_model*.bin")):
        return {key: value for shard in shards for key, value in torch.load(shard, map_location="cpu", weights_only=True).items()}
    raise FileNotFoundError(f"{folder}: no model*.safetensors or pytorch_model*.bin")


def _download(repo_id: str, revision: str | None) -> Path:
    """config.json and the weights of a Hub checkpoint: safetensors when the revision has them,
    else the .bin files (facebook/detr-* revisions differ in which they carry)."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["config.json", "model*.safetensors*"]))
    if not any(folder.glob("model*.safetensors")):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["config.json", "pytorch_model*.bin*"]))
    return folder


def convert_checkpoint(
    checkpoint: str | Path,
    revision: str | None = None,
    num_heads: int | None = None,
    backbone_config: PreTrainedConfig | None = None,
    timm_backbone: bool = False,
) -> HfDetrForObjectDetection:
    """Published DETR weights -> an `HfDetrForObjectDetection` in eval mode, failing on any key that
    does not fit.

    checkpoint: an original facebookresearch/detr `.pth` file; a local transformers DETR folder
    (config.json + model.safetensors or pytorch_model.bin); or a Hub id such as
    "facebook/detr-resnet-50" (`revision`, e.g. "no_timm", picks the Hub revision).
    num_heads, backbone_config: `.pth` only, where the tensors do not tell them (see
    config_from_original_state_dict). The head count defaults to the checkpoint's saved `args.nheads`,
    else 8. DETR-DC5 weights have the same tensors as the plain models: a `.pth` without `args` cannot be
    told apart, so convert only non-DC5 ones. timm_backbone: a timm ResNet backbone (keeping the
    checkpoint's timm / torchvision names) instead of transformers' AutoBackbone ResNet.
    """
    path = Path(checkpoint)
    if path.suffix in (".pth", ".pt") and not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if path.is_file():
        state_dict, args = read_original_checkpoint(path)
        if getattr(args, "dilation", False):
            raise ValueError("DETR-DC5 (dilation=True) is not supported")
        num_heads = num_heads or getattr(args, "nheads", None) or 8
        config = config_from_original_state_dict(state_dict, num_heads, backbone_config, timm_backbone)
    else:
        folder = path if path.is_dir() else _download(str(checkpoint), revision)
        # The config class only reads the json: a timm backbone entry needs no timm (config_from_detr_config maps it).
        config = config_from_transformers_config(AutoConfig.from_pretrained(folder), timm_backbone)
        state_dict = read_transformers_weights(folder)
    config.converted_from = str(checkpoint)  # a model card's base_model, when a Hub id
    return load_converted(config, state_dict)


# `from_pretrained` of these families' checkpoints converts them on the fly (the model files know no converter)
HfDetrPreTrainedModel.checkpoint_converters.update(dict.fromkeys(CONFIG_CONVERTERS, convert_checkpoint))
