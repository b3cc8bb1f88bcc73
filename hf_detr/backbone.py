"""The convolutional backbone: transformers' AutoBackbone or a timm model, with DETR's frozen batch norm,
returning one feature map per stage it is asked for, and each map's padding mask.

This file is part of the model surface (saved next to config.json): it imports only torch, transformers and
its siblings.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoBackbone

from .configuration_hf_detr import HfDetrConfig


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
    """transformers' AutoBackbone (ResNet-50 last stage by default; the stages its `out_features` name), or a
    timm `features_only` model (`use_timm_backbone`, through transformers' TimmBackbone; its `out_indices`),
    with frozen batch norm.

    pixel_values [B, 3, H, W], pixel_mask [B, H, W] (1 = real pixel, 0 = padding)
    -> per stage, highest resolution first: (feature map [B, C_l, h_l, w_l], mask [B, h_l, w_l] bool, True = real).

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
            self.channels = list(self.model.feature_info.channels())
            return self._timm_early_parameters(config.freeze_backbone_stages).__contains__
        else:
            if config.use_pretrained_backbone:
                self.model = AutoBackbone.from_pretrained(config.backbone_checkpoint, out_features=config.backbone_config.out_features)
            else:
                self.model = AutoBackbone.from_config(config.backbone_config)
            if config.freeze_backbone_batch_norm:
                with torch.no_grad():
                    freeze_batch_norm(self.model)
            self.channels = list(self.model.channels)
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

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        features = self.model(pixel_values)
        feature_maps = features if self.timm else features.feature_maps
        return [(feature_map, downsample_mask(pixel_mask, feature_map)) for feature_map in feature_maps]


def downsample_mask(pixel_mask: torch.Tensor, feature_map: torch.Tensor) -> torch.Tensor:
    """pixel_mask [B, H, W] -> bool [B, h, w] at the feature map's size (nearest, as DETR does)."""
    return F.interpolate(pixel_mask[None].float(), size=feature_map.shape[-2:])[0].bool()


__all__ = ["HfDetrBackbone", "FrozenBatchNorm2d", "freeze_batch_norm", "downsample_mask"]
