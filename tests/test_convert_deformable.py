"""transformers' Deformable DETR -> hf_detr: plain, with iterative box refinement, and two-stage.

Each flavour is a tiny `DeformableDetrForObjectDetection` (three backbone stages + one extra level, every
weight moved off its init) converted live, from a saved folder (transformers saves the v4 key layout of the
published SenseTime/deformable-detr* checkpoints), with its backbone in the published timm names, and on the
fly through `from_pretrained`; then eval outputs on a padded batch, the training loss and gradients are
compared with transformers' own.
"""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

import hf_detr
from conftest import TINY_SIZES, random_labels, tiny_backbone_config
from hf_detr.convert import convert_checkpoint, convert_state_dict
from test_convert import assert_same_outputs, inputs, max_output_diffs, perturbed_detr, timm_hub_layout  # noqa: F401

FLAVOURS = {"plain": {}, "box_refine": dict(with_box_refine=True), "two_stage": dict(with_box_refine=True, two_stage=True)}


def tiny_deformable_config(flavour: str, **overrides) -> DeformableDetrConfig:
    kwargs = dict(
        backbone_config=tiny_backbone_config(out_features=["stage2", "stage3", "stage4"]),
        use_timm_backbone=False,
        **TINY_SIZES,
        num_feature_levels=4,  # three backbone stages and one stride-2 convolution
        encoder_n_points=2,
        decoder_n_points=3,
        two_stage_num_proposals=TINY_SIZES["num_queries"],
        auxiliary_loss=False,
    )
    kwargs.update(FLAVOURS[flavour], **overrides)
    return DeformableDetrConfig(**kwargs)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_eval_parity(inputs, flavour):
    reference = perturbed_detr(tiny_deformable_config(flavour))
    converted = hf_detr.convert_transformers_detr(reference)
    config = converted.config
    assert (config.query_type, config.encoder_attention, config.decoder_cross_attention) == ("deformable",) * 3
    assert (config.num_feature_levels, config.with_box_refine, config.two_stage) == (4, flavour != "plain", flavour == "two_stage")
    assert len(converted.model.heads.class_heads) == (3 if flavour != "plain" else 1)
    assert (converted.model.proposals is not None) == (flavour == "two_stage")
    assert_same_outputs(reference, converted, inputs, f"eval parity, deformable {flavour}")


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_train_parity(inputs, flavour):
    """The loss of every decoder layer and its gradients. transformers' loss leaves the two-stage encoder
    predictions out (the paper trains them: hf_detr's `_enc` terms), so those terms are compared apart."""
    reference = perturbed_detr(tiny_deformable_config(flavour, auxiliary_loss=True, dropout=0.0)).train()
    converted = hf_detr.convert_transformers_detr(reference).train()
    labels = random_labels([3, 1], num_labels=5, generator=torch.Generator().manual_seed(3))
    expected = reference(**inputs, labels=[{k: v.clone() for k, v in t.items()} for t in labels])
    actual = converted(**inputs, labels=labels)

    encoder_terms = {k: v for k, v in actual.loss_dict.items() if k.endswith("_enc")}
    assert bool(encoder_terms) == (flavour == "two_stage")
    weights = converted.criterion.weights
    encoder_loss = sum(weights[k.removesuffix("_enc")] * v for k, v in encoder_terms.items())
    loss_diff = abs((actual.loss - encoder_loss).item() - expected.loss.item()) / expected.loss.item()
    shared = set(expected.loss_dict) & set(actual.loss_dict)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_giou_1"} <= shared
    term_diffs = {k: abs(actual.loss_dict[k].item() - expected.loss_dict[k].item()) / max(abs(expected.loss_dict[k].item()), 1e-8) for k in shared}
    print(f"\n[train parity, deformable {flavour}] loss {expected.loss.item():.6f}, relative diff {loss_diff:.2e}; max term diff {max(term_diffs.values()):.2e}")
    assert loss_diff <= 1e-4 and max(term_diffs.values()) <= 1e-4, term_diffs

    # gradients of the same loss (without the encoder terms) reach the same weights the same way
    (actual.loss - encoder_loss).backward()
    expected.loss.backward()
    ours, diffs = dict(converted.named_parameters()), {}
    for name, parameter in reference.named_parameters():
        # the backbone's frozen stages differ by design; a projection's bias before GroupNorm(32) of 32 channels
        # (one per group) has no gradient in exact arithmetic, only rounding on both sides
        if "backbone" in name or re.match(r"model\.input_proj\.\d+\.0\.bias", name) or parameter.grad is None or parameter.grad.norm() < 1e-6:
            continue
        mapped = convert_state_dict({name: parameter}, config=converted.config)
        if name.startswith("class_embed.") and flavour == "box_refine":
            # transformers ties the class heads of every layer; hf_detr keeps one per layer (the paper's): the sum
            grad = sum(ours[f"model.heads.class_heads.{i}.{name.split('.')[-1]}"].grad for i in range(3))
        elif "model.queries.content_embeddings.weight" in mapped:  # the object query: position | content
            grad = torch.cat([ours[key].grad for key in ("model.queries.position_embeddings.weight", "model.queries.content_embeddings.weight")], 1)
        else:
            key = min(mapped)  # one key (a lone class head of a box-refining model is also given to the other layers)
            grad = ours[key].grad
            if key == "model.queries.proposal_projection.weight":  # x and y columns swapped
                quarter = grad.shape[1] // 4
                grad = torch.cat((grad[:, quarter : 2 * quarter], grad[:, :quarter], grad[:, 2 * quarter :]), 1)
        diffs[name] = ((grad - parameter.grad).norm() / parameter.grad.norm()).item()
    print(f"[train parity, deformable {flavour}] {len(diffs)} parameters: max gradient relative diff {max(diffs.values()):.2e}")
    assert len(diffs) > 40 and max(diffs.values()) <= 1e-3, max(diffs.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_saved_folder_in_the_published_layout_converts(tmp_path, inputs, flavour):
    """save_pretrained writes transformers' v4 layout, that of SenseTime/deformable-detr*; with the backbone
    renamed to timm's names, as the published checkpoints have it, it converts the same."""
    reference = perturbed_detr(tiny_deformable_config(flavour))
    reference.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("model.backbone.conv_encoder.model.") for k in saved) and any(".fc1." in k and ".mlp." not in k for k in saved)
    assert_same_outputs(reference, convert_checkpoint(tmp_path), inputs, f"deformable {flavour} folder")
    save_file(timm_hub_layout(saved), tmp_path / "model.safetensors")
    assert_same_outputs(reference, convert_checkpoint(tmp_path), inputs, f"deformable {flavour} folder, timm backbone names")

    model = hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path)  # converted on the fly
    assert model.config.query_type == "deformable" and model.config.converted_from == str(tmp_path)
    assert_same_outputs(reference, model, inputs, f"deformable {flavour} through from_pretrained")


def test_deformable_options_hf_detr_lacks_are_refused():
    with pytest.raises(ValueError, match="encoder_layerdrop"):
        hf_detr.convert_transformers_detr(DeformableDetrForObjectDetection(tiny_deformable_config("plain", encoder_layerdrop=0.1)))
