"""hf_detr.run_folder: one training run per --output_dir at a time (a lock naming its holder), never over another
run's results (refused unless --overwrite_output_dir or a resume of the folder's own run), the run's id that
keeps its checkpoints apart from another run's. End to end: tests/test_bad_inputs.py's train.py scenarios."""

import json
import logging
import os
import subprocess
import sys

import pytest
from accelerate import PartialState

from hf_detr import checkpoints, run_folder
from test_checkpoints import fake_checkpoint


@pytest.fixture(autouse=True)
def accelerate_state():
    """hf_detr.run_folder logs through accelerate's logger (as train.py runs it)."""
    return PartialState(cpu=True)


def earlier_run(folder, run_id="run-a", steps=(2, 4)):
    """An output_dir as a finished run leaves it (empty stand-ins for the files)."""
    folder.mkdir()
    for name in ("model.safetensors", "config.json", "train_log.jsonl", "eval_results.json", "README.md"):
        (folder / name).write_text("")
    (folder / "best_model").mkdir()
    (folder / "train_args.json").write_text(json.dumps({"run_id": run_id, "learning_rate": 1e-4}))
    for step in steps:
        fake_checkpoint(folder / f"step_{step}", run_id=run_id, learning_rate=1e-4)
    return folder


def test_a_new_run_in_a_folder_that_holds_another_runs_results_is_refused_naming_them(tmp_path):
    """issue 25: a second run in an earlier run's --output_dir overwrote its model and log, and its
    --checkpoints_total_limit deleted the other run's checkpoints."""
    folder = earlier_run(tmp_path / "run")
    with pytest.raises(ValueError, match=(
        rf"^--output_dir {folder} already holds the results of run run-a \(best_model, eval_results.json, model.safetensors, "
        r"step_2, step_4, train_log.jsonl, \.\.\.\): this run would write its model, log and results over them\. Choose another "
        r"--output_dir, continue that run with --resume_from_checkpoint latest, or pass --overwrite_output_dir to replace them\.$"
    )):  # fmt: skip
        run_folder.check_output_dir(folder, {})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("")
    with pytest.raises(ValueError, match=r"--output_dir \S+notes already holds files \(todo.txt\): .* Choose another --output_dir, or pass"):
        run_folder.check_output_dir(tmp_path / "notes", {})
    # nothing to lose: a new folder, an empty one, or one left by a run that stopped before writing anything
    for fresh in (tmp_path / "new", tmp_path / "empty", tmp_path / "stopped"):
        fresh.mkdir(exist_ok=fresh.name != "new")
    for name in (run_folder.LOCK_FILE, checkpoints.SETTINGS_FILE):
        (tmp_path / "stopped" / name).write_text("{}")
    for fresh in (tmp_path / "new", tmp_path / "empty", tmp_path / "stopped"):
        run = run_folder.check_output_dir(fresh, {})
        assert run.checkpoint is None and not run.replaces_another_run and run.run_id


def test_overwrite_output_dir_replaces_the_runs_results_and_its_checkpoints_stay_out_of_this_runs_way(tmp_path, caplog):
    folder = earlier_run(tmp_path / "run")
    with caplog.at_level(logging.WARNING):
        run = run_folder.check_output_dir(folder, {}, overwrite=True)
    assert run.replaces_another_run and run.run_id != "run-a" and run.checkpoint is None
    assert (
        f"--overwrite_output_dir: {folder} holds the results of run run-a (best_model, eval_results.json, model.safetensors, "
        "step_2, step_4, train_log.jsonl, ...); this run replaces its model, README.md, eval_results.json, train_log.jsonl, "
        "train_args.json and best_model/; its checkpoints ['step_2', 'step_4'] stay"
    ) in caplog.text
    run.start({"run_id": run.run_id, "learning_rate": 5e-4})
    assert not (folder / "best_model").exists() and (folder / "step_2").is_dir() and (folder / "step_4").is_dir()
    assert checkpoints.run_of(folder) == run.run_id
    # this run's rotation and `latest` see none of the earlier run's checkpoints
    assert checkpoints.run_checkpoints(folder, run.run_id) == []
    with pytest.raises(FileNotFoundError, match=rf"no step_N checkpoint of run {run.run_id} .*\['step_2', 'step_4'\] there are another run's"):
        run_folder.check_output_dir(folder, {}, resume_from_checkpoint="latest")


