"""hf_detr.explain and scripts/explain.py: the pictures show the model's own numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hf_detr
from conftest import random_labels, tiny_config
from hf_detr.explain import explain, query_statistics
from hf_detr.visualize import plot_layers, plot_matching, write_dataset_report, write_report

ROOT = Path(__file__).resolve().parents[1]
QUERY_TYPES = sorted(hf_detr.QUERY_BUILDERS)


def tiny_model(query_type, **overrides):
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(tiny_config(query_type=query_type, **overrides)).eval()
    with torch.no_grad():  # boxes that differ from layer to layer, as a trained model's do
        torch.nn.init.normal_(model.model.heads.box_heads[0].layers[-1].weight, std=0.2)
    return model


def processor(model):
    return hf_detr.image_processor_for(model.config, size={"shortest_edge": 64, "longest_edge": 96})


def picture(width=90, height=60, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


def not_blank(path: Path) -> bool:
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    return path.stat().st_size > 2000 and pixels.std() > 5


@pytest.mark.parametrize("query_type", QUERY_TYPES)
def test_explanation_is_the_models_own_layers_matching_and_attention(query_type, tmp_path):
    model = tiny_model(query_type)
    labels = random_labels([3], 5, torch.Generator().manual_seed(1))[0]
    image = picture()
    explanation = explain(model, image, labels=labels, threshold=0.15, image_processor=processor(model))

    # per layer, exactly what the model's forward gives: its auxiliary outputs and final output
    inputs = processor(model)(images=[image], return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"], labels=[labels])
    layer_logits = torch.stack([aux["logits"] for aux in out.auxiliary_outputs] + [out.logits])[:, 0]
    layer_boxes = torch.stack([aux["pred_boxes"] for aux in out.auxiliary_outputs] + [out.pred_boxes])[:, 0]
    probabilities = layer_logits.sigmoid() if model.config.class_loss != "softmax" else layer_logits.softmax(-1)[..., :-1]
    torch.testing.assert_close(explanation.scores, probabilities)
    torch.testing.assert_close(explanation.boxes, layer_boxes)
    assert (explanation.references is None) == (query_type == "detr")

    # the matching is the loss's own matcher's, layer by layer, and each pair's costs are its cost entries
    expected = model.criterion.matcher.match_layers(layer_logits[:, None], layer_boxes[:, None], [labels])
    for layer, ((queries, targets), costs) in enumerate(zip(explanation.matches, explanation.match_costs)):
        assert torch.equal(queries, expected[layer][0][0]) and torch.equal(targets, expected[layer][0][1])
        cost = model.criterion.matcher.target_costs(layer_logits[layer, None, None], layer_boxes[layer, None, None], [labels])[0]
        torch.testing.assert_close(costs["total"], cost[targets, queries])

    # attention maps: distributions over the feature map (deformable: the weight of the points inside it)
    L, heads, Q = model.config.decoder_layers, model.config.decoder_attention_heads, model.config.num_queries
    h, w = explanation.feature_mask.shape
    assert explanation.cross_attention.shape == (L, heads, Q, h, w)
    if model.config.decoder_cross_attention == "deformable":
        assert (explanation.cross_attention.sum((-2, -1)) <= 1 + 1e-5).all() and explanation.cross_attention.sum() > 0
        levels, points = model.config.num_feature_levels, model.config.decoder_n_points
        assert explanation.sampling_locations.shape == (L, Q, heads, levels, points, 2)
        torch.testing.assert_close(explanation.sampling_weights.sum((-2, -1)), torch.ones(L, Q, heads))
    else:
        torch.testing.assert_close(explanation.cross_attention.sum((-2, -1)), torch.ones(L, heads, Q))
        assert explanation.sampling_locations is None
    assert explanation.encoder_attention.shape[-2:] == (h, w) and explanation.encoder_attention.shape[0] == model.config.encoder_layers
    torch.testing.assert_close(explanation.encoder_attention.sum((-2, -1)), torch.ones(explanation.encoder_attention.shape[:3]))

    # the pictures draw exactly those numbers
    drawn_layers = plot_layers(explanation, tmp_path / "layers.png")
    assert drawn_layers == [explanation.detections(layer).tolist() for layer in range(L)]
    for layer, queries in enumerate(drawn_layers):  # the queries whose own score in that layer reaches the threshold
        assert set(queries) == set((probabilities[layer].max(-1).values >= 0.15).nonzero().flatten().tolist())
    assert any(drawn_layers), "nothing drawn: lower the threshold"
    drawn_pairs = plot_matching(explanation, tmp_path / "matching.png")
    assert drawn_pairs == [list(zip(q.tolist(), t.tolist())) for q, t in explanation.matches]
    page = write_report(explanation, tmp_path / "report")
    assert page.is_file() and "<table>" in page.read_text()
    for name in ("layers.png", "matching.png", "cross_attention.png", "encoder_attention.png"):
        assert not_blank(tmp_path / "report" / name), name


def test_attention_gives_padding_no_weight():
    model = tiny_model("detr")
    wide, square = picture(96, 48, seed=1), picture(64, 64, seed=2)
    inputs = processor(model)(images=[wide, square], return_tensors="pt")  # 48x96 and 64x64: both padded to 64x96
    assert not inputs["pixel_mask"][1].all()
    padded = {"image": square, "pixel_values": inputs["pixel_values"][1:], "pixel_mask": inputs["pixel_mask"][1:]}
    explanation = explain(model, padded, threshold=0.0)
    mask = explanation.feature_mask
    assert not mask.all() and mask.any()
    assert explanation.cross_attention[..., ~mask].abs().max() == 0
    assert explanation.encoder_attention[..., ~mask].abs().max() == 0
    torch.testing.assert_close(explanation.cross_attention.sum((-2, -1)), torch.ones(explanation.cross_attention.shape[:3]))


@pytest.mark.parametrize("query_type", QUERY_TYPES)
def test_training_queries_show_every_group_and_the_denoising_queries(query_type):
    denoising = 6 if query_type == "anchor" else 0
    model = tiny_model(query_type, num_query_groups=2, num_denoising_queries=denoising)
    labels = random_labels([3], 5, torch.Generator().manual_seed(1))[0]
    explanation = explain(model, picture(), labels=labels, image_processor=processor(model), training_queries=True)
    assert explanation.num_groups == 2 and explanation.num_denoising == denoising
    assert explanation.all_scores.shape[1] == denoising + 2 * model.config.num_queries
    # group 0 of the training layout is what the model predicts with
    torch.testing.assert_close(explanation.all_scores[:, denoising : denoising + 10], explanation.scores)
    assert not model.training and not model.model.queries.training  # left in eval mode
    plain = explain(model, picture(), labels=labels, image_processor=processor(model))
    assert plain.num_groups == 1 and plain.all_scores.shape[1] == 10
    torch.testing.assert_close(plain.scores, explanation.scores, rtol=1e-5, atol=1e-5)  # groups do not see each other


def test_query_statistics_count_the_matchers_pairs(tmp_path):
    model = tiny_model("detr")
    model.config.category_ids = [1, 3, 7, 8, 9]
    examples = [
        {"image": picture(seed=i), "objects": {"bbox": [[10, 10, 30, 20], [50, 20, 20, 30]], "category": [3, 9], "iscrowd": [0, 0]}}
        for i in range(3)
    ] + [{"image": picture(seed=9), "objects": {"bbox": [[5, 5, 10, 10]], "category": [1], "iscrowd": [1]}}]
    statistics = query_statistics(model, examples, image_processor=processor(model), batch_size=2)
    assert statistics.centres.shape == (4, 10, 2) and statistics.scores.shape == (4, 10)
    assert statistics.match_counts.sum() == 6  # two objects in each of three images; the crowd one is left out
    assert statistics.match_counts[:, 1].sum() == 3 and statistics.match_counts[:, 4].sum() == 3  # ids 3 and 9
    page = write_dataset_report(statistics, tmp_path)
    assert page.is_file() and not_blank(tmp_path / "query_slots.png") and not_blank(tmp_path / "slot_matches.png")


def test_explain_script_end_to_end(tmp_path):
    from hf_detr.data import make_synthetic_coco

    root = tmp_path / "coco"
    make_synthetic_coco(root, num_train=2, num_val=3, seed=0, image_size=96)
    import json

    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    names = {i: c["name"] for i, c in enumerate(coco["categories"])}
    model = tiny_model(
        "anchor", num_labels=len(names), id2label=names, label2id={v: k for k, v in names.items()},
        category_ids=[c["id"] for c in coco["categories"]],
    )  # fmt: skip
    _save(model, processor(model), tmp_path / "ckpt")
    image = coco["images"][0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = str(ROOT / "scripts" / "explain.py")
    run = [sys.executable, script, "--model_name_or_path", str(tmp_path / "ckpt"), "--threshold", "0.1"]
    single = subprocess.run(  # the image's entry in the annotations is found by its file name
        run + ["--image", str(root / "val" / image["file_name"]), "--annotations", str(root / "annotations" / "instances_val.json"),
               "--output_dir", str(tmp_path / "one")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    assert "matching.png" in (tmp_path / "one" / "index.html").read_text()
    split = subprocess.run(
        run + ["--dataset_name", str(root), "--eval_split", "val", "--output_dir", str(tmp_path / "slots")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert split.returncode == 0, split.stderr[-3000:]
    assert not_blank(tmp_path / "slots" / "query_slots.png")


def _save(model, image_processor, folder):
    model.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return folder


def test_explain_script_takes_the_argument_names_of_the_other_scripts():
    """--model_name_or_path, --dataset_name, --max_eval_samples as in train.py / evaluate.py; the older names still parse."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("explain_script", ROOT / "scripts" / "explain.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for argv in (["--model_name_or_path", "ckpt", "--dataset_name", "coco", "--max_eval_samples", "3"],
                 ["--model", "ckpt", "--dataset", "coco", "--max_images", "3"]):  # fmt: skip
        args = script.parse_args([*argv, "--output_dir", "out"])
        assert (args.model_name_or_path, args.dataset_name, args.max_eval_samples) == ("ckpt", "coco", 3), argv


