"""CocoEvaluator against pycocotools itself, plus cases whose answer is known by hand."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hf_detr.evaluation import COCO_METRIC_NAMES, CocoEvaluator, coco_from_examples

REPO_ROOT = Path(__file__).resolve().parents[1]
CATEGORY_IDS = [1, 3, 7]  # non-contiguous dataset ids, contiguous labels 0..2


def make_examples(num_images=6, seed=0):
    """Hub-schema examples with small, medium and large boxes, and a crowd box on image 0."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(num_images):
        width, height = 640, 480
        objects = {"id": [], "bbox": [], "category": [], "area": [], "iscrowd": []}
        for j in range(int(rng.integers(1, 6))):
            side = float(rng.choice([20.0, 60.0, 150.0]))  # small (<32^2), medium, large (>96^2)
            w, h = side * rng.uniform(0.8, 1.2), side * rng.uniform(0.8, 1.2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            objects["id"].append(1000 + 10 * i + j)
            objects["bbox"].append([x, y, w, h])
            objects["category"].append(int(rng.choice(CATEGORY_IDS)))
            objects["area"].append(w * h * 0.9)  # COCO areas are mask areas, not box areas
            objects["iscrowd"].append(1 if (i == 0 and j == 0) else 0)
        examples.append({"image_id": 100 + i, "width": width, "height": height, "objects": objects})
    return examples


def noisy_results(examples, seed=1):
    """post_process_object_detection-style results: jittered GT boxes, a few false positives."""
    rng = np.random.default_rng(seed)
    results = []
    for example in examples:
        boxes, labels, scores = [], [], []
        for (x, y, w, h), category in zip(example["objects"]["bbox"], example["objects"]["category"]):
            jitter = rng.normal(0, 0.08 * max(w, h), size=4)
            boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
            label = CATEGORY_IDS.index(category) if rng.uniform() > 0.15 else int(rng.integers(0, 3))
            labels.append(label)
            scores.append(rng.uniform(0.3, 1.0))
        for _ in range(3):
            x, y = rng.uniform(0, 500), rng.uniform(0, 350)
            boxes.append([x, y, x + rng.uniform(10, 120), y + rng.uniform(10, 120)])
            labels.append(int(rng.integers(0, 3)))
            scores.append(rng.uniform(0.0, 0.6))
        results.append(
            {"scores": torch.tensor(scores), "labels": torch.tensor(labels), "boxes": torch.tensor(boxes)}
        )
    return results


def perfect_results(examples):
    results = []
    for example in examples:
        boxes = [[x, y, x + w, y + h] for x, y, w, h in example["objects"]["bbox"]]
        labels = [CATEGORY_IDS.index(c) for c in example["objects"]["category"]]
        results.append({"scores": torch.ones(len(boxes)), "labels": torch.tensor(labels), "boxes": torch.tensor(boxes)})
    return results


def direct_cocoeval(examples, results, tmp_path):
    """The reference: COCO json files on disk, loadRes, COCOeval, with no hf_detr code involved."""
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": str(c)} for c in CATEGORY_IDS]}
    for example in examples:
        gt["images"].append({"id": example["image_id"], "width": example["width"], "height": example["height"]})
        objects = example["objects"]
        for k in range(len(objects["bbox"])):
            gt["annotations"].append(
                {
                    "id": objects["id"][k],
                    "image_id": example["image_id"],
                    "bbox": objects["bbox"][k],
                    "category_id": objects["category"][k],
                    "area": objects["area"][k],
                    "iscrowd": objects["iscrowd"][k],
                }
            )
    dets = []
    for example, result in zip(examples, results):
        for score, label, (x0, y0, x1, y1) in zip(
            result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()
        ):
            dets.append(
                {
                    "image_id": example["image_id"],
                    "category_id": CATEGORY_IDS[label],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": score,
                }
            )
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    coco_gt = COCO(str(tmp_path / "gt.json"))
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "dt.json")), "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return dict(zip(COCO_METRIC_NAMES, coco_eval.stats.tolist()))