def test_a_resumed_run_continues_the_folders_own_run_only(tmp_path):
    """issue 25: `--resume_from_checkpoint latest` in a folder a second run had taken over resumed the other run's step."""
    folder = earlier_run(tmp_path / "run")
    run = run_folder.check_output_dir(folder, {"learning_rate": 1e-4}, resume_from_checkpoint="latest")
    assert (run.checkpoint, run.run_id, run.replaces_another_run) == (folder / "step_4", "run-a", False)
    fake_checkpoint(folder / "step_6", run_id="run-b")  # another run's, of a later step
    assert run_folder.check_output_dir(folder, {}, resume_from_checkpoint="latest").checkpoint == folder / "step_4"
    # the arguments a resumed run may not change are checked right away, before the data is loaded
    with pytest.raises(ValueError, match=r"arguments differ from the run that wrote it: learning_rate \(checkpoint 0.0001, now 0.0005\)"):
        run_folder.check_output_dir(folder, {"learning_rate": 5e-4}, resume_from_checkpoint="latest")
    # another folder's run continued here would overwrite this one's results
    other = earlier_run(tmp_path / "other", run_id="run-c")
    with pytest.raises(ValueError, match=(
        rf"--resume_from_checkpoint {other / 'step_4'} continues run run-c, but --output_dir {folder} already holds the results "
        r"of run run-a .* Choose another --output_dir, or pass --overwrite_output_dir"
    )):  # fmt: skip
        run_folder.check_output_dir(folder, {}, resume_from_checkpoint=str(other / "step_4"))
    run = run_folder.check_output_dir(tmp_path / "fresh", {}, resume_from_checkpoint=str(other / "step_4"))
    assert (run.checkpoint, run.run_id) == (other / "step_4", "run-c")
    # a folder whose run is not recorded (a checkpoint copied in by hand, an older hf_detr): its checkpoints resume
    (folder / "train_args.json").unlink()
    assert run_folder.check_output_dir(folder, {}, resume_from_checkpoint="latest").checkpoint == folder / "step_6"


HOLD_THE_LOCK = """
import sys
from pathlib import Path
from hf_detr import run_folder
lock = run_folder.lock_output_dir(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()  # until the test closes it
lock.release()
"""


def test_one_run_per_output_dir_at_a_time_naming_the_holder(tmp_path):
    """issue 25: two runs started on one output_dir interleaved their logs and checkpoints (one died with
    FileNotFoundError: scheduler.bin)."""
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RuntimeError, match=(
            rf"^--output_dir {folder} is in use by another run \(pid {holder.pid} on \S+, started [\d-]+ [\d:]+: -c {folder}; "
            rf"lock file {folder / run_folder.LOCK_FILE}\): one run per output_dir at a time\. Wait for it to end, or choose another --output_dir\.$"
        )):  # fmt: skip
            with run_folder.claim_output_dir(PartialState(cpu=True), folder, {}):
                pass
    finally:
        holder.stdin.close()
        holder.wait()
    # released when its holder ends; a claim holds it for its `with` block, refused or not
    with run_folder.claim_output_dir(PartialState(cpu=True), folder, {}) as run:
        assert run.output_dir == folder and run.checkpoint is None
        with pytest.raises(RuntimeError, match="is in use by another run"):
            run_folder.lock_output_dir(folder)
    (folder / "model.safetensors").write_text("")
    with pytest.raises(ValueError, match="already holds files"):
        with run_folder.claim_output_dir(PartialState(cpu=True), folder, {}):
            pass
    assert not (folder / run_folder.HOLDER_FILE).exists()
    run_folder.lock_output_dir(folder).release()  # the refused claim let go of the lock
