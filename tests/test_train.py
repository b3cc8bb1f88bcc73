"""scripts/train.py end to end under `accelerate launch`, a few steps on tiny data."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_detr
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "--synthetic_train_images", "16", "--synthetic_val_images", "6", "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "6", "--image_size", "64", "--max_size", "64", "--seed", "3",
]  # fmt: skip


def launch(tmp_path, *args, num_processes=1):
    env = {**os.environ, "HF_DETR_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # accelerate 1.x's `--cpu` always starts a single process; several CPU processes come from its
    # torchrun launcher (`--multi_gpu`), which train.py joins into one gloo group when there is no GPU.
    mode = "--cpu" if num_processes == 1 else "--multi_gpu"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", mode, "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "scripts" / "train.py"), *args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def read_log(output_dir):
    lines = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines}


def check_output_dir(output_dir, steps):
    results = json.loads((output_dir / "eval_results.json").read_text())
    for key in ("map", "map_50", "map_75", "map_small", "mar_100"):
        assert isinstance(results[key], float), key
    assert results["train_steps"] == steps
    log = read_log(output_dir)
    assert set(log) == set(range(1, steps + 1))
    # finite at every step (runs from --model_name_or_path start from resized, freshly initialised heads)
    assert all(math.isfinite(line["loss"]) for line in log.values()), [line["loss"] for line in log.values()]
    card = (output_dir / "README.md").read_text()
    assert "object-detection" in card and "pipeline(" in card and f"{results['map']:.4f}"[:4] in card
    model = hf_detr.HfDetrForObjectDetection.from_pretrained(output_dir)
    assert model.config.category_ids is not None and len(model.config.id2label) == model.config.num_labels
    from transformers import pipeline
    from PIL import Image

    detections = pipeline("object-detection", model=str(output_dir), threshold=0.0)(Image.new("RGB", (80, 60), "white"))
    assert all(d["label"] in model.config.id2label.values() for d in detections)


def test_default_run_in_one_process(tmp_path):
    output_dir = tmp_path / "run"
    launch(tmp_path, *TINY_RUN, "--max_train_steps", "3", "--output_dir", str(output_dir), "--with_tracking")
    check_output_dir(output_dir, 3)
    assert list((output_dir / "logs").rglob("events.out.tfevents*")), "no TensorBoard log"
    # scripts/evaluate.py on the same checkpoint and split reproduces the training run's numbers
    metrics_file = tmp_path / "metrics.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model_name_or_path", str(output_dir),
         "--dataset_name", str(tmp_path / "cache" / "synthetic-16-6"), "--split", "val", "--output_file", str(metrics_file)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((output_dir / "eval_results.json").read_text())
    evaluated = json.loads(metrics_file.read_text())
    for key in ("map", "map_50", "mar_100"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-6), key


def test_two_processes(tmp_path):
    output_dir = tmp_path / "run"
    result = launch(tmp_path, *TINY_RUN, "--max_train_steps", "2", "--output_dir", str(output_dir), num_processes=2)
    assert "2 process(es), DistributedType.MULTI_CPU" in result.stderr + result.stdout
    check_output_dir(output_dir, 2)


def test_resumed_run_reaches_the_same_loss_as_an_uninterrupted_one(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(tmp_path, *TINY_RUN, "--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", str(full))
    assert (full / "step_2").is_dir() and (full / "step_4").is_dir()
    assert not list(full.glob("*.partial")), "a checkpoint was left half-written"
    resumed.mkdir()
    shutil.copytree(full / "step_2", resumed / "step_2")
    launch(tmp_path, *TINY_RUN, "--max_train_steps", "4", "--output_dir", str(resumed), "--resume_from_checkpoint", "latest")
    full_log, resumed_log = read_log(full), read_log(resumed)
    assert set(resumed_log) == {3, 4}
    for step in (3, 4):
        assert resumed_log[step]["loss"] == pytest.approx(full_log[step]["loss"], rel=1e-5), step


@pytest.fixture
def tiny_checkpoint(tmp_path):
    folder = tmp_path / "tiny"
    hf_detr.HfDetrForObjectDetection(tiny_config(freeze_backbone_stages=0)).save_pretrained(folder)
    return folder


def test_local_coco_folder_trains_and_evaluates(tmp_path, tiny_checkpoint):
    from hf_detr.data import make_synthetic_coco

    coco = make_synthetic_coco(tmp_path / "coco", num_train=8, num_val=4, image_size=64, seed=1)
    output_dir = tmp_path / "run"
    launch(
        tmp_path, "--dataset_name", str(coco), "--train_split", "train", "--eval_split", "val",
        "--model_name_or_path", str(tiny_checkpoint), "--image_size", "64", "--max_size", "64",
        "--per_device_train_batch_size", "4", "--max_train_steps", "2", "--output_dir", str(output_dir),
    )  # fmt: skip
    check_output_dir(output_dir, 2)
    config = hf_detr.HfDetrConfig.from_pretrained(output_dir)
    assert config.category_ids == [1, 3, 7] and config.id2label == {0: "rectangle", 1: "ellipse", 2: "triangle"}


def test_hub_schema_dataset_trains_and_evaluates(tmp_path, tiny_checkpoint):
    import datasets
    from PIL import Image

    features = datasets.Features({
        "image": datasets.Image(), "image_id": datasets.Value("int64"), "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "objects": {
            "id": datasets.Sequence(datasets.Value("int64")), "area": datasets.Sequence(datasets.Value("float32")),
            "bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
            "category": datasets.Sequence(datasets.ClassLabel(names=["cat", "dog"])),
        },
    })  # fmt: skip
    rows = []
    for i in range(6):
        image = Image.new("RGB", (72, 56), (40 * i, 90, 160))
        rows.append({"image": image, "image_id": i, "width": 72, "height": 56,
                     "objects": {"id": [10 * i], "area": [300.0], "bbox": [[5.0 + i, 6.0, 20.0, 15.0]], "category": [i % 2]}})  # fmt: skip
    folder = tmp_path / "hub_dataset"
    for split in ("train", "validation"):
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "data" / f"{split}.parquet"))
    output_dir = tmp_path / "run"
    launch(
        tmp_path, "--dataset_name", str(folder), "--model_name_or_path", str(tiny_checkpoint),
        "--image_size", "64", "--max_size", "64", "--per_device_train_batch_size", "3", "--max_train_steps", "2",
        "--output_dir", str(output_dir),
    )  # fmt: skip
    check_output_dir(output_dir, 2)
    assert hf_detr.HfDetrConfig.from_pretrained(output_dir).id2label == {0: "cat", 1: "dog"}
