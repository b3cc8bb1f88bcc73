"""scripts/train.py end to end under `accelerate launch`, a few steps on tiny data."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_detr
from conftest import load_train_script, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "--synthetic_train_images", "16", "--synthetic_val_images", "6", "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "6", "--image_size", "64", "--max_size", "64", "--seed", "3",
]  # fmt: skip


def free_port() -> int:
    """A port no other test's process group is using (pytest-xdist runs tests side by side)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, *args, num_processes=1):
    env = {**os.environ, "HF_DETR_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # accelerate 1.x's `--cpu` always starts a single process; several CPU processes come from its
    # torchrun launcher (`--multi_gpu`), which train.py joins into one gloo group when there is no GPU.
    mode = ["--cpu"] if num_processes == 1 else ["--multi_gpu", "--main_process_port", str(free_port())]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "scripts" / "train.py"), *args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
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
    launch(
        tmp_path, *TINY_RUN, "--max_train_steps", "3", "--output_dir", str(output_dir), "--with_tracking",
        "--eval_strategy", "steps", "--eval_steps", "1", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
    )  # fmt: skip
    check_output_dir(output_dir, 3)
    assert list((output_dir / "logs").rglob("events.out.tfevents*")), "no TensorBoard log"
    results = json.loads((output_dir / "eval_results.json").read_text())
    # per class, as transformers' object-detection examples name them
    for name in ("rectangle", "ellipse", "triangle"):
        assert -1 <= results[f"map_{name}"] <= 1 and -1 <= results[f"mar_100_{name}"] <= 1
    # --checkpoints_total_limit 2: the latest two step checkpoints; each loads as a model
    assert sorted(p.name for p in output_dir.glob("step_*")) == ["step_2", "step_3"]
    # the best model by map over the evaluations (steps 1, 2 and the final one), in best_model/
    best = results["best_model"]
    assert best["path"] == "best_model" and best["step"] in (1, 2, 3) and best["map"] >= results["map"]
    best_results = json.loads((output_dir / "best_model" / "eval_results.json").read_text())
    assert best_results["map"] == best["map"] and best_results["train_steps"] == best["step"]
    hf_detr.HfDetrForObjectDetection.from_pretrained(output_dir / "best_model")
    # scripts/evaluate.py on the last intermediate checkpoint (the trained model: step 3 is the last) and the
    # same split reproduces the training run's numbers
    metrics_file = tmp_path / "metrics.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model_name_or_path", str(output_dir / "step_3"),
         "--dataset_name", str(tmp_path / "cache" / "synthetic-16-6"), "--eval_split", "val", "--output_file", str(metrics_file)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((output_dir / "eval_results.json").read_text())
    evaluated = json.loads(metrics_file.read_text())
    for key in ("map", "map_50", "mar_100", "map_rectangle", "mar_100_triangle"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-6), key
    from PIL import Image
    from transformers import pipeline

    assert pipeline("object-detection", model=str(output_dir / "step_2"), threshold=0.0)(Image.new("RGB", (64, 64)))