def evaluate(examples, results, label_to_category=CATEGORY_IDS, categories=CATEGORY_IDS):
    evaluator = CocoEvaluator.from_examples(examples, categories, label_to_category=label_to_category)
    evaluator.update([e["image_id"] for e in examples], results)
    return evaluator.compute()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_direct_cocoeval(tmp_path, seed):
    examples = make_examples(num_images=8, seed=seed)
    results = noisy_results(examples, seed=seed + 10)
    ours = evaluate(examples, results)
    reference = direct_cocoeval(examples, results, tmp_path)
    assert list(ours) == list(COCO_METRIC_NAMES)
    assert ours == reference  # identical floats, not approximately equal
    assert 0.0 < ours["map"] < 1.0


def test_batched_updates_and_tensor_image_ids_match_one_update():
    examples = make_examples(num_images=8)
    results = noisy_results(examples)
    evaluator = CocoEvaluator.from_examples(examples, CATEGORY_IDS, label_to_category=CATEGORY_IDS)
    for start in range(0, 8, 3):
        ids = torch.tensor([e["image_id"] for e in examples[start : start + 3]])
        evaluator.update(ids, results[start : start + 3])
    assert evaluator.compute() == evaluate(examples, results)


def test_perfect_predictions_score_one():
    examples = make_examples(num_images=5)
    metrics = evaluate(examples, perfect_results(examples))
    for name in ("map", "map_50", "map_75", "mar_100", "map_small", "map_medium", "map_large"):
        assert metrics[name] == pytest.approx(1.0), name


def test_no_predictions_follow_cocoeval_semantics():
    examples = make_examples(num_images=4)
    # Only large objects: the small and medium area ranges have no ground truth -> -1, as COCOeval says.
    for example in examples:
        n = len(example["objects"]["bbox"])
        example["objects"] = {
            "id": list(range(n)),
            "bbox": [[10.0, 10.0, 200.0, 150.0]] * n,
            "category": [1] * n,
            "area": [30000.0] * n,
            "iscrowd": [0] * n,
        }
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    expected = {name: 0.0 for name in COCO_METRIC_NAMES} | {
        "map_small": -1.0, "map_medium": -1.0, "mar_small": -1.0, "mar_medium": -1.0,
    }  # fmt: skip
    assert evaluate(examples, [empty] * len(examples)) == expected
    # update never called: all ground-truth images are evaluated, with no detections.
    assert CocoEvaluator.from_examples(examples).compute() == expected


def test_shifted_box_counts_at_the_iou_thresholds_it_passes():
    # A 100x100 box shifted by 20 px: IoU = 80*100 / (120*100) = 0.667, a hit at thresholds
    # 0.50, 0.55, 0.60, 0.65 only -> AP averaged over the 10 thresholds = 0.4.
    examples = [
        {
            "image_id": 1,
            "width": 400,
            "height": 400,
            "objects": {
                "id": [1], "bbox": [[50.0, 50.0, 100.0, 100.0]], "category": [1], "area": [1e4], "iscrowd": [0],
            },  # fmt: skip
        }
    ]
    shifted_box = torch.tensor([[70.0, 50.0, 170.0, 150.0]])  # xyxy, +20 px in x
    shifted = {"scores": torch.tensor([0.9]), "labels": torch.tensor([0]), "boxes": shifted_box}
    metrics = evaluate(examples, [shifted], label_to_category=[1], categories=[1])
    assert metrics["map_50"] == pytest.approx(1.0)
    assert metrics["map_75"] == pytest.approx(0.0)
    assert metrics["map"] == pytest.approx(0.4)
    assert metrics["mar_100"] == pytest.approx(0.4)
    # area 1e4 > 96^2: a "large" object, so the medium range has no ground truth (-1 in COCOeval)
    assert metrics["map_large"] == pytest.approx(0.4)
    assert metrics["map_medium"] == -1.0


def test_detection_on_crowd_region_is_ignored_not_a_false_positive():
    examples = [
        {
            "image_id": 5,
            "width": 400,
            "height": 400,
            "objects": {
                "id": [1, 2],
                "bbox": [[10.0, 10.0, 100.0, 100.0], [200.0, 200.0, 150.0, 150.0]],
                "category": [1, 1],
                "area": [1e4, 2.25e4],
                "iscrowd": [0, 1],
            },
        }
    ]
    # The highest-scoring detection sits inside the crowd region.
    result = {
        "scores": torch.tensor([0.9, 0.5]),
        "labels": torch.tensor([0, 0]),
        "boxes": torch.tensor([[220.0, 220.0, 300.0, 300.0], [10.0, 10.0, 110.0, 110.0]]),
    }
    assert evaluate(examples, [result], [1], [1])["map"] == pytest.approx(1.0)
    # Without the crowd flag that detection would be a false positive ranked first.
    examples[0]["objects"]["iscrowd"] = [0, 0]
    assert evaluate(examples, [result], [1], [1])["map"] < 0.6


