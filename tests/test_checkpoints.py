"""hf_detr.checkpoints: atomic saves that refuse NaN weights and say when the disk is full, step checkpoints and
their limit (the run's own only), the best model (restored on resume), and resuming (which checkpoint, the
arguments and model checks, the training log cut back). End to end: tests/test_train.py
and the fault scenarios of tests/test_bad_inputs.py."""

import argparse
import errno
import json
import logging

import pytest
import torch
from accelerate import Accelerator

import hf_detr
from conftest import tiny_backbone_config, tiny_config
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


def fake_checkpoint(folder, run_id="run-a", step=None, **settings):
    """A folder with what --resume_from_checkpoint needs (empty files) and the run's train_args.json."""
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin"):
        (folder / name).write_bytes(b"")
    (folder / "train_args.json").write_text(json.dumps({"run_id": run_id, **settings}))
    if step is not None:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_step_checkpoints_are_whole_and_only_the_runs_latest_are_kept(tmp_path, model_and_processor):
    """--checkpoints_total_limit deletes the run's own oldest step_N checkpoints: never another run's, never a
    folder not named step_<N> (issue 25: a stray step_backup broke the rotation, and it deleted another run's)."""
    model, processor = model_and_processor
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    fake_checkpoint(tmp_path / "step_1", run_id="another-run")
    (tmp_path / "step_backup").mkdir()
    for step in (1, 2, 3):
        checkpoints.save_checkpoint(accelerator, model, processor, tmp_path, step, {"seed": 3, "run_id": "run-a"}, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_3", "step_backup"]
    fake_checkpoint(tmp_path / "step_0", run_id="another-run")
    checkpoints.save_checkpoint(accelerator, model, processor, tmp_path, 4, {"seed": 3, "run_id": "run-a"}, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0", "step_3", "step_4", "step_backup"]
    assert json.loads((tmp_path / "step_4" / "train_args.json").read_text()) == {"seed": 3, "run_id": "run-a"}
    assert json.loads((tmp_path / "step_4" / "trainer_state.json").read_text()) == {"global_step": 4}
    hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path / "step_4")


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]  # replaced whole: no .partial / .old left
    hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path / "best_model")


def test_the_best_model_so_far_travels_in_each_checkpoint_and_a_resumed_run_only_replaces_it_with_a_better_one(tmp_path, caplog):
    """issue 25: a resumed run forgot the best metric and overwrote best_model/ with a worse model."""
    from accelerate.utils import DataLoaderConfiguration

    config = tiny_config()
    processor = hf_detr.image_processor_for(config)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    model = hf_detr.HfDetrForObjectDetection(config)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    best = checkpoints.BestModel(tmp_path, "map")
    best.update(accelerator, model, processor, {"map": 0.3}, step=1)
    best.update(accelerator, model, processor, {"map": 0.25}, step=2)
    settings = {"seed": 3, "run_id": "run-a"}
    checkpoints.save_checkpoint(accelerator, model, processor, tmp_path, 2, settings, best=best)
    assert json.loads((tmp_path / "step_2" / "trainer_state.json").read_text()) == {
        "global_step": 2, "metric_for_best_model": "map", "best_metric": 0.3, "best_global_step": 1, "best_model_checkpoint": "best_model",
    }  # fmt: skip
    # the resumed run (its own BestModel): the checkpoint's arguments and model are this run's, its state loads
    resumed = checkpoints.resume(accelerator, tmp_path / "step_2", settings, config, tmp_path / "train_log.jsonl", steps_per_epoch=4)
    assert (resumed.step, resumed.skipped_nonfinite_steps) == (2, 0)
    best = checkpoints.BestModel(tmp_path, "map")
    best.restore(resumed.state, tmp_path / "step_2")
    assert not best.update(accelerator, model, processor, {"map": 0.28}, step=3)  # worse than step 1's: kept
    assert json.loads((tmp_path / "best_model" / "eval_results.json").read_text()) == {"map": 0.3, "train_steps": 1}
    assert best.summary() == {"step": 1, "map": 0.3, "path": "best_model"}
    assert best.update(accelerator, model, processor, {"map": 0.4}, step=4)
    # best_model/ holds a later step of the interrupted run than the checkpoint's best (the resumed run trains it
    # again): it stays the best so far
    best = checkpoints.BestModel(tmp_path, "map")
    with caplog.at_level(logging.WARNING):
        best.restore(resumed.state, tmp_path / "step_2")
    assert (best.best, best.step) == (0.4, 4) and "holds the model of step 4, not the best of" in caplog.text
    # resumed into another folder (no best_model/ there): the best model is chosen afresh, never named where it is not
    other = checkpoints.BestModel(tmp_path / "other", "map")
    other.restore(resumed.state, tmp_path / "step_2")
    assert other.summary() is None and "is not in" in caplog.text