def test_two_processes_count_their_steps_after_sharding_and_resume_mid_epoch(tmp_path):
    """2 processes, 12 images, batch 4, 2 epochs and no --max_train_steps: each process gets 2 batches per epoch
    (accelerate fills the last one), so 2 * ceil(12 / (4 * 2)) = 4 steps; counted before sharding, the run did
    1 step per epoch (and with --max_train_steps the LR drop came twice as early). The LR drops after step
    int(4 * 0.8) = 3 (the built-in run's drop fraction), the final evaluation runs, and a run resumed from step 3 (mid epoch 1) repeats step 4."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run = [*TINY_RUN, "--synthetic_train_images", "12", "--num_train_epochs", "2"]
    result = launch(tmp_path, *run, "--checkpointing_steps", "3", "--output_dir", str(full), num_processes=2)
    output = result.stderr + result.stdout
    assert "2 process(es), DistributedType.MULTI_CPU" in output
    assert "12 training images, 2 steps per epoch on each of 2 process(es) (batch 4 each), 4 steps in 2 epochs" in output
    check_output_dir(full, 4)
    log = read_log(full)
    assert [log[step]["lr"] for step in (1, 2, 3, 4)] == pytest.approx([5e-4, 5e-4, 5e-4, 5e-5])
    assert "the learning rate drops 10x after step 3" in output
    resumed.mkdir()
    shutil.copytree(full / "step_3", resumed / "step_3")
    result = launch(tmp_path, *run, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest", num_processes=2)
    assert "at step 3 (epoch 1, 1 steps into it)" in result.stderr + result.stdout
    assert set(read_log(resumed)) == {4}
    assert read_log(resumed)[4]["loss"] == pytest.approx(log[4]["loss"], rel=1e-5)
    assert json.loads((resumed / "eval_results.json").read_text())["train_steps"] == 4


def test_resumed_run_reaches_the_same_loss_and_average_as_an_uninterrupted_one(tmp_path):
    """A run resumed from step_2 trains steps 3 and 4 as the uninterrupted run did. With --ema_decay the final
    model (and every evaluation and best model) is the average of the weights, which the checkpoint carries: the
    resumed run ends with the uninterrupted one's average; the model card says so."""
    from safetensors.torch import load_file

    ema_run = [*TINY_RUN, "--max_train_steps", "4", "--ema_decay", "0.9", "--ema_warmup_steps", "1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(tmp_path, *ema_run, "--checkpointing_steps", "2", "--output_dir", str(full))
    assert (full / "step_2").is_dir() and (full / "step_4").is_dir()
    assert not list(full.glob("*.partial")), "a checkpoint was left half-written"
    resumed.mkdir()
    shutil.copytree(full / "step_2", resumed / "step_2")
    launch(tmp_path, *ema_run, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest")
    full_log, resumed_log = read_log(full), read_log(resumed)
    assert set(resumed_log) == {3, 4}
    for step in (3, 4):
        assert resumed_log[step]["loss"] == pytest.approx(full_log[step]["loss"], rel=1e-5), step
    # the final model is the average: not step_4's trained weights (what a resume continues from), and the same
    # average after a resume
    averaged, resumed_average, trained = (load_file(folder / "model.safetensors") for folder in (full, resumed, full / "step_4"))
    moved = [name for name, value in trained.items() if value.is_floating_point() and not torch.equal(value, averaged[name])]
    assert len(moved) > 50
    for name, value in averaged.items():
        torch.testing.assert_close(resumed_average[name], value, rtol=1e-5, atol=1e-6, msg=name)
    card = (full / "README.md").read_text()
    assert "exponential moving average of the trained" in card and "decay 0.9" in card


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A local folder as scripts/convert_detr_checkpoint.py leaves it: its config names the Hub model it was
    converted from."""
    folder = tmp_path / "tiny"
    hf_detr.HfDetrForObjectDetection(tiny_config(freeze_backbone_stages=0, converted_from="facebook/detr-resnet-50")).save_pretrained(folder)
    return folder


def test_local_coco_folder_trains_from_a_transformers_detr_checkpoint(tmp_path):
    """--model_name_or_path a folder as transformers' DetrForObjectDetection saves it (ints for its float
    config fields: class_cost=1, as in facebook/detr-resnet-50) converts on the fly, says so, and fine-tunes;
    scripts/evaluate.py evaluates such a folder the same way."""
    from transformers import DetrConfig, DetrForObjectDetection

    from conftest import TINY_SIZES, tiny_backbone_config
    from hf_detr.data import make_synthetic_coco

    detr = tmp_path / "transformers_detr"
    config = DetrConfig(backbone_config=tiny_backbone_config(), use_timm_backbone=False, **TINY_SIZES)
    DetrForObjectDetection(config).save_pretrained(detr)
    assert json.loads((detr / "config.json").read_text())["class_cost"] == 1
    coco = make_synthetic_coco(tmp_path / "coco", num_train=8, num_val=4, image_size=64, seed=1)
    output_dir = tmp_path / "run"
    result = launch(
        tmp_path, "--dataset_name", str(coco), "--train_split", "train", "--eval_split", "val",
        "--model_name_or_path", str(detr), "--image_size", "64", "--max_size", "64",
        "--per_device_train_batch_size", "4", "--max_train_steps", "2", "--output_dir", str(output_dir),
    )  # fmt: skip
    assert f"{detr} is a transformers 'detr' checkpoint: converting it to hf_detr on the fly" in result.stderr
    check_output_dir(output_dir, 2)
    config = hf_detr.HfDetrConfig.from_pretrained(output_dir)
    assert config.category_ids == [1, 3, 7] and config.id2label == {0: "rectangle", 1: "ellipse", 2: "triangle"}
    assert config.converted_from == str(detr)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model_name_or_path", str(detr),
         "--dataset_name", str(coco), "--eval_split", "val"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{detr} is a transformers 'detr' checkpoint: converting it to hf_detr on the fly" in result.stderr
    assert -1 <= json.loads(result.stdout)["map"] <= 1


def test_hub_schema_dataset_with_a_training_split_only(tmp_path, tiny_checkpoint):
    """A Hub-schema dataset with only a train split: --train_val_split of it is held out for evaluation (as in
    transformers' examples), --max_train_samples takes the first images of the rest."""
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
    for i in range(8):
        image = Image.new("RGB", (72, 56), (30 * i, 90, 160))
        rows.append({"image": image, "image_id": i, "width": 72, "height": 56,
                     "objects": {"id": [10 * i], "area": [300.0], "bbox": [[5.0 + i, 6.0, 20.0, 15.0]], "category": [i % 2]}})  # fmt: skip
    folder = tmp_path / "hub_dataset"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "data" / "train.parquet"))
    output_dir = tmp_path / "run"
    result = launch(
        tmp_path, "--dataset_name", str(folder), "--model_name_or_path", str(tiny_checkpoint),
        "--image_size", "64", "--max_size", "64", "--per_device_train_batch_size", "3", "--max_train_steps", "2",
        "--train_val_split", "0.25", "--max_train_samples", "4", "--output_dir", str(output_dir),
    )  # fmt: skip
    assert "has no 'validation' split" in result.stderr and "holding out --train_val_split 0.25 of 'train'" in result.stderr
    check_output_dir(output_dir, 2)
    assert hf_detr.HfDetrConfig.from_pretrained(output_dir).id2label == {0: "cat", 1: "dog"}
    stats = json.loads((output_dir / "eval_results.json").read_text())["data_stats"]
    assert stats["train"]["images"] == 4 and stats["eval"]["images"] == 2
    # the model card names the Hub model the local converted folder came from, as transformers' Trainer card does
    from huggingface_hub import ModelCard

    card = ModelCard.load(output_dir / "README.md")
    assert card.data.base_model == "facebook/detr-resnet-50" and "## Framework versions" in card.text