class _CategoryMap:
    def to_category(self, label):
        return CATEGORY_IDS[label]


@pytest.mark.parametrize(
    "label_to_category",
    [CATEGORY_IDS, dict(enumerate(CATEGORY_IDS)), _CategoryMap(), lambda label: CATEGORY_IDS[label]],
    ids=["list", "dict", "to_category", "callable"],
)
def test_label_to_category_forms(label_to_category):
    examples = make_examples()
    results = noisy_results(examples)
    assert evaluate(examples, results, label_to_category) == evaluate(examples, results)


def test_repeated_image_ids_are_counted_once():
    examples = make_examples()
    results = noisy_results(examples)
    evaluator = CocoEvaluator.from_examples(examples, CATEGORY_IDS, label_to_category=CATEGORY_IDS)
    evaluator.update([e["image_id"] for e in examples], results)
    # accelerate's even_batches pads the last batch by repeating samples: the repeats must not count.
    evaluator.update([examples[0]["image_id"]], perfect_results(examples[:1]))
    assert evaluator.compute() == evaluate(examples, results)


def test_only_updated_images_are_evaluated_and_reset():
    examples = make_examples(num_images=6)
    evaluator = CocoEvaluator.from_examples(examples, label_to_category=CATEGORY_IDS)
    evaluator.update([e["image_id"] for e in examples[:3]], perfect_results(examples[:3]))
    assert evaluator.compute()["map"] == pytest.approx(1.0)
    assert evaluator.compute()["map"] == pytest.approx(1.0)  # compute() can be repeated
    evaluator.reset()
    assert evaluator.compute()["map"] == 0.0


