"""hf_detr.checkpoints: atomic saves that refuse NaN weights, step checkpoints and their limit, the best model,
and resuming (which checkpoint, the settings check, the training log cut back). End to end: tests/test_train.py
and the fault scenarios of tests/test_bad_inputs.py."""

import argparse
import json

import pytest
import torch
from accelerate import Accelerator

import hf_detr
from conftest import tiny_config
from hf_detr import checkpoints


@pytest.fixture
def model_and_processor():
    config = tiny_config()
    return hf_detr.HfDetrForObjectDetection(config), hf_detr.image_processor_for(config)


def test_save_model_writes_a_loadable_model_and_leaves_no_partial_folder(tmp_path, model_and_processor):
    model, processor = model_and_processor
    checkpoints.save_model(model, processor, tmp_path / "out")
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {f.name for f in (tmp_path / "out").iterdir()}
    assert not (tmp_path / "out" / "model.partial").exists()
    loaded = hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_non_finite_weights_are_never_saved(tmp_path, model_and_processor):
    model, processor = model_and_processor
    with torch.no_grad():
        model.model.heads.class_heads[0].bias[0] = float("nan")
    with pytest.raises(RuntimeError, match=r"not saving the best model: non-finite values in 1 weights, e.g. \[.model.heads.class_heads.0.bias.\]"):
        checkpoints.save_model(model, processor, tmp_path / "out", "the best model")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_step_checkpoints_are_whole_and_only_the_latest_are_kept(tmp_path, model_and_processor):
    model, processor = model_and_processor
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    for step in (1, 2, 3):
        checkpoints.save_checkpoint(accelerator, model, processor, tmp_path, f"step_{step}", {"seed": 3}, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_3"]
    assert json.loads((tmp_path / "step_3" / "train_args.json").read_text()) == {"seed": 3}
    hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path / "step_3")


def test_best_model_keeps_the_best_value_so_far(tmp_path, model_and_processor):
    model, processor = model_and_processor
    accelerator = Accelerator(cpu=True)
    best = checkpoints.BestModel(tmp_path, "map")
    assert best.summary() is None
    assert best.update(accelerator, model, processor, {"map": 0.2, "map_50": 0.5}, step=1)
    assert not best.update(accelerator, model, processor, {"map": 0.1}, step=2)
    assert not best.update(accelerator, model, processor, {"map": 0.2}, step=3)  # not better: the first stays
    assert best.update(accelerator, model, processor, {"map": 0.3}, step=4)
    assert best.summary() == {"step": 4, "map": 0.3, "path": "best_model"}
    assert json.loads((tmp_path / "best_model" / "eval_results.json").read_text()) == {"map": 0.3, "train_steps": 4}
    hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path / "best_model")


def test_a_checkpoint_left_half_written_by_a_kill_is_not_resumed_from(tmp_path):
    (tmp_path / "step_2").mkdir()
    (tmp_path / "step_4.partial").mkdir()  # save_state was killed while writing step 4
    assert checkpoints.find_checkpoint(tmp_path, "latest") == tmp_path / "step_2"
    (tmp_path / "step_10").mkdir()
    assert checkpoints.find_checkpoint(tmp_path, "latest") == tmp_path / "step_10"  # by step, not by name
    assert checkpoints.find_checkpoint(tmp_path, str(tmp_path / "step_2")) == tmp_path / "step_2"
    with pytest.raises(FileNotFoundError, match="no step_\\* checkpoint in"):
        checkpoints.find_checkpoint(tmp_path / "step_2", "latest")


def test_resume_refuses_other_data_order_settings_by_name(tmp_path):
    args = argparse.Namespace(dataset_name=None, train_split="train", synthetic_train_images=16, per_device_train_batch_size=4,
                              gradient_accumulation_steps=1, seed=3, hub_token="secret", learning_rate=1e-4)  # fmt: skip
    settings = checkpoints.run_settings(args, num_processes=1, num_train_images=16)
    assert "hub_token" not in settings and settings["num_processes"] == 1 and settings["train_images"] == 16
    (tmp_path / "train_args.json").write_text(json.dumps(settings))
    checkpoints.check_resume_settings(tmp_path, {**settings, "learning_rate": 1e-5})  # not a data-order setting
    with pytest.raises(ValueError, match=r"differ from the run that wrote it: num_processes \(checkpoint 1, now 2\), seed \(checkpoint 3, now 4\)\."):
        checkpoints.check_resume_settings(tmp_path, {**settings, "seed": 4, "num_processes": 2})


def test_the_training_log_is_cut_back_to_the_checkpoint_step(tmp_path):
    log_file = tmp_path / "train_log.jsonl"
    assert checkpoints.truncate_log(log_file, 2) == []
    lines = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None, "skipped": "non-finite loss"}, {"step": 3, "loss": 1.0}]
    log_file.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 4, "lo')  # cut short by a kill
    assert checkpoints.truncate_log(log_file, 2) == lines[:2]
    assert [json.loads(line) for line in log_file.read_text().splitlines()] == lines[:2]