def test_a_full_disk_while_checkpointing_says_so_and_leaves_the_earlier_checkpoint_intact(tmp_path, model_and_processor, monkeypatch):
    """issue 25: a full disk surfaced as torch's `unexpected pos 307520 vs 307440`, without "no space left"."""
    model, processor = model_and_processor
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    settings = {"seed": 3, "run_id": "run-a"}
    checkpoints.save_checkpoint(accelerator, model, processor, tmp_path, 2, settings)
    before = {f.name: f.read_bytes() for f in (tmp_path / "step_2").iterdir()}
    save_state = accelerator.save_state
    failures = [
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 307520 vs 307440"),  # torch.save's zip writer
        OSError(errno.ENOSPC, "No space left on device"),
    ]
    for failure in failures:

        def full_disk(output_dir, **kwargs):
            save_state(output_dir, **kwargs)  # part of it written, then the disk is full
            raise failure

        monkeypatch.setattr(accelerator, "save_state", full_disk)
        with pytest.raises(OSError, match=(
            rf"no space left on device: writing checkpoint step_4 to {tmp_path} failed \(\d+ MiB free there now\); the "
            rf"checkpoint was not written; {tmp_path / 'step_2'} is intact \(--resume_from_checkpoint latest resumes from it\)"
        )) as error:  # fmt: skip
            checkpoints.save_checkpoint(accelerator, model, processor, tmp_path, 4, settings)
        assert error.value.errno == errno.ENOSPC and str(failure) in str(error.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]  # no step_4, no step_4.partial
        assert {f.name: f.read_bytes() for f in (tmp_path / "step_2").iterdir()} == before
    # any other error is left as it is (the temporary folder still goes)
    monkeypatch.setattr(accelerator, "save_state", lambda output_dir, **kwargs: (_ for _ in ()).throw(PermissionError("denied")))
    with pytest.raises(PermissionError, match="denied"):
        checkpoints.save_checkpoint(accelerator, model, processor, tmp_path, 4, settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]


def test_a_full_disk_while_saving_the_best_model_keeps_the_earlier_one(tmp_path, model_and_processor, monkeypatch):
    model, processor = model_and_processor
    accelerator = Accelerator(cpu=True)
    best = checkpoints.BestModel(tmp_path, "map")
    best.update(accelerator, model, processor, {"map": 0.2}, step=1)
    monkeypatch.setattr(model, "save_pretrained", lambda *args, **kwargs: (_ for _ in ()).throw(
        Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")
    ))  # fmt: skip
    with pytest.raises(OSError, match=rf"no space left on device: writing the best model to {tmp_path / 'best_model'} failed .*keeps the best model before it"):
        best.update(accelerator, model, processor, {"map": 0.3}, step=2)
    assert json.loads((tmp_path / "best_model" / "eval_results.json").read_text()) == {"map": 0.2, "train_steps": 1}
    assert best.summary() == {"step": 1, "map": 0.2, "path": "best_model"} and sorted(p.name for p in tmp_path.iterdir()) == ["best_model"]


def test_latest_is_the_runs_whole_step_checkpoint_of_the_highest_step(tmp_path):
    fake_checkpoint(tmp_path / "step_2")
    (tmp_path / "step_4.partial").mkdir()  # save_state was killed while writing step 4
    (tmp_path / "step_backup").mkdir()  # issue 25: int('backup') broke `latest`
    fake_checkpoint(tmp_path / "step_3.old")
    assert checkpoints.find_checkpoint(tmp_path, "latest") == tmp_path / "step_2"
    fake_checkpoint(tmp_path / "step_10")
    assert checkpoints.find_checkpoint(tmp_path, "latest") == tmp_path / "step_10"  # by step, not by name
    fake_checkpoint(tmp_path / "step_12", run_id="run-b")
    assert checkpoints.find_checkpoint(tmp_path, "latest", run_id="run-a") == tmp_path / "step_10"  # the folder's run's
    assert checkpoints.find_checkpoint(tmp_path, "latest") == tmp_path / "step_12"  # no run recorded: any
    assert checkpoints.find_checkpoint(tmp_path, str(tmp_path / "step_2")) == tmp_path / "step_2"
    with pytest.raises(FileNotFoundError, match=r"no step_N checkpoint of run run-c \(the run whose results it holds\) in .*; \['step_2', 'step_10', 'step_12'\] there are another run's"):
        checkpoints.find_checkpoint(tmp_path, "latest", run_id="run-c")
    with pytest.raises(FileNotFoundError, match=r"--resume_from_checkpoint latest: no step_N checkpoint in \S+step_2$"):
        checkpoints.find_checkpoint(tmp_path / "step_2", "latest")