def test_ground_truth_ids_are_renumbered_from_one():
    # A gt annotation with id 0 would be read by COCOeval as "unmatched"; duplicates would collapse.
    examples = make_examples(num_images=2)
    for example in examples:
        example["objects"]["id"] = [0] * len(example["objects"]["bbox"])
    coco = coco_from_examples(examples)
    ids = [ann["id"] for ann in coco.dataset["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    assert evaluate(examples, perfect_results(examples))["map"] == pytest.approx(1.0)


def test_list_of_object_dicts_is_accepted():
    examples = make_examples()
    as_rows = [
        dict(e, objects=[dict(zip(e["objects"], values)) for values in zip(*e["objects"].values())])
        for e in examples
    ]
    results = noisy_results(examples)
    assert evaluate(as_rows, results) == evaluate(examples, results)


DISTRIBUTED_SCRIPT = """
import json, sys, torch
from accelerate import PartialState
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from test_evaluation import CATEGORY_IDS, make_examples, noisy_results
from hf_detr.evaluation import CocoEvaluator

state = PartialState(cpu=True)
examples = make_examples(num_images=7)
results = noisy_results(examples)
# Shard like an even_batches data loader: 7 images over 2 processes, rank 1 repeats image 0 as padding.
indices = [0, 2, 4, 6] if state.process_index == 0 else [1, 3, 5, 0]
evaluator = CocoEvaluator.from_examples(examples, CATEGORY_IDS, label_to_category=CATEGORY_IDS)
evaluator.update([examples[i]["image_id"] for i in indices], [results[i] for i in indices])
metrics = evaluator.compute()
with open({out!r} + f"/rank{{state.process_index}}.json", "w") as f:
    json.dump({{"metrics": metrics, "num_images": len(evaluator.predictions)}}, f)
"""


def run_two_processes(script_template, tmp_path):
    """Run a script under `torch.distributed.run` with 2 CPU processes (gloo); outputs go to tmp_path."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "run.py"
    paths = dict(repo=str(REPO_ROOT), tests=str(REPO_ROOT / "tests"), out=str(tmp_path))
    script.write_text(textwrap.dedent(script_template).format(**paths))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={port}", str(script),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_two_process_gather_deduplicates_and_matches_single_process(tmp_path):
    run_two_processes(DISTRIBUTED_SCRIPT, tmp_path)
    examples = make_examples(num_images=7)
    expected = evaluate(examples, noisy_results(examples))
    for rank in (0, 1):
        output = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert output["num_images"] == 7
        assert output["metrics"] == expected


# --- evaluate_model with a real (tiny, random) model --------------------------------------------------
# Ground truth = the model's own confident predictions, decoded by hand from logits / pred_boxes of
# single-image forward passes. evaluate_model must then score mAP 1.0: any slip in batching,
# target_sizes (height, width) order, box format or label -> category mapping lowers it.

EVAL_MODEL_SCRIPT = """
import json, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from accelerate import Accelerator
from test_evaluation import self_labelled_setup
from hf_detr.evaluation import evaluate_model

accelerator = Accelerator(cpu=True)
model, processor, examples = self_labelled_setup(num_images=7)
metrics = evaluate_model(model, processor, examples, CATEGORY_IDS, batch_size=2, accelerator=accelerator)
with open({out!r} + f"/rank{{accelerator.process_index}}.json", "w") as f:
    json.dump({{"metrics": metrics, "num_processes": accelerator.num_processes}}, f)
""".replace("CATEGORY_IDS", repr(CATEGORY_IDS))


def self_labelled_setup(num_images=5, width=120, height=80):
    import PIL.Image

    import hf_detr
    from conftest import tiny_config

    torch.manual_seed(0)
    config = tiny_config(num_labels=3, category_ids=CATEGORY_IDS)
    model = hf_detr.HfDetrForObjectDetection(config).eval()
    processor = hf_detr.HfDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    rng = np.random.default_rng(0)
    # One size for all images: batches need no padding, so batched outputs equal single-image ones.
    images = [PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(num_images)]
    with torch.no_grad():
        outputs = [model(**processor(images=[image], return_tensors="pt")) for image in images]
    # Score and label as DETR post-processing does: softmax, best class except the last ("no object").
    scores_labels = [out.logits[0].softmax(-1)[:, :-1].max(-1) for out in outputs]
    # One threshold over all images: COCOeval ranks detections across images, so every kept
    # (ground-truth) detection must outscore every dropped one, not only within its image.
    threshold = torch.cat([scores for scores, _ in scores_labels]).median()
    examples = []
    for i, (image, out, (scores, labels)) in enumerate(zip(images, outputs, scores_labels)):
        keep = scores > threshold
        cx, cy, w, h = out.pred_boxes[0][keep].unbind(-1)  # cxcywh, 0..1
        boxes = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height], -1)
        examples.append(
            {
                "image": image,
                "image_id": 500 + i,
                "width": width,
                "height": height,
                "objects": {
                    "id": list(range(len(boxes))),
                    "bbox": boxes.tolist(),
                    "category": [CATEGORY_IDS[label] for label in labels[keep].tolist()],
                    "area": (boxes[:, 2] * boxes[:, 3]).tolist(),
                    "iscrowd": [0] * len(boxes),
                },
            }
        )
    return model, processor, examples


@pytest.mark.parametrize("container", ["list", "datasets"])
def test_evaluate_model_scores_the_models_own_predictions_perfectly(container):
    from hf_detr.evaluation import evaluate_model

    model, processor, examples = self_labelled_setup()
    dataset = examples
    if container == "datasets":
        import datasets

        dataset = datasets.Dataset.from_list(examples).cast_column("image", datasets.Image())
    model.train()  # evaluate_model switches to eval mode and back
    metrics = evaluate_model(model, processor, dataset, _CategoryMap(), batch_size=2)
    assert model.training
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["mar_100"] == pytest.approx(1.0)
    # The same predictions against categories shifted by one label: nothing matches.
    shifted = [CATEGORY_IDS[1], CATEGORY_IDS[2], CATEGORY_IDS[0]]
    assert evaluate_model(model, processor, examples, shifted, batch_size=3)["map"] < 0.5


def test_evaluate_model_under_two_processes(tmp_path):
    # 7 images, 2 processes, batch 2: the sharded loader pads with repeated images; gather + dedup
    # must still score exactly the 7 images, each once.
    run_two_processes(EVAL_MODEL_SCRIPT, tmp_path)
    for rank in (0, 1):
        output = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert output["num_processes"] == 2
        assert output["metrics"]["map"] == pytest.approx(1.0)
