"""The variants contract: every accepted combination of feature levels x encoder attention x cross-attention x
query type x class loss x query groups x denoising queries x Deformable DETR's decoder options builds, runs and
trains; a covering subset (every pair of values of any two of those dimensions in some combination) saves,
loads, serves a pipeline and loads as remote code (ONNX: tests/test_export.py); and the invariants that make
groups and denoising queries what the papers say they are."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import textwrap
import typing

import pytest
import torch
from transformers import pipeline

import hf_detr
from conftest import random_labels, tiny_backbone_config, tiny_config
from hf_detr.configuration_hf_detr import ClassLoss, CrossAttention, EncoderAttention, MatcherType, QueryType
from hf_detr.queries import Denoising, group_attention_mask
from hf_detr.targets import check_labels

# Every dimension of the variants and its values. `levels`: the backbone's stages (1: DETR's last one; 3: the
# last three plus one stride-2 level, 4 levels as Deformable DETR's). `decoder`: Deformable DETR's options.
DIMENSIONS = {
    "levels": (1, 3),
    "encoder_attention": typing.get_args(EncoderAttention),
    "decoder_cross_attention": typing.get_args(CrossAttention),
    "query_type": typing.get_args(QueryType),
    "class_loss": typing.get_args(ClassLoss),
    "num_query_groups": (1, 3),
    "denoising": ("none", "dn", "cdn"),
    "decoder": ("plain", "box_refine", "two_stage"),
}
DECODER = {"plain": {}, "box_refine": dict(with_box_refine=True), "two_stage": dict(with_box_refine=True, two_stage=True)}
DENOISING = {"none": {}, "dn": dict(num_denoising_queries=12), "cdn": dict(num_denoising_queries=12, denoising_contrastive=True)}


def variant_config(levels=1, decoder="plain", denoising="none", **kwargs):
    """levels 1: the tiny backbone's stride-16 stage (24 positions for the tests' 64 x 96 images: enough for 10
    two-stage proposals); 3: its strides 8, 16, 32 and a stride-64 level."""
    stages = ["stage2", "stage3", "stage4"] if levels > 1 else ["stage3"]
    kwargs.update(backbone_config=tiny_backbone_config(out_features=stages), num_feature_levels=levels + (levels > 1))
    if levels > 1:
        kwargs.update(encoder_n_points=2, decoder_n_points=2)
    if decoder == "two_stage" and kwargs.get("query_type") == "anchor":  # DINO's mixed query selection
        kwargs.update(two_stage=True)
    else:
        kwargs.update(DECODER[decoder])
    return tiny_config(**kwargs, **DENOISING[denoising])


# The dimensions that every other one combines with freely (tested below); the rest are checked by the config.
FREE = ("levels", "encoder_attention", "class_loss")


def accepted_combinations():
    """Every combination the config accepts; the rest must be refused by a ValueError naming a field. The
    config is asked once per combination of the dimensions that are not FREE (building thousands of configs
    would take the test collection tens of seconds)."""
    constrained = [name for name in DIMENSIONS if name not in FREE]
    accepted = []
    for values in itertools.product(*(DIMENSIONS[name] for name in constrained)):
        kwargs = dict(zip(constrained, values))
        try:
            variant_config(**kwargs)
        except ValueError as error:
            assert "HfDetrConfig." in str(error), (kwargs, error)
            continue
        for free in itertools.product(*(DIMENSIONS[name] for name in FREE)):
            combination = {**kwargs, **dict(zip(FREE, free))}
            accepted.append({name: combination[name] for name in DIMENSIONS})
    return accepted


def pairwise_cover(combinations: list[dict]) -> list[dict]:
    """A subset in which every pair of values of two dimensions that occurs in some combination occurs (greedy)."""
    def pairs(kwargs):
        return {((a, kwargs[a]), (b, kwargs[b])) for a, b in itertools.combinations(DIMENSIONS, 2)}

    uncovered, chosen = set().union(*(pairs(c) for c in combinations)), []
    while uncovered:
        best = max(combinations, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


COMBINATIONS = accepted_combinations()
COVERING = pairwise_cover(COMBINATIONS)


def variant_id(kwargs: dict) -> str:
    return "-".join(str(value) for value in kwargs.values())


@pytest.mark.parametrize("constrained", [dict(query_type="detr"), dict(query_type="anchor", denoising="cdn", decoder="box_refine"),
                                         dict(query_type="deformable", decoder="two_stage")], ids=["detr", "anchor", "two_stage"])
def test_the_free_dimensions_combine_with_anything(constrained):
    for free in itertools.product(*(DIMENSIONS[name] for name in FREE)):
        variant_config(**constrained, **dict(zip(FREE, free)))  # accepted


def test_the_dicts_are_the_config_literals_and_the_combinations_what_they_allow():
    assert set(typing.get_args(QueryType)) == set(hf_detr.QUERY_BUILDERS)
    assert set(typing.get_args(ClassLoss)) == set(hf_detr.CLASS_LOSSES)
    assert set(typing.get_args(MatcherType)) == set(hf_detr.MATCHERS)
    assert set(typing.get_args(EncoderAttention)) == set(hf_detr.ENCODER_ATTENTION)
    assert set(typing.get_args(CrossAttention)) == set(hf_detr.CROSS_ATTENTION)
    # "spatial" cross-attention needs spatial queries (conditional, anchor), "deformable" reference points (all
    # but detr); denoising (plain or contrastive) needs anchor queries; box refinement refined references (anchor,
    # deformable); two-stage anchor queries (DINO) or deformable ones (with box refinement), in one group
    pairs = {"dense": ("detr", "conditional", "anchor", "deformable"), "spatial": ("conditional", "anchor"), "deformable": ("conditional", "anchor", "deformable")}
    per_side_and_loss = 0
    for query in (query for queries in pairs.values() for query in queries):
        denoising = 3 if query == "anchor" else 1
        decoders = 2 if query in ("anchor", "deformable") else 1  # plain, box_refine
        two_stage = query in ("anchor", "deformable")
        per_side_and_loss += denoising * (2 * decoders + two_stage)  # x groups (+ two-stage, one group)
    assert len(COMBINATIONS) == 2 * 2 * 3 * per_side_and_loss  # levels x encoder attention x class loss
    assert len(COVERING) < len(COMBINATIONS) // 10


@pytest.mark.parametrize("kwargs", COMBINATIONS, ids=[variant_id(k) for k in COMBINATIONS])
def test_every_accepted_combination_builds_runs_and_trains(kwargs, inputs):
    torch.manual_seed(0)
    config = variant_config(**kwargs)
    model = hf_detr.HfDetrForObjectDetection(config)
    num_classes = 5 if kwargs["class_loss"] != "softmax" else 6

    # inference: group 0 only, no denoising queries
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (2, 10, num_classes) and out.pred_boxes.shape == (2, 10, 4)
    assert ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all() and out.auxiliary_outputs is None

    # one training step: a finite loss of every layer whose gradients reach the query builder's and the heads' parameters
    model.train()
    labels = random_labels([3, 1], 5, torch.Generator().manual_seed(2))
    train_out = model(**inputs, labels=labels)
    assert train_out.logits.shape == (2, 10, num_classes) and torch.isfinite(train_out.loss)
    assert [aux["logits"].shape for aux in train_out.auxiliary_outputs] == [(2, 10, num_classes)] * 2
    suffixes = ("", "_dn") if kwargs["denoising"] != "none" else ("",)
    expected_keys = {f"{n}{s}{i}" for n in ("loss_ce", "loss_bbox", "loss_giou") for s in suffixes for i in ("", "_0", "_1")}
    if kwargs["decoder"] == "two_stage":
        expected_keys |= {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"}
    assert set(train_out.loss_dict) == expected_keys | {"cardinality_error"}
    train_out.loss.backward()
    heads = model.model.heads
    # every query-builder weight; the heads' outputs (the box MLPs' earlier layers get none while the last starts at zero)
    learning = dict(model.model.queries.named_parameters())
    learning.update({f"class_heads.{i}": head.weight for i, head in enumerate(heads.class_heads)})
    learning.update({f"box_heads.{i}": head.layers[-1].weight for i, head in enumerate(heads.box_heads)})
    for name, parameter in learning.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs", COVERING, ids=[variant_id(k) for k in COVERING])
def test_variant_saves_loads_and_serves_a_pipeline(kwargs, inputs, tmp_path):
    torch.manual_seed(0)
    config = variant_config(**kwargs)
    model = hf_detr.HfDetrForObjectDetection(config).eval()
    with torch.no_grad():
        out = model(**inputs)

    # save / load: the same outputs, and the processor that fits the class loss
    model.save_pretrained(tmp_path)
    hf_detr.image_processor_for(config, size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(tmp_path)
    loaded = hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        reloaded = loaded(**inputs)
    torch.testing.assert_close(reloaded.logits, out.logits)
    torch.testing.assert_close(reloaded.pred_boxes, out.pred_boxes)

    # pipeline: detections in the pipeline's format, labels from the config
    from PIL import Image

    detections = pipeline("object-detection", model=str(tmp_path), threshold=0.0)(Image.new("RGB", (90, 60), "white"))
    assert detections and all(d["label"] in config.id2label.values() and 0 <= d["score"] <= 1 for d in detections)
    expected_count = 10 if kwargs["class_loss"] == "softmax" else 10 * 5  # argmax per query, or top-k (query, class)
    assert len(detections) == expected_count


def test_every_covering_variant_loads_as_remote_code_without_hf_detr(tmp_path_factory, inputs):
    """One process that cannot import hf_detr loads each covering combination's checkpoint with
    trust_remote_code and reproduces its outputs."""
    folders = {}
    for kwargs in COVERING:
        torch.manual_seed(0)
        model = hf_detr.HfDetrForObjectDetection(variant_config(**kwargs)).eval()
        folder = tmp_path_factory.mktemp(variant_id(kwargs))
        model.save_pretrained(folder)
        with torch.no_grad():
            torch.save({"inputs": inputs, "logits": model(**inputs).logits}, folder / "expected.pt")
        folders[variant_id(kwargs)] = str(folder)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_detr"] = None  # any `import hf_detr` now fails
        import torch
        from transformers import AutoModelForObjectDetection
        for name, folder in {folders!r}.items():
            model = AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            expected = torch.load(folder + "/expected.pt")
            with torch.no_grad():
                torch.testing.assert_close(model(**expected["inputs"]).logits, expected["logits"])
            print("remote-ok", name)
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("modules")), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path_factory.mktemp("cwd"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("remote-ok") == len(folders) == len(COVERING)
    # a checkpoint carries the model's files and nothing of the training side or the converter
    saved = {name for name in os.listdir(next(iter(folders.values()))) if name.endswith(".py")}
    model_files = {"configuration_hf_detr.py", "modeling_hf_detr.py", "queries.py", "layers.py", "kernels.py", "loss.py", "matching.py",
                   "box_ops.py", "backbone.py", "memory.py", "heads.py", "deformable.py", "targets.py"}  # fmt: skip
    assert saved == model_files


# ------------------------------------------------------------------------------------------ invariants


def _copy_matching(source, target):
    """Load `source`'s weights into `target` where the two have them (group 0 of grouped embeddings)."""
    state = target.state_dict()
    for name, value in source.state_dict().items():
        if name in state:
            state[name] = value[: state[name].shape[0]] if value.shape != state[name].shape else value
    target.load_state_dict(state)