def test_the_lr_drop_defaults_to_detrs_with_a_dataset_and_to_the_built_in_runs_without():
    train_script = load_train_script()
    fraction = lambda *argv: train_script.apply_defaults(train_script.parse_args(list(argv))).lr_drop_fraction  # noqa: E731
    assert fraction("--dataset_name", "/data/coco") == pytest.approx(2 / 3)  # DETR: 200 of 300 epochs
    assert fraction() == 0.8  # the built-in run's recipe (BENCHMARKS.md)
    assert fraction("--lr_drop_fraction", "0.5") == fraction("--dataset_name", "/data/coco", "--lr_drop_fraction", "0.5") == 0.5


def test_synthetic_style_picks_the_built_in_data_and_enough_queries_for_it(tmp_path, monkeypatch, capsys):
    """--synthetic_style (no --dataset_name) reaches the data, the model card's dataset label and the model's
    queries; the default is the set the built-in recipe was tuned on, with the model as it was."""
    from accelerate import PartialState

    monkeypatch.setenv("HF_DETR_CACHE", str(tmp_path))
    PartialState(cpu=True)  # train.py logs through accelerate's logger
    train_script = load_train_script()
    sizes = ["--synthetic_train_images", "3", "--synthetic_val_images", "2"]
    for argv, names, label, num_queries in (
        ([], ["rectangle", "ellipse", "triangle"], "hf_detr synthetic shapes", 10),
        (["--synthetic_style", "clutter"], ["star", "ring", "diamond", "bar"], "hf_detr synthetic clutter", 30),
    ):
        args = train_script.apply_defaults(train_script.parse_args(sizes + argv))
        (train, _), categories, dataset_label = train_script.load_data(args, PartialState())
        assert (categories.names, dataset_label, len(train)) == (names, label, 3)
        assert train_script.build_model(args, categories).config.num_queries == num_queries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic-3-2", "synthetic-clutter-3-2"]
    with pytest.raises(SystemExit):
        train_script.parse_args(["--synthetic_style", "stripes"])
    assert "invalid choice: 'stripes'" in capsys.readouterr().err


