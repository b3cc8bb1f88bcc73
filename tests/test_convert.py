"""Conversion of published DETR weights (hf_detr/convert.py, scripts/convert_detr_checkpoint.py).

Every key layout `convert_checkpoint` reads is produced here from a tiny transformers
`DetrForObjectDetection` whose weights (layer norms and frozen batch norm statistics included) are
moved away from their init, then converted and compared with that live model: eval outputs, train
losses and gradients, a `save_pretrained` folder, the timm-named layout of `facebook/detr-resnet-50`,
an original facebookresearch/detr `.pth`, a Hub download, and the conversion script end to end.
"""

import argparse
import json
import logging
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor,
    ConditionalDetrConfig,
    ConditionalDetrForObjectDetection,
    DabDetrConfig,
    DabDetrForObjectDetection,
    DeformableDetrForObjectDetection,
    DetrConfig,
    DetrForObjectDetection,
    RTDetrConfig,
)
from transformers.utils import logging as transformers_logging

import hf_detr
import hf_detr.kernels as kernels
from conftest import TINY_SIZES, random_labels, tiny_backbone_config
from hf_detr.convert import (
    COCO_CATEGORIES,
    config_from_detr_config,
    config_from_transformers_config,
    convert_checkpoint,
    convert_state_dict,
)

REPO = Path(__file__).resolve().parents[1]


# transformers' DETRs hf_detr converts, by model_type: config class, model class, hf_detr query type
TRANSFORMERS_DETRS = {
    "detr": (DetrConfig, DetrForObjectDetection, "detr"),
    "conditional_detr": (ConditionalDetrConfig, ConditionalDetrForObjectDetection, "conditional"),
    "dab-detr": (DabDetrConfig, DabDetrForObjectDetection, "anchor"),
}


# every transformers detection model these tests build, by model_type (Deformable DETR's: test_convert_deformable.py)
MODEL_CLASSES = {**{kind: classes[1] for kind, classes in TRANSFORMERS_DETRS.items()}, "deformable_detr": DeformableDetrForObjectDetection}


def tiny_transformers_config(kind: str = "detr", **overrides):
    sizes = dict(TINY_SIZES)
    if kind == "dab-detr":
        sizes["hidden_size"] = sizes.pop("d_model")
    kwargs = dict(
        backbone_config=tiny_backbone_config(),
        use_timm_backbone=False,
        **sizes,
        auxiliary_loss=False,  # as in the published configs
    )
    kwargs.update(overrides)
    return TRANSFORMERS_DETRS[kind][0](**kwargs)


def tiny_detr_config(**overrides) -> DetrConfig:
    return tiny_transformers_config("detr", **overrides)


def perturbed_detr(config, seed: int = 0, keep=None):
    """A transformers DETR (of the config's model type) with every float tensor moved off its init, so
    that a misplaced or mis-renamed tensor shows in the outputs: norm scales around 1, positive running
    variances, noise on everything else. Tensors whose name matches the regex `keep` stay as initialised."""
    torch.manual_seed(seed)
    model = MODEL_CLASSES[config.model_type](config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or (keep and re.search(keep, name)):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif tensor.ndim == 1 and name.endswith("weight"):  # layer norm and batch norm scales
                tensor.copy_(1 + 0.2 * noise)
            else:
                tensor.add_(0.1 * noise)
    return model


@pytest.fixture
def inputs():
    torch.manual_seed(2)
    pixel_values = torch.randn(2, 3, 96, 128)
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.long)
    pixel_mask[1, 64:] = 0  # second image padded at the bottom and on the right
    pixel_mask[1, :, 96:] = 0
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}


def max_output_diffs(reference, converted, inputs) -> tuple[float, float]:
    """max |logits diff|, max |pred_boxes diff| of two models in eval mode on the same inputs."""
    reference.eval(), converted.eval()
    with torch.no_grad():
        expected, actual = reference(**inputs), converted(**inputs)
    assert actual.logits.shape == expected.logits.shape and actual.pred_boxes.shape == expected.pred_boxes.shape
    logits_diff = (actual.logits - expected.logits).abs().max().item()
    return logits_diff, (actual.pred_boxes - expected.pred_boxes).abs().max().item()