@pytest.mark.parametrize("query_type", typing.get_args(QueryType))
def test_group_zero_of_a_grouped_model_is_the_ungrouped_model(query_type, inputs):
    """Groups attend only within themselves: group 0 of a 3-group model computes exactly what the
    1-group model with its weights computes, in training too; at inference only group 0 exists."""
    torch.manual_seed(0)
    grouped = hf_detr.HfDetrForObjectDetection(tiny_config(query_type=query_type, num_query_groups=3))
    single = hf_detr.HfDetrForObjectDetection(tiny_config(query_type=query_type))
    _copy_matching(grouped, single)
    for mode in ("eval", "train"):
        grouped.train(mode == "train"), single.train(mode == "train")
        with torch.no_grad():
            a = grouped.model(**inputs, output_decoder_queries=True, output_intermediate_hidden_states=True)
            b = single.model(**inputs, output_intermediate_hidden_states=True)
        assert a.decoder_queries.num_groups == (3 if mode == "train" else 1)
        assert a.intermediate_hidden_states.shape[2] == (30 if mode == "train" else 10)
        torch.testing.assert_close(a.intermediate_hidden_states[:, :, :10], b.intermediate_hidden_states, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("query_type", typing.get_args(QueryType))
def test_no_gradient_crosses_groups(query_type, inputs):
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(tiny_config(query_type=query_type, num_query_groups=3)).train()
    builder = model.model.queries
    embedding = builder.anchor_embeddings if query_type == "anchor" else builder.position_embeddings
    outputs = model.model(**inputs)
    group_1 = outputs.intermediate_hidden_states[:, :, 10:20]
    (grad,) = torch.autograd.grad(group_1.square().sum(), embedding.weight)
    assert grad[10:20].abs().sum() > 0  # its own queries
    assert grad[:10].abs().max() == 0 and grad[20:].abs().max() == 0  # nothing of group 0 or 2


@pytest.mark.parametrize("contrastive", [False, True], ids=["dn", "cdn"])
def test_denoising_queries_leak_nothing_to_matching_queries(inputs, contrastive):
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(tiny_config(query_type="anchor", num_denoising_queries=12, denoising_contrastive=contrastive)).train()
    labels = random_labels([3, 1], 5, torch.Generator().manual_seed(2))
    outputs = model.model(**inputs, labels=labels, output_decoder_queries=True)
    queries = outputs.decoder_queries
    # 12 // (max 3 targets x 1 or 2 copies): 4 groups of 3 queries, or 2 of 3 positives and 3 negatives
    assert queries.num_denoising == queries.denoising.num_groups * 3 * (1 + contrastive) == 12
    matching = outputs.intermediate_hidden_states[:, :, queries.num_denoising :]
    denoising = outputs.intermediate_hidden_states[:, :, : queries.num_denoising]
    label_embeddings = model.model.queries.denoising.label_embeddings.weight
    (grad,) = torch.autograd.grad(matching.square().sum(), label_embeddings, allow_unused=True, retain_graph=True)
    assert grad is None or grad.abs().max() == 0
    (grad,) = torch.autograd.grad(denoising.square().sum(), label_embeddings)
    assert grad.abs().sum() > 0

    # and the matching queries compute what a model without denoising queries computes
    plain = hf_detr.HfDetrForObjectDetection(tiny_config(query_type="anchor")).train()
    _copy_matching(model, plain)
    with torch.no_grad():
        expected = plain.model(**inputs, labels=labels)
    torch.testing.assert_close(matching.detach(), expected.intermediate_hidden_states, rtol=1e-5, atol=1e-5)


def test_zero_denoising_queries_are_none(inputs):
    """A batch without targets makes no denoising queries; the model is then the plain model."""
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(tiny_config(query_type="anchor", num_denoising_queries=12)).train()
    plain = hf_detr.HfDetrForObjectDetection(tiny_config(query_type="anchor")).train()
    _copy_matching(model, plain)
    empty = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    a, b = model(**inputs, labels=empty), plain(**inputs, labels=empty)
    assert a.loss_dict.keys() == b.loss_dict.keys() and not any("_dn" in key for key in a.loss_dict)
    torch.testing.assert_close(a.loss, b.loss)
    # every process of a distributed run computes gradients for the same parameters (or DDP waits for the
    # missing ones: RT-DETR#672's hang): the label embeddings get a zero gradient, not none
    a.loss.backward()
    without_targets = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model(**inputs, labels=random_labels([3, 1], 5, torch.Generator().manual_seed(2))).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == without_targets
    assert model.model.queries.denoising.label_embeddings.weight.grad.abs().sum() > 0


def test_contrastive_denoising_negatives_are_noised_further_and_learn_no_object():
    """DINO's negatives: each target's second copy per group, noised by 1 to 2 x the positives' bounds, is asked
    for "no object" and has no box terms; the positives reconstruct their targets as plain denoising does."""
    labels = random_labels([3, 0, 2], 5, torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    noisy = Denoising(num_labels=5, d_model=8, num_queries=600, label_noise=0.0, box_noise=0.4, contrastive=True)
    content, anchors, pairs = noisy(check_labels(labels, 5), "cpu")
    assert pairs.num_groups == 100 and len(pairs.query_idx) == len(pairs.negative_query_idx) == 100 * 5
    assert not set(zip(pairs.image_idx.tolist(), pairs.query_idx.tolist())) & set(zip(pairs.negative_image_idx.tolist(), pairs.negative_query_idx.tolist()))
    truth = torch.cat([labels[i]["boxes"][t][None] for i, t in zip(pairs.image_idx.tolist(), pairs.target_idx.tolist())])
    positives = anchors[pairs.image_idx, pairs.query_idx].sigmoid()
    negatives = anchors[pairs.negative_image_idx, pairs.negative_query_idx].sigmoid()  # the same targets, same order
    w_h = truth[:, 2:]
    assert ((positives[:, :2] - truth[:, :2]).abs() <= 0.4 * w_h / 2 + 1e-4).all()
    centre_shift = (negatives[:, :2] - truth[:, :2]).abs()
    inside = (negatives[:, :2] > 1e-3) & (negatives[:, :2] < 1 - 1e-3)  # clamping at the image's edge aside
    assert ((centre_shift >= 0.4 * w_h / 2 - 1e-4) | ~inside).all() and (centre_shift <= 0.8 * w_h / 2 + 1e-4).all()

    # the loss: the negatives' class term is the "no object" loss of their logits; the box terms are the positives'
    crit = hf_detr.SetCriterion(hf_detr.HungarianMatcher(), hf_detr.CLASS_LOSSES["focal"](5))
    num_denoising = anchors.shape[1]
    logits = torch.randn(2, 3, num_denoising + 4, 5, generator=torch.Generator().manual_seed(1))
    boxes = torch.rand(2, 3, num_denoising + 4, 4, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.25
    layout = hf_detr.queries.DecoderQueries(content=torch.zeros(3, num_denoising + 4, 8), num_queries=4, num_denoising=num_denoising, denoising=pairs)
    _, with_negatives = crit(logits, boxes, labels, layout)
    assert with_negatives["loss_ce_dn"] > 0
    positives_only = hf_detr.queries.DecoderQueries(**{**layout.__dict__, "denoising": dataclasses.replace(pairs, negative_image_idx=None, negative_query_idx=None)})
    _, without = crit(logits, boxes, labels, positives_only)
    for key in ("loss_bbox_dn", "loss_giou_dn", "loss_bbox_dn_0"):
        torch.testing.assert_close(with_negatives[key], without[key])
    rows = logits[:, pairs.negative_image_idx, pairs.negative_query_idx]  # [L, M, K]: every class's target 0
    expected_extra = crit.class_loss(rows, torch.full(rows.shape[:2], 5), None, 5.0 * pairs.num_groups)  # num_boxes x groups
    torch.testing.assert_close(with_negatives["loss_ce_dn"] - without["loss_ce_dn"], expected_extra[-1], rtol=1e-5, atol=1e-6)


def test_mixed_query_selection_takes_the_encoders_best_boxes_as_anchors_and_learned_content(inputs):
    """DINO: the anchors are the top-k proposals of the encoder (by their best class, detached), the content the
    same learned queries for every image; the encoder stage learns with the targets' classes."""
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(tiny_config(query_type="anchor", two_stage=True, class_loss="focal", num_feature_levels=1,
                                                         backbone_config=tiny_backbone_config(out_features=["stage3"]))).eval()  # fmt: skip
    assert not model.config.two_stage_class_agnostic and not hasattr(model.model.queries, "anchor_embeddings")
    captured = {}
    model.model.proposals.register_forward_hook(lambda module, args, output: captured.update(proposals=output))
    with torch.no_grad():
        outputs = model.model(**inputs, output_decoder_queries=True, output_intermediate_hidden_states=True)
    proposals, queries = captured["proposals"], outputs.decoder_queries
    best = proposals.logits.max(-1).values.topk(10, dim=1).indices
    assert torch.equal(proposals.selected_index, best)
    torch.testing.assert_close(queries.reference, proposals.pred_boxes.gather(1, best[..., None].expand(-1, -1, 4)))
    torch.testing.assert_close(queries.content[0], model.model.queries.content_embeddings.weight)
    torch.testing.assert_close(queries.content[1], queries.content[0])

    model.train()
    labels = random_labels([3, 1], 5, torch.Generator().manual_seed(2))
    out = model(**inputs, labels=labels)
    out.loss.backward()
    assert model.model.proposals.class_head.weight.grad.abs().sum() > 0  # through its own loss terms
    assert model.model.queries.content_embeddings.weight.grad.abs().sum() > 0


def test_denoising_queries_are_noised_ground_truth_within_bounds():
    labels = random_labels([3, 0, 2], 5, torch.Generator().manual_seed(4))
    exact = Denoising(num_labels=5, d_model=8, num_queries=6, label_noise=0.0, box_noise=0.0)
    content, anchors, pairs = exact(check_labels(labels, 5), "cpu")
    assert pairs.num_groups == 2 and content.shape == (3, 6, 8) and anchors.shape == (3, 6, 4)
    for image, query, target in zip(pairs.image_idx.tolist(), pairs.query_idx.tolist(), pairs.target_idx.tolist()):
        torch.testing.assert_close(anchors[image, query].sigmoid(), labels[image]["boxes"][target], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(content[image, query], exact.label_embeddings.weight[labels[image]["class_labels"][target]])
    assert len(pairs.query_idx) == 2 * 5  # every target once per group; image 1's queries are padding

    torch.manual_seed(0)
    noisy = Denoising(num_labels=5, d_model=8, num_queries=600, label_noise=0.5, box_noise=0.4)
    content, anchors, pairs = noisy(check_labels(labels, 5), "cpu")
    truth = torch.cat([labels[i]["boxes"][t][None] for i, t in zip(pairs.image_idx.tolist(), pairs.target_idx.tolist())])
    noised = anchors[pairs.image_idx, pairs.query_idx].sigmoid()
    w_h = truth[:, 2:]
    assert ((noised[:, :2] - truth[:, :2]).abs() <= 0.4 * w_h / 2 + 1e-4).all()
    assert ((noised[:, 2:] >= w_h * 0.6 - 1e-4) & (noised[:, 2:] <= w_h * 1.4 + 1e-4)).all()
    assert (noised - truth).abs().max() > 0.01
    kept = (content[pairs.image_idx, pairs.query_idx][:, None, :] == noisy.label_embeddings.weight[None]).all(-1)
    chosen = kept.float().argmax(-1)
    true_classes = torch.cat([labels[i]["class_labels"][t][None] for i, t in zip(pairs.image_idx.tolist(), pairs.target_idx.tolist())])
    changed = (chosen != true_classes).float().mean().item()
    assert 0.3 < changed < 0.5  # replaced with probability 0.5 by one of 5 classes: 0.4 expected


def test_group_attention_mask_blocks():
    mask = group_attention_mask(num_groups=2, num_queries=3, num_denoising_groups=2, denoising_group_size=2)
    assert mask.shape == (10, 10) and mask.diagonal().all()
    denoising, group_0, group_1 = slice(0, 4), slice(4, 7), slice(7, 10)
    assert not mask[group_0, denoising].any() and not mask[group_1, denoising].any()  # matching never sees denoising
    assert not mask[group_0, group_1].any() and not mask[group_1, group_0].any()
    assert mask[denoising, group_0].all() and not mask[denoising, group_1].any()
    assert mask[0:2, 0:2].all() and not mask[0:2, 2:4].any()  # denoising groups apart
    assert group_attention_mask(1, 5) is None


def test_group_matching_is_optimal_per_group(generator):
    """The criterion matches each group on its own: its box terms are the mean of each group's terms
    with the group's queries alone, so each group's assignment is that group's optimal one."""
    crit = hf_detr.SetCriterion(hf_detr.HungarianMatcher(), hf_detr.CLASS_LOSSES["focal"](4))
    logits = torch.randn(2, 2, 3 * 6, 4, generator=generator)
    boxes = torch.rand(2, 2, 3 * 6, 4, generator=generator) * 0.5 + 0.25
    labels = random_labels([4, 2], 4, generator)
    layout = hf_detr.queries.DecoderQueries(content=torch.zeros(2, 18, 8), num_groups=3)
    _, grouped = crit(logits, boxes, labels, layout)
    per_group = [crit(logits[:, :, 6 * g : 6 * g + 6], boxes[:, :, 6 * g : 6 * g + 6], labels)[1] for g in range(3)]
    for key in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_ce", "loss_ce_0"):
        torch.testing.assert_close(grouped[key], sum(d[key] for d in per_group) / 3)


def test_look_forward_twice_changes_gradients_not_values(inputs):
    torch.manual_seed(0)
    once = hf_detr.HfDetrForObjectDetection(tiny_config(query_type="anchor")).train()
    twice = hf_detr.HfDetrForObjectDetection(tiny_config(query_type="anchor", look_forward_twice=True)).train()
    twice.load_state_dict(once.state_dict())
    with torch.no_grad():  # trained-looking box heads, so that refinement moves the anchors
        for model in (once, twice):
            model.model.heads.box_heads[0].layers[-1].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    labels = random_labels([3, 1], 5, torch.Generator().manual_seed(2))
    a, b = once(**inputs, labels=labels), twice(**inputs, labels=labels)
    torch.testing.assert_close(a.loss, b.loss)
    # layer 1's boxes are relative to layer 0's refinement: detached, or not
    for model, reaches in ((once, False), (twice, True)):
        references = model.model(**inputs).reference_boxes
        layer_0 = model.model.decoder.layers[0].mlp.fc2.weight
        (grad,) = torch.autograd.grad(references[1].sum(), layer_0, allow_unused=True)
        assert (grad is not None and grad.abs().sum() > 0) == reaches
    a.loss.backward(), b.loss.backward()
    grad_once = once.model.decoder.layers[0].mlp.fc2.weight.grad
    grad_twice = twice.model.decoder.layers[0].mlp.fc2.weight.grad
    assert not torch.allclose(grad_once, grad_twice)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(query_type="detr", num_denoising_queries=4), "num_denoising_queries"),
        (dict(query_type="anchor", denoising_contrastive=True), "denoising_contrastive"),
        (dict(query_type="conditional", two_stage=True), "two_stage"),
        (dict(query_type="anchor", two_stage=True, num_query_groups=2), "two_stage"),
        (dict(query_type="conditional", look_forward_twice=True), "look_forward_twice"),
        (dict(num_query_groups=0), "num_query_groups"),
        (dict(denoising_label_noise=1.5), "denoising_label_noise"),
        (dict(focal_gamma=-1.0), "focal_gamma"),
    ],
)
def test_combinations_that_cannot_work_are_refused_by_name(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**kwargs)


def test_sigmoid_variants_save_the_top_k_processor(tmp_path):
    config = tiny_config(class_loss="focal")
    hf_detr.image_processor_for(config).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_processor_type"].startswith("ConditionalDetr")
    softmax = tiny_config()
    hf_detr.image_processor_for(softmax).save_pretrained(tmp_path / "softmax")
    assert json.loads((tmp_path / "softmax" / "preprocessor_config.json").read_text())["image_processor_type"].startswith("DetrImage")
    # the same preprocessing
    from PIL import Image

    image = Image.new("RGB", (90, 60), "red")
    a = hf_detr.image_processor_for(config)(images=[image], return_tensors="pt")
    b = hf_detr.image_processor_for(softmax)(images=[image], return_tensors="pt")
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