def test_help_lists_the_example_scripts_argument_names():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names = [
        "--dataset_name", "--dataset_config_name", "--output_dir", "--model_name_or_path", "--config_name",
        "--config_overrides", "--image_processor_name", "--cache_dir", "--trust_remote_code", "--max_train_samples",
        "--max_eval_samples", "--train_val_split", "--max_train_steps", "--num_train_epochs",
        "--per_device_train_batch_size", "--per_device_eval_batch_size", "--learning_rate", "--lr_scheduler_type",
        "--num_warmup_steps", "--adam_beta1", "--adam_beta2", "--adam_epsilon", "--dataloader_num_workers",
        "--ignore_mismatched_sizes", "--checkpointing_steps", "--checkpoints_total_limit", "--resume_from_checkpoint",
        "--eval_strategy", "--eval_steps", "--metric_for_best_model", "--push_to_hub", "--hub_model_id",
        "--with_tracking", "--seed", "--label_names",
    ]  # fmt: skip
    missing = [name for name in names if name not in result.stdout]
    assert not missing, missing


def test_config_name_and_image_processor_name(tmp_path):
    """--config_name: an hf_detr config or a transformers DETR one (mapped), then the run's labels and
    --config_overrides, checked together; --image_processor_name: that processor instead of the default."""
    from accelerate import PartialState
    from transformers import DetrConfig

    from conftest import TINY_SIZES, tiny_backbone_config
    from hf_detr.data import CategoryMap

    PartialState(cpu=True)  # train.py logs through accelerate's logger
    train_script = load_train_script()
    categories = CategoryMap([1, 3, 7], ["a", "b", "c"])
    DetrConfig(backbone_config=tiny_backbone_config(), use_timm_backbone=False, **TINY_SIZES).save_pretrained(tmp_path / "detr")
    tiny_config(d_model=64, encoder_attention_heads=2, decoder_attention_heads=2).save_pretrained(tmp_path / "hf_detr")
    processor = hf_detr.HfDetrImageProcessor(size={"shortest_edge": 40, "longest_edge": 50})
    processor.save_pretrained(tmp_path / "processor")
    for name, d_model in (("detr", TINY_SIZES["d_model"]), ("hf_detr", 64)):
        argv = ["--dataset_name", "unused", "--config_name", str(tmp_path / name), "--config_overrides", "num_queries=7"]
        args = train_script.apply_defaults(train_script.parse_args(argv))
        model = train_script.build_model(args, categories)
        config = model.config
        assert (config.d_model, config.num_queries, config.num_labels, config.category_ids) == (d_model, 7, 3, [1, 3, 7]), name
        assert model.model.heads.class_heads[0].out_features == 4
    args = train_script.apply_defaults(train_script.parse_args(["--image_processor_name", str(tmp_path / "processor")]))
    assert train_script.build_image_processor(args, config).size == processor.size
    with pytest.raises(ValueError, match="config_name .*: a 'resnet' config"):
        tiny_backbone_config().save_pretrained(tmp_path / "resnet")
        train_script.build_model(train_script.apply_defaults(train_script.parse_args(["--config_name", str(tmp_path / "resnet")])), categories)


def test_fine_tuning_from_a_checkpoint_whose_classes_are_in_another_order_keeps_each_class(tmp_path, caplog):
    """--model_name_or_path whose classes are the dataset's under other ids and in another order: each class head
    row follows its class by name (hf_detr.labels.class_head_rows, the rule scripts/evaluate.py scores by);
    loaded by index, the checkpoint's 'cat' row went on training as 'bird' without a word."""
    import logging

    import torch
    from accelerate import PartialState

    from hf_detr.data import CategoryMap

    PartialState(cpu=True)  # train.py logs through accelerate's logger
    train_script = load_train_script()
    checkpoint = tmp_path / "checkpoint"
    hf_detr.HfDetrForObjectDetection(tiny_config(num_labels=3, id2label={0: "cat", 1: "dog", 2: "bird"}, category_ids=[1, 3, 7])).save_pretrained(checkpoint)
    saved = hf_detr.HfDetrForObjectDetection.from_pretrained(checkpoint).model.heads.class_heads[0].weight
    args = train_script.apply_defaults(train_script.parse_args(["--dataset_name", "hub-copy", "--model_name_or_path", str(checkpoint)]))
    args.train_split = "train"
    with caplog.at_level(logging.WARNING):
        model = train_script.build_model(args, CategoryMap.from_names(["bird", "cat", "dog"]))
    weight = model.model.heads.class_heads[0].weight
    assert [torch.equal(weight[label], saved[row]) for label, row in ((0, 2), (1, 0), (2, 1), (3, 3))] == [True] * 4
    assert model.config.id2label == {0: "bird", 1: "cat", 2: "dog"}
    assert f"{checkpoint}'s classes are in another order than hub-copy [train]'s: the class head rows follow the classes by name" in caplog.text