def assert_same_outputs(reference, converted, inputs, what):
    logits_diff, boxes_diff = max_output_diffs(reference, converted, inputs)
    print(f"\n[{what}] max |logits diff| {logits_diff:.2e}, max |pred_boxes diff| {boxes_diff:.2e}")
    assert logits_diff <= 1e-4 and boxes_diff <= 1e-5, (logits_diff, boxes_diff)


# ------------------------------------------------------------------------------------ live model parity


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS_DETRS))
def test_eval_parity_with_transformers(inputs, kind):
    reference = perturbed_detr(tiny_transformers_config(kind))
    converted = hf_detr.convert_transformers_detr(reference)
    assert isinstance(converted, hf_detr.HfDetrForObjectDetection) and not converted.training
    assert converted.config.query_type == TRANSFORMERS_DETRS[kind][2]
    assert converted.config.class_loss == ("softmax" if kind == "detr" else "focal")
    assert_same_outputs(reference, converted, inputs, f"eval parity, {kind}")


# With auxiliary_loss=True transformers' DETR and Conditional DETR decoders feed the *normed* output of
# each layer to the next one (and norm the last twice); the original DETR and Conditional DETR, which
# hf_detr follows by default, norm only what goes to the heads. The converter sets
# `normalize_between_decoder_layers` from the source config, so both modes match transformers.


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS_DETRS))
def test_train_parity_with_transformers(inputs, kind):
    reference = perturbed_detr(tiny_transformers_config(kind, auxiliary_loss=True, dropout=0.0)).train()
    converted = hf_detr.convert_transformers_detr(reference).train()
    assert converted.config.auxiliary_loss and converted.config.dropout == 0.0
    assert converted.config.normalize_between_decoder_layers == (kind != "dab-detr")
    labels = random_labels([3, 0], num_labels=5, generator=torch.Generator().manual_seed(3))  # image 1: no objects

    expected = reference(**inputs, labels=[{k: v.clone() for k, v in t.items()} for t in labels])
    actual = converted(**inputs, labels=labels)
    expected.loss.backward()
    actual.loss.backward()

    loss_diff = abs(actual.loss.item() - expected.loss.item()) / abs(expected.loss.item())
    shared = sorted(set(expected.loss_dict) & set(actual.loss_dict))
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_1", "cardinality_error"} <= set(shared)
    term_diffs = {
        k: abs(actual.loss_dict[k].item() - expected.loss_dict[k].item()) / max(abs(expected.loss_dict[k].item()), 1e-8)
        for k in shared
    }
    head = reference.class_embed if kind == "dab-detr" else reference.class_labels_classifier
    grad_expected, grad_actual = head.weight.grad, converted.model.heads.class_heads[0].weight.grad
    grad_diff = ((grad_actual - grad_expected).norm() / grad_expected.norm()).item()
    print(
        f"\n[train parity, {kind}] loss {expected.loss.item():.6f}, relative diff {loss_diff:.2e}; "
        f"max relative loss_dict diff {max(term_diffs.values()):.2e} over {len(shared)} keys; "
        f"class head gradient relative diff {grad_diff:.2e}"
    )
    assert loss_diff <= 1e-4
    assert all(diff <= 1e-4 for diff in term_diffs.values()), term_diffs
    assert grad_diff <= 1e-3
    # Every transformer parameter's gradient, by converted name, in float64 where transformers' model runs
    # in it: in float32 the smallest gradients (the last decoder layer's self-attention, norms ~5e-5)
    # differ by up to ~4e-3 relative through rounding alone. transformers' DETR loss and its DAB-DETR keep
    # float32 tensors inside, so those two are compared in float32: each parameter to 1e-2, all of them
    # together (one vector) to 1e-5.
    dtype, tolerance = (torch.float64, 1e-6) if kind == "conditional_detr" else (torch.float32, 1e-2)
    reference, converted = reference.to(dtype), converted.to(dtype)
    reference.zero_grad(), converted.zero_grad()
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    labels = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()} for t in labels]
    reference(**cast, labels=[{k: v.clone() for k, v in t.items()} for t in labels]).loss.backward()
    converted(**cast, labels=labels).loss.backward()
    ours, diffs, pairs = dict(converted.named_parameters()), {}, []
    for name, parameter in reference.named_parameters():
        # the backbone's trainable stages differ by design (docs/design.md, "Backbones"); a gradient that
        # is zero in exact arithmetic (e.g. self-attention key biases) is only rounding on both sides
        if "backbone" in name or name.startswith("model.decoder.bbox_embed.") or parameter.grad is None:
            continue
        if parameter.grad.norm() < (1e-5 if dtype == torch.float32 else 1e-12):
            continue
        (converted_name,) = convert_state_dict({name: parameter})
        diffs[name] = ((ours[converted_name].grad - parameter.grad).norm() / parameter.grad.norm()).item()
        pairs.append((ours[converted_name].grad.flatten(), parameter.grad.flatten()))
    mine, theirs = (torch.cat(side) for side in zip(*pairs))
    overall = ((mine - theirs).norm() / theirs.norm()).item()
    print(
        f"[train parity, {kind}] {len(diffs)} parameters in {dtype}: max gradient relative diff "
        f"{max(diffs.values()):.2e}, all together {overall:.2e}"
    )
    assert len(diffs) > 50 and max(diffs.values()) <= tolerance, max(diffs.items(), key=lambda kv: kv[1])
    assert overall <= min(tolerance, 1e-5)


