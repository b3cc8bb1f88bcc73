"""HfDetrConfig: every knob of DETR on one screen, grouped by the stage that reads it.

The defaults are the paper's DETR-R50 (Carion et al., 2020): ResNet-50 last stage, 6 encoder + 6
decoder layers of width 256 with 8 heads and FFN 2048, 100 object queries, dropout 0.1, 91 COCO
class slots, auxiliary decoding losses on, matcher costs 1/5/2 and loss weights 1/5/2 with a
no-object weight of 0.1.

This file is part of the model surface: it is copied next to config.json on save, so it imports
only transformers and its own siblings.
"""

import dataclasses
from typing import Literal, get_args

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

logger = logging.get_logger(__name__)


# The variants, each the keys of the dict in the file that builds it (tested): queries.QUERY_BUILDERS,
# loss.CLASS_LOSSES, matching.MATCHERS, layers.ENCODER_ATTENTION, layers.CROSS_ATTENTION.
QueryType = Literal["detr", "conditional", "anchor", "deformable"]
ClassLoss = Literal["softmax", "focal", "iou_aware"]
MatcherType = Literal["hungarian"]
EncoderAttention = Literal["dense", "deformable"]
CrossAttention = Literal["dense", "spatial", "deformable"]
# each query type's own cross-attention, the paper's, when decoder_cross_attention is not given
QUERY_TYPE_CROSS_ATTENTION = {"detr": "dense", "conditional": "spatial", "anchor": "spatial", "deformable": "deformable"}
# A real-valued field also takes an int, stored as a float: transformers' own configs write 1 for 1.0
# (DetrConfig's `class_cost: int = 1`), and so do their config.json files.
Float = float | int
# The label fields a relabelling (`from_pretrained(..., id2label=...)`, `num_labels=K`) may change.
LABEL_FIELDS = ("num_labels", "id2label", "label2id", "category_ids")


