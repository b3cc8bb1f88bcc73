"""timm backbones (use_timm_backbone, as transformers' DetrConfig spells it), and DETR checkpoints in
timm's ResNet layout loaded into either backbone kind.

timm needs torchvision, which the CPU torch wheel of the default environment lacks; `make test` runs
this file in its second environment (torch + torchvision + timm), where nothing here is skipped."""

import pytest
import torch
from safetensors.torch import load_file, save_file

timm = pytest.importorskip("timm", reason="timm is installed in `make test`'s second environment (see Makefile)")

import hf_detr  # noqa: E402
from conftest import TINY_SIZES, random_labels, tiny_backbone_config  # noqa: E402
from hf_detr.convert import convert_checkpoint  # noqa: E402
from test_convert import (  # noqa: E402
    assert_same_outputs,
    original_detr_state_dict,
    perturbed_detr,
    timm_hub_layout,
    tiny_detr_config,
)

# tiny timm models of three families: a ResNet (BatchNorm2d), a ConvNeXt (LayerNorm), an EfficientNet (BatchNormAct2d)
BACKBONES = {
    "resnet": ("resnet50", {"layers": [1, 1, 1, 1], "channels": [4, 8, 8, 16]}),
    "convnext": ("test_convnext", None),
    "efficientnet": ("test_efficientnet", None),
}


def timm_config(kind, **overrides):
    name, kwargs = BACKBONES[kind]
    return hf_detr.HfDetrConfig(use_timm_backbone=True, backbone=name, backbone_kwargs=kwargs, **TINY_SIZES, dropout=0.0, **overrides)


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_timm_backbone_trains_with_frozen_batch_norm_and_early_stages(kind, inputs, tmp_path):
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(timm_config(kind))
    backbone = model.model.backbone.model
    assert backbone.__class__.__module__.startswith("timm.")
    assert not any(type(m) in (torch.nn.BatchNorm2d,) or type(m).__name__ == "BatchNormAct2d" for m in backbone.modules())
    frozen = [name for name, p in backbone.named_parameters() if not p.requires_grad]
    trained = [name for name, p in backbone.named_parameters() if p.requires_grad]
    # the stem and first stage stay as they are (DETR); the rest trains
    first = {"resnet": "layer1.", "convnext": "stages_0.", "efficientnet": "blocks.1."}[kind]
    assert frozen and trained and any(name.startswith(first) for name in frozen)
    assert not any(name.startswith(first) for name in trained)

    model.train()
    out = model(**inputs, labels=random_labels([2, 1], 5, torch.Generator().manual_seed(1)))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(dict(backbone.named_parameters())[name].grad is not None for name in trained[-3:])

    model.eval().save_pretrained(tmp_path)
    loaded = hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path).eval()
    assert loaded.config.use_timm_backbone and loaded.config.backbone == BACKBONES[kind][0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_timm_backbone_fields_need_use_timm_backbone():
    with pytest.raises(ValueError, match="use_timm_backbone"):
        hf_detr.HfDetrConfig(backbone="resnet50")
    config = hf_detr.HfDetrConfig(use_timm_backbone=True)  # DETR-R50 with timm's resnet50
    assert config.backbone_config.model_type == "timm_backbone" and config.backbone_config.backbone == "resnet50"


def test_timm_layout_checkpoint_loads_into_both_backbone_kinds(tmp_path, inputs):
    """facebook/detr-resnet-50's layout (timm's ResNet names under model.backbone.conv_encoder.model):
    the same converted weights in transformers' ResNet and in timm's give the reference's outputs."""
    # timm's ResNet stem has 64 channels: the tiny ResNet-50 layout with such a stem
    backbone = tiny_backbone_config(depths=[3, 4, 6, 3], hidden_sizes=[16, 32, 32, 64], embedding_size=64)
    reference = perturbed_detr(tiny_detr_config(backbone_config=backbone, encoder_layers=6, decoder_layers=6))
    reference.save_pretrained(tmp_path)
    save_file(timm_hub_layout(load_file(tmp_path / "model.safetensors")), tmp_path / "model.safetensors")
    autobackbone = convert_checkpoint(tmp_path)
    with_timm = convert_checkpoint(tmp_path, timm_backbone=True)
    assert not autobackbone.config.use_timm_backbone and with_timm.config.use_timm_backbone
    assert "model.backbone.model.layer1.0.conv1.weight" in with_timm.state_dict()
    assert_same_outputs(reference, autobackbone, inputs, "timm layout -> transformers ResNet")
    assert_same_outputs(reference, with_timm, inputs, "timm layout -> timm ResNet")


def test_original_detr_pth_into_a_timm_backbone(tmp_path, inputs):
    backbone = tiny_backbone_config(embedding_size=64)
    reference = perturbed_detr(tiny_detr_config(backbone_config=backbone))
    torch.save({"model": original_detr_state_dict(reference)}, tmp_path / "x.pth")
    converted = convert_checkpoint(tmp_path / "x.pth", num_heads=4, backbone_config=backbone, timm_backbone=True)
    assert converted.config.use_timm_backbone
    assert_same_outputs(reference, converted, inputs, "original .pth -> timm ResNet")


def test_transformers_detr_with_a_timm_backbone_converts_with_either(inputs):
    """A live transformers DETR whose backbone is timm's (use_timm_backbone=True, as the published configs say)."""
    from transformers import DetrConfig

    config = DetrConfig(use_timm_backbone=True, backbone="resnet18", use_pretrained_backbone=False, **TINY_SIZES, auxiliary_loss=False)
    reference = perturbed_detr(config)
    assert_same_outputs(reference, hf_detr.convert_transformers_detr(reference, timm_backbone=True), inputs, "transformers timm DETR -> timm")
    with pytest.raises(ValueError, match="ResNet-18"):  # transformers' ResNet layout is known for DETR's ResNet-50 / -101
        hf_detr.convert_transformers_detr(reference)


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_timm_backbone_gives_its_last_stages_as_feature_levels(kind, inputs):
    """num_feature_levels with a timm backbone: its last three stages (whatever the family's stage count) and a
    stride-2 level beyond, projected to d_model; a Deformable DETR on them trains."""
    torch.manual_seed(0)
    config = timm_config(kind, num_feature_levels=4, encoder_attention="deformable", query_type="deformable", class_loss="focal")
    model = hf_detr.HfDetrForObjectDetection(config)
    channels = model.model.backbone.model.feature_info.channels()
    assert config.backbone_config.out_indices == [-3, -2, -1] and len(channels) == 3, channels
    projections = model.model.feature_levels.projections
    assert [p[0].in_channels for p in projections] == [*channels, channels[-1]]
    out = model.train()(**inputs, labels=random_labels([2, 1], 5, torch.Generator().manual_seed(1)))
    assert torch.isfinite(out.loss) and out.encoder_last_hidden_state.shape[1] > out.logits.shape[1]
    out.loss.backward()
    assert all(p[0].weight.grad is not None for p in projections)