def test_resume_from_a_folder_that_is_not_a_checkpoint_names_what_it_lacks(tmp_path, model_and_processor):
    """issue 25: a saved model given to --resume_from_checkpoint failed with FileNotFoundError optimizer.bin."""
    model, processor = model_and_processor
    checkpoints.save_model(model, processor, tmp_path / "model")
    with pytest.raises(ValueError, match=(
        rf"--resume_from_checkpoint {tmp_path / 'model'} is not a training checkpoint: it lacks optimizer.bin, scheduler.bin\. A "
        r"checkpoint is a step_N folder that --checkpointing_steps writes: .* To start a new run from the model saved there, "
        rf"pass --model_name_or_path {tmp_path / 'model'}\."
    )):  # fmt: skip
        checkpoints.find_checkpoint(tmp_path, str(tmp_path / "model"))
    with pytest.raises(ValueError, match=r"it lacks model.safetensors, optimizer.bin, scheduler.bin\. .*random_states_\*.pkl\), the run's train_args.json and trainer_state.json\.$"):
        checkpoints.find_checkpoint(tmp_path, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"--resume_from_checkpoint {tmp_path / 'nowhere'}: no such folder"):
        checkpoints.find_checkpoint(tmp_path, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"cannot tell its step \(no trainer_state.json, and not named step_<N>\)"):
        checkpoints.checkpoint_step(fake_checkpoint(tmp_path / "mine"))
    assert checkpoints.checkpoint_step(fake_checkpoint(tmp_path / "renamed", step=7)) == 7


def test_resume_refuses_other_arguments_naming_both_values(tmp_path):
    """issue 25: resumed with a new --learning_rate, the run trained at the old one (the restored scheduler won)
    while train_args.json and the model card recorded the new one."""
    args = argparse.Namespace(dataset_name=None, train_split="train", synthetic_train_images=16, per_device_train_batch_size=4,
                              gradient_accumulation_steps=1, seed=3, hub_token="secret", learning_rate=1e-4, max_train_steps=100,
                              output_dir="run1", checkpointing_steps=10, dataloader_num_workers=2)  # fmt: skip
    settings = checkpoints.run_settings(args, num_processes=1, num_train_images=16, run_id="run-a")
    assert "hub_token" not in settings and (settings["num_processes"], settings["train_images"], settings["run_id"]) == (1, 16, "run-a")
    (tmp_path / "train_args.json").write_text(json.dumps(settings))
    checkpoints.check_resume_settings(tmp_path, {**settings, "output_dir": "run2", "checkpointing_steps": 5, "dataloader_num_workers": 0})
    checkpoints.check_resume_settings(tmp_path, {**settings, "new_argument": 1})  # an older checkpoint does not record it
    with pytest.raises(ValueError, match=(
        r"--resume_from_checkpoint \S+: arguments differ from the run that wrote it: learning_rate \(checkpoint 0.0001, now "
        r"0.0005\), max_train_steps \(checkpoint 100, now 200\)\. A resumed run continues that run as it was set up .* start a "
        r"new run from its weights with --model_name_or_path \S+ and another --output_dir\."
    )):  # fmt: skip
        checkpoints.check_resume_settings(tmp_path, {**settings, "learning_rate": 5e-4, "max_train_steps": 200})
    with pytest.raises(ValueError, match=r"num_processes \(checkpoint 1, now 2\), seed \(checkpoint 3, now 4\)\."):
        checkpoints.check_resume_settings(tmp_path, {**settings, "seed": 4, "num_processes": 2})
    checkpoints.check_resume_settings(tmp_path, {**settings, "max_train_steps": None}, skip=checkpoints.DERIVED_SETTINGS)


def test_resume_refuses_another_model_naming_the_config_fields(tmp_path):
    """issue 25: resuming after an architecture change failed with torch's size-mismatch text."""
    hf_detr.HfDetrForObjectDetection(tiny_config()).save_pretrained(tmp_path)
    checkpoints.check_resume_model(tmp_path, hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path).config)  # the same model
    with pytest.raises(ValueError, match=(
        rf"--resume_from_checkpoint {tmp_path}: this run builds another model than the one it holds: "
        r"backbone_config.depths \(checkpoint \[1, 1, 1, 1\], now \[1, 2, 1, 1\]\), d_model \(checkpoint 32, now 64\)\. "
        r"Resume with the model arguments of the run that wrote it"
    )):  # fmt: skip
        checkpoints.check_resume_model(tmp_path, tiny_config(d_model=64, backbone_config=tiny_backbone_config(depths=[1, 2, 1, 1])))


def test_the_training_log_is_cut_back_to_the_checkpoint_step(tmp_path):
    log_file = tmp_path / "train_log.jsonl"
    assert checkpoints.truncate_log(log_file, 2) == []
    lines = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None, "skipped": "non-finite loss"}, {"step": 3, "loss": 1.0}]
    log_file.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 4, "lo')  # cut short by a kill
    assert checkpoints.truncate_log(log_file, 2) == lines[:2]
    assert [json.loads(line) for line in log_file.read_text().splitlines()] == lines[:2]