def test_annotations_of_another_image_are_refused_naming_both(tmp_path):
    """The README's example gave --image_id 3 for val/000003.jpg, whose id is 4: another image's boxes were drawn."""
    from hf_detr.data import make_synthetic_coco
    from hf_detr.explain import coco_image_of

    root = make_synthetic_coco(tmp_path / "coco", num_train=1, num_val=5, seed=0, image_size=32)
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    image = root / "val" / "000003.jpg"
    assert coco_image_of(coco, image)["id"] == 4 and coco_image_of(coco, image, image_id=4)["id"] == 4
    with pytest.raises(ValueError, match=r"image id 3 is '000002\.jpg' in ann\.json, not \S*val/000003\.jpg \(its id there is 4\)"):
        coco_image_of(coco, image, image_id=3, annotations="ann.json")
    with pytest.raises(ValueError, match=r"ann\.json: none of its images has the file name of \S*other\.jpg; name the image with --image_id"):
        coco_image_of(coco, tmp_path / "other.jpg", annotations="ann.json")
    with pytest.raises(ValueError, match=r"image id 99 is not in ann\.json's images"):
        coco_image_of(coco, image, image_id=99, annotations="ann.json")
    coco["images"][3]["width"] = 40
    with pytest.raises(ValueError, match=r"\S*000003\.jpg is 32x32, but image 4 of ann\.json is 40x32: its boxes are not this image's"):
        coco_image_of(coco, image, annotations="ann.json")


def test_explain_script_refuses_an_image_id_of_another_file(tmp_path):
    import importlib.util

    from hf_detr.data import make_synthetic_coco

    root = make_synthetic_coco(tmp_path / "coco", num_train=1, num_val=5, seed=0, image_size=32)
    model = tiny_model("detr", num_labels=3)
    _save(model, processor(model), tmp_path / "ckpt")
    spec = importlib.util.spec_from_file_location("hf_detr_explain_script", ROOT / "scripts" / "explain.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    annotations = str(root / "annotations" / "instances_val.json")
    argv = ["--model_name_or_path", str(tmp_path / "ckpt"), "--image", str(root / "val" / "000003.jpg"), "--annotations", annotations,
            "--image_id", "3", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(ValueError, match=rf"image id 3 is '000002\.jpg' in {annotations}, not \S*000003\.jpg \(its id there is 4\)"):
        script.main(argv)
    assert not (tmp_path / "out").exists()