@strict
class HfDetrConfig(PreTrainedConfig):
    model_type = "hf_detr"
    sub_configs_defaults = {
        # transformers' AutoBackbone config; DETR reads only the last stage of a ResNet-50.
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig, model_type="resnet", init_kwargs={"out_features": ["stage4"]}
        ),
    }
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "encoder_attention_heads",
        "num_hidden_layers": "encoder_layers",
    }

    # --- backbone -------------------------------------------------------------------------------
    backbone_config: dict | PreTrainedConfig | None = None  # AutoBackbone config (ResNet-50 by default)
    use_pretrained_backbone: bool = False  # load ImageNet weights when the model is built
    backbone_checkpoint: str = "microsoft/resnet-50"  # the AutoBackbone weights used when use_pretrained_backbone
    # timm instead (as transformers' DetrConfig spells it; needs timm): any `features_only` model, built
    # by transformers' TimmBackbone; pretrained weights are timm's own for that name
    use_timm_backbone: bool = False
    backbone: str | None = None  # the timm model, "resnet50" if None
    backbone_kwargs: dict | None = None  # timm.create_model keywords; out_indices default: the last stage
    train_backbone: bool = True  # False freezes the whole backbone
    freeze_backbone_stages: int = 1  # stem + this many leading stages stay frozen (DETR: 1, for ImageNet weights)
    freeze_backbone_batch_norm: bool = True  # DETR's frozen BN; a backbone trained from scratch needs live BN
    num_channels: int = 3  # input image channels

    # --- feature levels -------------------------------------------------------------------------
    # 1: DETR's one feature map (the backbone's last stage). More (Deformable DETR: 4): the backbone's last
    # min(levels, 3) stages when backbone_config is not given (else the stages it names), each projected to
    # d_model with a GroupNorm, then stride-2 3x3 convolutions for the levels beyond, and a learned level embedding
    num_feature_levels: int = 1
    position_embedding_offset: Float = 0.0  # sine positions count from 1 - offset: DETR 0, Deformable DETR 0.5

    # --- transformer ----------------------------------------------------------------------------
    # the attention kinds (layers.py): "dense" attends to every position (DETR); "deformable" samples
    # encoder_n_points / decoder_n_points points per head and level around each query's reference (Deformable
    # DETR); "spatial" is Conditional DETR's cross-attention. None: the query type's own (QUERY_TYPE_CROSS_ATTENTION)
    encoder_attention: EncoderAttention = "dense"
    decoder_cross_attention: CrossAttention | None = None
    encoder_n_points: int = 4
    decoder_n_points: int = 4
    d_model: int = 256  # hidden size of encoder, decoder and queries
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    activation_function: str = "relu"
    dropout: Float = 0.1  # on attention outputs, FFN outputs and encoder inputs
    attention_dropout: Float = 0.0  # on attention probabilities
    activation_dropout: Float = 0.0  # inside the FFN, after the activation
    normalize_before: bool = False  # pre-norm layers (DETR's --pre_norm); the paper's model is post-norm
    position_embedding_temperature: int = 10000  # sine position embedding of the feature map (DAB-DETR: 20)
    scale_encoder_positions: bool = False  # DAB-DETR's encoder: each layer scales the positions by an MLP of its input
    init_xavier_std: Float = 1.0  # gain of the xavier-uniform init of the attention and FFN weights
    # transformers' DETR / Conditional DETR with auxiliary losses: each decoder layer gets the previous
    # one's output through the shared norm (the original DETR norms what goes to the heads only)
    normalize_between_decoder_layers: bool = False
    decoder_final_norm: bool = True  # a LayerNorm on every decoder layer's output before the heads (DETR); Deformable DETR has none
    is_encoder_decoder: bool = True

    # --- queries --------------------------------------------------------------------------------
    num_queries: int = 100  # detection slots: the most objects one image can have (per group); two-stage: the proposals kept
    # "detr": zero content + learned positions; "conditional": + 2-D reference points and a spatial
    # cross-attention query (Conditional DETR); "anchor": learned 4-D anchor boxes refined layer by layer (DAB-DETR);
    # "deformable": learned content + learned positions + 2-D reference points (Deformable DETR)
    query_type: QueryType = "detr"
    with_box_refine: bool = False  # one class and box head per decoder layer, each refining the references (Deformable DETR)
    # the encoder scores and boxes every memory position; the top num_queries become the queries: all of them with
    # "deformable" (Deformable DETR's two-stage), the anchors with "anchor", their content learned (DINO's mixed query selection)
    two_stage: bool = False
    # two-stage: score and train the proposals class-agnostically ("an object", Deformable DETR) or by class (DINO);
    # None: the query type's own (deformable: agnostic; anchor: by class)
    two_stage_class_agnostic: bool | None = None
    num_query_groups: int = 1  # Group DETR: groups of num_queries in training, each matched one-to-one; group 0 at inference
    num_denoising_queries: int = 0  # DN-DETR ("anchor" only): up to this many noised ground-truth queries per image in training
    denoising_label_noise: Float = 0.2  # probability that a denoising query's class is replaced by a random one
    denoising_box_noise: Float = 0.4  # centre moved by up to this x size / 2, sides scaled by up to 1 +- this
    # DINO's contrastive denoising: each ground-truth box also gets a negative copy, noised between 1 and 2 x
    # denoising_box_noise, that learns "no object" (the positives, noised up to 1 x, reconstruct their box)
    denoising_contrastive: bool = False
    look_forward_twice: bool = False  # "anchor": boxes relative to the previous layer's un-detached refinement (DINO)

    # --- matcher (Hungarian matching; its class cost follows class_loss) --------------------------
    matcher_type: MatcherType = "hungarian"  # a key of matching.MATCHERS
    class_cost: Float = 1.0
    bbox_cost: Float = 5.0
    giou_cost: Float = 2.0

    # --- loss -----------------------------------------------------------------------------------
    # "softmax": cross-entropy over num_labels + 1 classes, the last "no object" (DETR); "focal": a
    # sigmoid focal loss per class (Deformable DETR); "iou_aware": sigmoid, a matched query's target is its IoU
    class_loss: ClassLoss = "softmax"
    auxiliary_loss: bool = True  # the same loss on every intermediate decoder layer
    ce_loss_coefficient: Float = 1.0
    bbox_loss_coefficient: Float = 5.0
    giou_loss_coefficient: Float = 2.0
    eos_coefficient: Float = 0.1  # "softmax": weight of the "no object" class in the cross-entropy
    focal_alpha: Float = 0.25  # "focal" loss, and the focal matching cost of "focal" and "iou_aware"
    focal_gamma: Float = 2.0  # likewise
    iou_aware_alpha: Float = 0.75  # "iou_aware": weight of the negatives, alpha * p^gamma

    # --- labels ---------------------------------------------------------------------------------
    # id2label / label2id come from PreTrainedConfig. category_ids[label] is the dataset's own id of
    # each contiguous label (COCO's sparse 1..90), so predictions can be written back in its ids.
    category_ids: list[int] | None = None
    # the checkpoint these weights were converted from (a Hub id or a path), set by hf_detr.convert
    converted_from: str | None = None

    def __post_init__(self, **kwargs):
        if self.id2label is None and kwargs.get("num_labels") is None:
            kwargs["num_labels"] = 91  # COCO's class slots, as in the paper
        for field in dataclasses.fields(self):
            if field.type == Float and type(getattr(self, field.name)) is int:
                setattr(self, field.name, float(getattr(self, field.name)))
        if self.decoder_cross_attention is None:
            self.decoder_cross_attention = QUERY_TYPE_CROSS_ATTENTION.get(self.query_type, "dense")
        if self.two_stage_class_agnostic is None:
            self.two_stage_class_agnostic = self.query_type == "deformable"
        if self.use_timm_backbone:
            self.backbone_config = self._timm_backbone_config()
        elif self.backbone_config is None:  # a ResNet-50's last stage, or its last three for several levels
            stages = [f"stage{i}" for i in range(5 - min(self.num_feature_levels, 3), 5)] if self.num_feature_levels > 1 else ["stage4"]
            self.backbone_config = {"model_type": "resnet", "out_features": stages, "num_channels": self.num_channels}
        super().__post_init__(**kwargs)
        self.check_values()

    def backbone_stages(self) -> int:
        """How many feature maps the backbone gives: the stages its config names."""
        config = self.backbone_config
        names = config.get("out_indices") or config.get("out_features") if isinstance(config, dict) else (
            getattr(config, "out_indices", None) or getattr(config, "out_features", None)
        )  # fmt: skip
        return len(names) if names else 1

    def _timm_backbone_config(self) -> dict | PreTrainedConfig:
        """transformers' TimmBackboneConfig of `backbone` (the last stage by default), or the given one."""
        given = self.backbone_config
        model_type = given.get("model_type") if isinstance(given, dict) else getattr(given, "model_type", None)
        if model_type == "timm_backbone":
            return given
        if given is not None:
            raise ValueError(f"HfDetrConfig.use_timm_backbone=True with a {model_type!r} backbone_config: give one or the other")
        kwargs = self.backbone_kwargs or {}
        # the last stage, or the last three (ResNet: strides 8, 16, 32) for several feature levels; counted from the end,
        # as timm's families have 4 (ConvNeXt) or 5 (ResNet, EfficientNet) feature stages
        stages = list(range(-min(self.num_feature_levels, 3), 0)) if self.num_feature_levels > 1 else [-1]
        return {
            "model_type": "timm_backbone", "backbone": self.backbone or "resnet50", "num_channels": self.num_channels,
            "features_only": True, "out_indices": list(kwargs.get("out_indices", stages)), "output_stride": kwargs.get("output_stride"),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A saved config, relabelled by `from_pretrained(..., id2label=..., label2id=...)` or `num_labels=K` (as
        when fine-tuning on other classes), is built from the saved values and the new labels together, so that
        they are checked together (a ValueError names the fields that disagree). The saved `category_ids` and
        `id2label` describe the saved labels: when the labels change they are dropped, with a warning, unless
        given again."""
        relabel = {field: kwargs.pop(field) for field in LABEL_FIELDS if field in kwargs}
        if relabel:
            config_dict = dict(config_dict)
            saved = {int(k): v for k, v in (config_dict.get("id2label") or {}).items()}
            if "id2label" in relabel:
                new = {int(k): v for k, v in relabel["id2label"].items()}
            elif "num_labels" in relabel and relabel["num_labels"] != len(saved):
                new = None  # transformers' LABEL_i names for the new count
                config_dict.pop("id2label", None)
                config_dict.pop("label2id", None)
            else:
                new = saved
            if new != saved and "category_ids" not in relabel and config_dict.get("category_ids") is not None:
                logger.warning(
                    f"HfDetrConfig: the saved category_ids {config_dict['category_ids']} belong to the saved labels "
                    f"{list(saved.values())}; dropped for the new labels (pass category_ids=[...] to set them)"
                )
                config_dict["category_ids"] = None
            config_dict.update(relabel)
        return super().from_dict(config_dict, **kwargs)

    def to_diff_dict(self) -> dict:
        # PreTrainedConfig leaves out an id2label equal to its own default (2 labels); loading such a
        # config.json would then give this config's default of 91, so the label maps are always written.
        diff = super().to_diff_dict()
        full = self.to_dict()
        for key in ("id2label", "label2id"):
            diff.setdefault(key, full[key])
        return diff

    def _check_levels_and_attention(self):
        """The feature levels, attention kinds and Deformable DETR's decoder options that work together."""
        for field in ("num_feature_levels", "encoder_n_points", "decoder_n_points"):
            if getattr(self, field) < 1:
                raise ValueError(f"HfDetrConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.backbone_stages() > self.num_feature_levels:
            raise ValueError(
                f"HfDetrConfig.num_feature_levels ({self.num_feature_levels}) must be at least the number of backbone "
                f"stages its backbone_config gives ({self.backbone_stages()})"
            )
        if not 0.0 <= self.position_embedding_offset < 1.0:
            raise ValueError(f"HfDetrConfig.position_embedding_offset must be in [0, 1), got {self.position_embedding_offset}")
        levels = self.num_feature_levels > 1 or "deformable" in (self.encoder_attention, self.decoder_cross_attention)
        if levels and self.d_model % 32:
            raise ValueError(
                f"HfDetrConfig.d_model ({self.d_model}) must be a multiple of 32 for the GroupNorm(32) of several feature "
                f"levels or deformable attention"
            )
        needs = {"spatial": ("conditional", "anchor"), "deformable": ("conditional", "anchor", "deformable")}
        if self.decoder_cross_attention in needs and self.query_type not in needs[self.decoder_cross_attention]:
            what = "spatial queries" if self.decoder_cross_attention == "spatial" else "reference points"
            raise ValueError(
                f"HfDetrConfig.decoder_cross_attention={self.decoder_cross_attention!r} needs {what}: query_type one of "
                f"{needs[self.decoder_cross_attention]}, got query_type={self.query_type!r}"
            )
        if self.with_box_refine and self.query_type not in ("anchor", "deformable"):
            raise ValueError(
                f"HfDetrConfig.with_box_refine needs queries whose references are refined: query_type 'anchor' or "
                f"'deformable', got {self.query_type!r}"
            )
        if self.two_stage:
            refined = self.query_type == "anchor" or (self.query_type == "deformable" and self.with_box_refine)
            if not refined:
                raise ValueError(
                    f"HfDetrConfig.two_stage needs queries whose references are refined boxes: query_type='anchor' (DINO's "
                    f"mixed query selection) or 'deformable' with with_box_refine=True (Deformable DETR's two-stage), got "
                    f"query_type={self.query_type!r}, with_box_refine={self.with_box_refine}"
                )
            if self.num_query_groups != 1:
                raise ValueError(f"HfDetrConfig.two_stage takes one query group, got num_query_groups={self.num_query_groups}")
        backbone_channels = getattr(self.backbone_config, "num_channels", self.num_channels)
        if not self.use_timm_backbone and backbone_channels != self.num_channels:
            raise ValueError(
                f"HfDetrConfig.num_channels ({self.num_channels}) differs from its backbone_config.num_channels ({backbone_channels})"
            )

    def check_values(self):
        """Reject values the model cannot be built with, naming the field (a plain ValueError:
        `@strict`'s own `validate_*` hooks would wrap it in a StrictDataclassError)."""
        for field in dataclasses.fields(self):  # NaN passes every range check below (each comparison is False)
            value = getattr(self, field.name)
            if field.type == Float and not abs(value) < float("inf"):
                raise ValueError(f"HfDetrConfig.{field.name} must be a finite number, got {value}")
        if self.id2label is not None and sorted(self.id2label) != list(range(len(self.id2label))):
            raise ValueError(
                f"HfDetrConfig.id2label must name the labels 0..{len(self.id2label) - 1} (one per class, no gaps), "
                f"got the labels {sorted(self.id2label)}"
            )
        for field, choices in (("query_type", QueryType), ("class_loss", ClassLoss), ("matcher_type", MatcherType)):
            if getattr(self, field) not in get_args(choices):
                raise ValueError(f"HfDetrConfig.{field} must be one of {get_args(choices)}, got {getattr(self, field)!r}")
        if self.num_query_groups < 1:
            raise ValueError(f"HfDetrConfig.num_query_groups must be >= 1, got {self.num_query_groups}")
        if self.num_denoising_queries < 0:
            raise ValueError(f"HfDetrConfig.num_denoising_queries must be >= 0, got {self.num_denoising_queries}")
        # Denoising queries are noised ground-truth boxes fed in as anchors; refinement needs anchors too.
        if self.denoising_contrastive and not self.num_denoising_queries:
            raise ValueError("HfDetrConfig.denoising_contrastive needs denoising queries: num_denoising_queries > 0")
        if self.num_denoising_queries and self.query_type != "anchor":
            raise ValueError(
                f"HfDetrConfig.num_denoising_queries needs query_type='anchor' (denoising queries are noised boxes "
                f"given as anchor boxes), got query_type={self.query_type!r}"
            )
        self._check_levels_and_attention()
        if self.look_forward_twice and self.query_type != "anchor":
            raise ValueError(
                f"HfDetrConfig.look_forward_twice needs query_type='anchor' (the only queries whose boxes are "
                f"refined layer by layer), got query_type={self.query_type!r}"
            )
        for field in ("denoising_label_noise", "focal_alpha", "iou_aware_alpha"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise ValueError(f"HfDetrConfig.{field} must be in [0, 1], got {getattr(self, field)}")
        for field in ("denoising_box_noise", "focal_gamma"):
            if getattr(self, field) < 0:
                raise ValueError(f"HfDetrConfig.{field} must be >= 0, got {getattr(self, field)}")
        for field in (
            "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
            "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "num_queries", "num_channels",
        ):  # fmt: skip
            if getattr(self, field) <= 0:
                raise ValueError(f"HfDetrConfig.{field} must be positive, got {getattr(self, field)}")
        if not self.use_timm_backbone and (self.backbone is not None or self.backbone_kwargs):
            raise ValueError("HfDetrConfig.backbone and backbone_kwargs name a timm model: they need use_timm_backbone=True")
        if self.freeze_backbone_stages < 0:
            raise ValueError(f"HfDetrConfig.freeze_backbone_stages must be >= 0, got {self.freeze_backbone_stages}")
        for field in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, field):
                raise ValueError(
                    f"HfDetrConfig.d_model ({self.d_model}) must be divisible by {field} ({getattr(self, field)})"
                )
        if self.d_model % 2:
            raise ValueError(f"HfDetrConfig.d_model must be even for the 2D sine position embedding, got {self.d_model}")
        for field in ("class_cost", "bbox_cost", "giou_cost"):
            if getattr(self, field) < 0:
                raise ValueError(f"HfDetrConfig.{field} must be >= 0, got {getattr(self, field)}")
        if self.class_cost == self.bbox_cost == self.giou_cost == 0:
            raise ValueError("HfDetrConfig: class_cost, bbox_cost and giou_cost cannot all be 0")
        for field in ("ce_loss_coefficient", "bbox_loss_coefficient", "giou_loss_coefficient", "eos_coefficient"):
            if getattr(self, field) < 0:
                raise ValueError(f"HfDetrConfig.{field} must be >= 0, got {getattr(self, field)}")
        for field in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"HfDetrConfig.{field} must be in [0, 1), got {getattr(self, field)}")
        if self.num_labels is not None and self.num_labels <= 0:
            raise ValueError(f"HfDetrConfig.num_labels must be positive, got {self.num_labels}")
        if self.category_ids is not None and len(self.category_ids) != self.num_labels:
            raise ValueError(
                f"HfDetrConfig.category_ids has {len(self.category_ids)} entries but num_labels is {self.num_labels}"
            )


__all__ = ["HfDetrConfig", "QueryType", "ClassLoss", "MatcherType"]

# Saving a config also copies this file and writes its `auto_map` entry (remote code loading).
HfDetrConfig.register_for_auto_class()