@pytest.mark.parametrize("kind", ["conditional_detr", "dab-detr"])
def test_saved_variant_folders_convert(tmp_path, inputs, kind):
    reference = perturbed_detr(tiny_transformers_config(kind))
    reference.save_pretrained(tmp_path)
    converted = convert_checkpoint(tmp_path)
    assert converted.config.query_type == TRANSFORMERS_DETRS[kind][2]
    assert_same_outputs(reference, converted, inputs, f"{kind} folder")


def test_dab_detr_options_hf_detr_lacks_are_refused():
    for option in (dict(num_patterns=3), dict(keep_query_pos=True), dict(temperature_height=10)):
        with pytest.raises(ValueError, match=next(iter(option)).split("_")[0]):
            hf_detr.convert_transformers_detr(DabDetrForObjectDetection(tiny_transformers_config("dab-detr", **option)))
    with pytest.raises(ValueError, match="cannot convert a 'rt_detr' model"):
        config_from_transformers_config(RTDetrConfig())


def ops_run(model, inputs, op: str) -> int:
    with torch.no_grad(), torch.profiler.profile() as profile:
        model(**inputs)
    return sum(event.count for event in profile.key_averages() if event.key == op)


@pytest.mark.skipif(not kernels.ONEDNN_PRODUCTS, reason="the oneDNN product path needs an x86 CPU with AVX2 or AVX-512")
@pytest.mark.parametrize("kind", sorted(TRANSFORMERS_DETRS))
def test_parity_holds_with_every_linear_on_the_onednn_path(inputs, monkeypatch, kind):
    # The tiny test models' products are below the size at which hf_detr's Linear leaves sgemm for
    # oneDNN; lower that size to 0 and run both parity tests again.
    model = hf_detr.convert_transformers_detr(perturbed_detr(tiny_transformers_config(kind))).eval()
    products, convolutions = ops_run(model, inputs, "aten::linear"), ops_run(model, inputs, "aten::convolution")
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)
    assert ops_run(model, inputs, "aten::linear") == 0  # every product ran as a convolution instead
    assert ops_run(model, inputs, "aten::convolution") == convolutions + products
    test_eval_parity_with_transformers(inputs, kind)
    test_train_parity_with_transformers(inputs, kind)


# --------------------------------------------------------------------------------- checkpoint layouts


def test_transformers_folder(tmp_path, inputs):
    reference = perturbed_detr(tiny_detr_config())
    reference.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    # transformers v5 saves the v4 layout that the Hub checkpoints have, not its live names
    assert any(k.startswith("model.backbone.conv_encoder.model.") for k in saved)
    assert any(".out_proj." in k for k in saved) and not any(".o_proj." in k for k in saved)
    assert_same_outputs(reference, convert_checkpoint(tmp_path), inputs, "transformers folder")


def test_hub_id_downloads_config_and_weights(tmp_path, inputs, monkeypatch):
    """A Hub id goes through huggingface_hub.snapshot_download with the revision; a revision without
    safetensors (only pytorch_model.bin) is read too."""
    reference = perturbed_detr(tiny_detr_config())
    reference.save_pretrained(tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    converted = convert_checkpoint("facebook/detr-resnet-50", revision="no_timm")
    assert {(repo, revision) for repo, revision, _ in calls} == {("facebook/detr-resnet-50", "no_timm")}
    assert all("config.json" in patterns for _, _, patterns in calls)
    assert_same_outputs(reference, converted, inputs, "hub id, pytorch_model.bin")


# torchvision's (and timm's) ResNet names: the layout of facebook/detr-resnet-50's backbone (transformers
# v4 wrapped a timm resnet50) and of the original DETR's `backbone.0.body`.
AUTOBACKBONE_TO_TORCHVISION = [
    (r"^embedder\.embedder\.convolution\.", "conv1."),
    (r"^embedder\.embedder\.normalization\.", "bn1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.convolution\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.normalization\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
]


def torchvision_resnet_name(autobackbone_name: str) -> str:
    for pattern, replacement in AUTOBACKBONE_TO_TORCHVISION:
        name, found = re.subn(pattern, replacement, autobackbone_name)
        if found:
            return name
    raise AssertionError(f"not a ResNet key: {autobackbone_name}")


def timm_hub_layout(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers save_pretrained state dict (v4 layout, AutoBackbone ResNet) -> the layout of
    facebook/detr-resnet-50's main revision: the same keys with the backbone in timm names."""
    prefix = "model.backbone.conv_encoder.model."
    layout = {}
    for key, value in saved.items():
        layout[prefix + torchvision_resnet_name(key[len(prefix):]) if key.startswith(prefix) else key] = value
    for stage in range(1, 5):
        # facebook/detr-resnet-50 also carries these 4 counters (transformers' loading report lists them
        # as unused: model.backbone.conv_encoder.model.layer{1..4}.0.downsample.1.num_batches_tracked)
        layout[f"{prefix}layer{stage}.0.downsample.1.num_batches_tracked"] = torch.tensor(0)
    return layout


# Real key names of facebook/detr-resnet-50 (main revision): transformers' conversion script
# convert_detr_original_pytorch_checkpoint_to_pytorch.py renamed the original DETR keys to these
# (`backbone.0.body` -> `model.backbone.conv_encoder.model`, out_proj, fc1/fc2, self_attn_layer_norm,
# encoder_attn(_layer_norm), final_layer_norm, query_position_embeddings, decoder.layernorm,
# class_labels_classifier, bbox_predictor.layers.N), the backbone keeping torchvision/timm names.
PUBLISHED_KEYS_EXCERPT = [
    "model.backbone.conv_encoder.model.conv1.weight",
    "model.backbone.conv_encoder.model.bn1.weight",
    "model.backbone.conv_encoder.model.bn1.running_mean",
    "model.backbone.conv_encoder.model.layer1.0.conv1.weight",
    "model.backbone.conv_encoder.model.layer1.0.bn3.running_var",
    "model.backbone.conv_encoder.model.layer1.0.downsample.0.weight",
    "model.backbone.conv_encoder.model.layer1.0.downsample.1.running_var",
    "model.backbone.conv_encoder.model.layer1.0.downsample.1.num_batches_tracked",
    "model.backbone.conv_encoder.model.layer3.5.conv2.weight",
    "model.backbone.conv_encoder.model.layer4.2.bn3.bias",
    "model.input_projection.weight",
    "model.query_position_embeddings.weight",
    "model.encoder.layers.0.self_attn.q_proj.weight",
    "model.encoder.layers.0.self_attn.out_proj.weight",
    "model.encoder.layers.0.self_attn_layer_norm.bias",
    "model.encoder.layers.0.fc1.weight",
    "model.encoder.layers.5.final_layer_norm.bias",
    "model.decoder.layers.0.encoder_attn.out_proj.bias",
    "model.decoder.layers.0.encoder_attn_layer_norm.weight",
    "model.decoder.layers.5.fc2.bias",
    "model.decoder.layernorm.weight",
    "class_labels_classifier.weight",
    "bbox_predictor.layers.2.bias",
]


def torchvision_resnet50_keys() -> set[str]:
    """Every state dict key of torchvision's resnet50 with DETR's FrozenBatchNorm2d (fc dropped),
    enumerated from its structure: blocks [3, 4, 6, 3], conv1-3/bn1-3 per block, downsample in block 0."""
    norm = ("weight", "bias", "running_mean", "running_var")
    keys = {"conv1.weight"} | {f"bn1.{n}" for n in norm}
    for stage, blocks in enumerate([3, 4, 6, 3], start=1):
        for block in range(blocks):
            block_prefix = f"layer{stage}.{block}."
            keys |= {f"{block_prefix}conv{i}.weight" for i in (1, 2, 3)}
            keys |= {f"{block_prefix}bn{i}.{n}" for i in (1, 2, 3) for n in norm}
            if block == 0:
                keys |= {f"{block_prefix}downsample.0.weight"}
                keys |= {f"{block_prefix}downsample.1.{n}" for n in norm + ("num_batches_tracked",)}
    return keys


# The published architecture's layout at tiny widths: ResNet-50's block counts, 6 + 6 layers.
def r50_layout_detr_config() -> DetrConfig:
    backbone = tiny_backbone_config(depths=[3, 4, 6, 3], hidden_sizes=[16, 32, 32, 64])  # layer1.0 has a downsample as in R50
    return tiny_detr_config(backbone_config=backbone, encoder_layers=6, decoder_layers=6)


def test_timm_layout_of_facebook_detr_resnet_50(tmp_path, inputs):
    reference = perturbed_detr(r50_layout_detr_config())
    reference.save_pretrained(tmp_path)
    layout = timm_hub_layout(load_file(tmp_path / "model.safetensors"))

    # the layout built here is the published one: its excerpt, and a backbone exactly torchvision's resnet50
    assert set(PUBLISHED_KEYS_EXCERPT) <= set(layout), sorted(set(PUBLISHED_KEYS_EXCERPT) - set(layout))
    prefix = "model.backbone.conv_encoder.model."
    assert {k[len(prefix):] for k in layout if k.startswith(prefix)} == torchvision_resnet50_keys()
    assert not any(re.search(r"\.o_proj\.|\.mlp\.|embedder|stages", k) for k in layout)

    save_file(layout, tmp_path / "model.safetensors")  # same folder, same tiny config.json, timm-named keys
    assert_same_outputs(reference, convert_checkpoint(tmp_path), inputs, "timm layout")


def test_published_config_reads_without_timm_and_fits_the_published_keys(tmp_path):
    """facebook/detr-resnet-50's config.json (transformers v4, a timm backbone named by string) is read
    by DetrConfig without timm and mapped to a ResNet-50 HfDetrConfig whose state dict is exactly the
    published keys, converted: no key left over or missing at full size."""
    published_config = {
        "model_type": "detr", "architectures": ["DetrForObjectDetection"], "transformers_version": "4.26.0.dev0",
        "backbone": "resnet50", "use_timm_backbone": True, "use_pretrained_backbone": True, "dilation": False,
        "num_channels": 3, "d_model": 256, "encoder_layers": 6, "decoder_layers": 6, "num_queries": 100,
        "position_embedding_type": "sine", "auxiliary_loss": False, "max_position_embeddings": 1024,
        "scale_embedding": False, "id2label": {str(i): name for i, name in COCO_CATEGORIES.items()},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(published_config))
    detr_config = DetrConfig.from_pretrained(tmp_path)
    assert detr_config.backbone_config.model_type == "timm_backbone"
    config = config_from_detr_config(detr_config)
    assert config.backbone_config.model_type == "resnet" and config.backbone_config.depths == [3, 4, 6, 3]
    assert config.backbone_config.hidden_sizes == [256, 512, 1024, 2048] and not config.use_pretrained_backbone
    assert config.num_labels == 91 and config.id2label[1] == "person" and config.id2label[90] == "toothbrush"

    # the published key names: the tiny model with the published layout, saved and renamed as above
    DetrForObjectDetection(r50_layout_detr_config()).save_pretrained(tmp_path / "layout")
    layout = timm_hub_layout(load_file(tmp_path / "layout" / "model.safetensors"))
    assert set(PUBLISHED_KEYS_EXCERPT) <= set(layout)
    with torch.device("meta"):
        full_model = hf_detr.HfDetrForObjectDetection(config)
    assert set(convert_state_dict(layout)) == set(full_model.state_dict())

    with pytest.raises(ValueError, match="DC5"):
        config_from_detr_config(DetrConfig(use_timm_backbone=True, backbone="resnet50", dilation=True))


# ---------------------------------------------------------------------------- original DETR checkpoints


def original_detr_state_dict(model: DetrForObjectDetection) -> dict[str, torch.Tensor]:
    """A transformers DETR's live tensors in facebookresearch/detr's key layout:
    - models/backbone.py: Joiner(backbone, position_embedding) -> `backbone.0`; BackboneBase.body =
      IntermediateLayerGetter(torchvision resnet, FrozenBatchNorm2d) -> `backbone.0.body.conv1.weight`,
      `backbone.0.body.layer1.0.bn1.running_mean`, ...
    - models/detr.py: DETR.class_embed (Linear), bbox_embed = MLP(...).layers.N, query_embed (Embedding),
      input_proj (Conv2d), transformer.
    - models/transformer.py: encoder.layers.N (self_attn = nn.MultiheadAttention: in_proj_weight [3D, D] =
      cat(q, k, v) rows, in_proj_bias, out_proj; linear1, linear2, norm1, norm2), decoder.layers.N (self_attn,
      multihead_attn, linear1, linear2, norm1..norm3), decoder.norm (encoder.norm only with pre_norm).
    """
    live = model.state_dict()
    renames = [
        (r"^model\.input_projection\.", "input_proj."),
        (r"^model\.query_position_embeddings\.", "query_embed."),
        (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
        (r"^model\.(en|de)coder\.layers\.", r"transformer.\1coder.layers."),
        (r"^class_labels_classifier\.", "class_embed."),
        (r"^bbox_predictor\.", "bbox_embed."),
        (r"\.o_proj\.", ".out_proj."),
        (r"\.encoder_attn\.", ".multihead_attn."),
        (r"\.mlp\.fc([12])\.", r".linear\1."),
        (r"(layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
        (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
        (r"(decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm2."),
        (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    ]
    original = {}
    for key, value in live.items():
        if key.startswith("model.backbone.model."):
            original["backbone.0.body." + torchvision_resnet_name(key[len("model.backbone.model."):])] = value
            continue
        if re.search(r"\.[qkv]_proj\.", key):
            continue  # fused below
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        original[key] = value
    for key in live:
        if ".q_proj." in key:
            kind = key.rsplit(".", 1)[1]  # weight or bias
            fused = torch.cat([live[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"])
            name = key.rsplit(".q_proj.", 1)[0].replace("model.", "transformer.", 1)
            name = name.replace(".encoder_attn", ".multihead_attn")
            original[f"{name}.in_proj_{kind}"] = fused
    return original


class NotATensor:  # anything a weights_only load must refuse to build
    pass


@pytest.mark.parametrize("with_args", [False, True], ids=["model-only", "training-checkpoint"])
def test_original_detr_pth(tmp_path, inputs, with_args):
    reference = perturbed_detr(tiny_detr_config())
    state_dict = original_detr_state_dict(reference)
    for key in (
        "backbone.0.body.conv1.weight", "backbone.0.body.layer1.0.bn1.running_mean", "input_proj.weight",
        "query_embed.weight", "transformer.encoder.layers.0.self_attn.out_proj.weight",
        "transformer.encoder.layers.1.linear2.bias", "transformer.decoder.layers.2.multihead_attn.out_proj.bias",
        "transformer.decoder.layers.0.norm3.weight", "transformer.decoder.norm.weight", "class_embed.weight",
        "bbox_embed.layers.0.weight",
    ):  # fmt: skip
        assert key in state_dict, key
    assert state_dict["transformer.encoder.layers.0.self_attn.in_proj_weight"].shape == (3 * 32, 32)
    assert state_dict["transformer.decoder.layers.0.multihead_attn.in_proj_bias"].shape == (3 * 32,)
    # nothing of transformers' layout is left: separate q/k/v, mlp, *_layer_norm, the model. prefix
    assert not any(re.search(r"[qkv]_proj\.|\.mlp\.|layer_norm|^model\.", k) for k in state_dict)

    if with_args:  # DETR's main.py saves its argparse args beside the weights; the head count comes from there
        args = argparse.Namespace(nheads=4, dilation=False, backbone="resnet50")
        checkpoint = {"model": state_dict, "args": args, "epoch": 1}
        kwargs = {}
    else:
        checkpoint, kwargs = {"model": state_dict}, {"num_heads": 4}
    torch.save(checkpoint, tmp_path / "x.pth")
    # the tiny ResNet has 1 block in layer3, so its config is given instead of inferring ResNet-50/101
    converted = convert_checkpoint(tmp_path / "x.pth", backbone_config=tiny_backbone_config(), **kwargs)
    assert converted.config.encoder_attention_heads == 4 and converted.config.decoder_layers == 3
    assert converted.config.num_labels == 5 and not converted.config.normalize_before
    assert_same_outputs(reference, converted, inputs, f"original .pth, {'with' if with_args else 'without'} args")


def test_original_detr_pth_is_read_weights_only(tmp_path):
    torch.save({"model": {}, "payload": NotATensor()}, tmp_path / "unsafe.pth")
    with pytest.raises(pickle.UnpicklingError):
        convert_checkpoint(tmp_path / "unsafe.pth")
    torch.save({"model": {}, "args": argparse.Namespace(dilation=True, nheads=8)}, tmp_path / "dc5.pth")
    with pytest.raises(ValueError, match="DC5"):
        convert_checkpoint(tmp_path / "dc5.pth")
    with pytest.raises(FileNotFoundError):
        convert_checkpoint(tmp_path / "missing.pth")


# --------------------------------------------------------------------------------------------- script


def test_convert_script_end_to_end(tmp_path, inputs):
    reference = perturbed_detr(tiny_detr_config(num_labels=91))
    reference.save_pretrained(tmp_path / "transformers")
    output_dir = tmp_path / "hf_detr"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    script = REPO / "scripts" / "convert_detr_checkpoint.py"
    command = [sys.executable, str(script), "--model_name_or_path", str(tmp_path / "transformers"), "--output_dir", str(output_dir)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    loaded = hf_detr.HfDetrForObjectDetection.from_pretrained(output_dir)
    assert loaded.config.num_labels == 91 and loaded.config.id2label == COCO_CATEGORIES
    processor = AutoImageProcessor.from_pretrained(output_dir)
    assert isinstance(processor, hf_detr.HfDetrImageProcessor)
    assert_same_outputs(reference, loaded, inputs, "script output folder")


# ----------------------------------------------------------------------------------- on-the-fly loading


@pytest.mark.parametrize("kind", sorted(TRANSFORMERS_DETRS))
def test_from_pretrained_converts_a_transformers_checkpoint_on_the_fly(tmp_path, inputs, kind, caplog):
    """A folder whose config.json says model_type "detr" / "conditional_detr" / "dab-detr" (as saved by
    transformers, with its ints for float fields: class_cost=1) loads through HfDetrForObjectDetection and
    HfDetrModel.from_pretrained, converted (said in a log line), relabelled as from_pretrained relabels."""
    reference = perturbed_detr(tiny_transformers_config(kind, auxiliary_loss=True)).eval()
    reference.save_pretrained(tmp_path)
    assert type(json.loads((tmp_path / "config.json").read_text())["class_cost"]) is int  # as transformers writes it
    transformers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            model = hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path)
    finally:
        transformers_logging.disable_propagation()
    assert f"{tmp_path} is a transformers '{kind}' checkpoint: converting it to hf_detr on the fly" in caplog.text
    assert isinstance(model, hf_detr.HfDetrForObjectDetection) and model.config.query_type == TRANSFORMERS_DETRS[kind][2]
    assert model.config.converted_from == str(tmp_path) and model.config.normalize_between_decoder_layers == (kind != "dab-detr")
    assert_same_outputs(reference, model, inputs, f"{kind} folder through from_pretrained")
    base = hf_detr.HfDetrModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state)
    relabelled = hf_detr.HfDetrForObjectDetection.from_pretrained(
        tmp_path, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1}, category_ids=[3, 8], ignore_mismatched_sizes=True
    )
    assert (relabelled.config.num_labels, relabelled.config.category_ids) == (2, [3, 8])
    expected_head = 2 if kind != "detr" else 3  # sigmoid heads: one output per label; softmax: + no object
    assert relabelled.model.heads.class_heads[0].out_features == expected_head
    torch.testing.assert_close(relabelled.model.heads.box_heads[0].layers[0].weight, model.model.heads.box_heads[0].layers[0].weight)
