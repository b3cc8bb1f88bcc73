"""A training run's `--output_dir`: one run at a time, never over another run's results.

    with claim_output_dir(PartialState(), Path(args.output_dir), run_settings(args),
                          overwrite=args.overwrite_output_dir, resume_from_checkpoint=args.resume_from_checkpoint) as run:
        ...                          # build, resume from run.checkpoint, train
        run.start(settings)          # main process: the folder's results are this run's from here

Before anything is built, the run's main process locks the folder (a second run on it is refused, naming the
holder) and checks it (`check_output_dir`): a folder that holds files is refused, unless they are the results
of the run this one resumes, or `--overwrite_output_dir` (then this run replaces that run's results and
leaves its step checkpoints, which this run's rotation and `latest` ignore: `hf_detr.checkpoints` tells a
run's checkpoints by the run id in their train_args.json). Training side: never imported by the model surface.
"""

import json
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list
from filelock import FileLock, Timeout

from . import checkpoints

logger = get_logger(__name__)

LOCK_FILE, HOLDER_FILE = ".train.lock", ".train.lock.holder.json"
RESULTS = ("model.safetensors", "train_log.jsonl", "eval_results.json", "best_model")  # named first in messages


@dataclass
class RunFolder:
    """`--output_dir` as `claim_output_dir` hands it to a run: the run's id (a resumed run keeps its
    checkpoint's), the checkpoint it resumes from, whether it replaces another run's results."""

    output_dir: Path
    run_id: str
    checkpoint: Path | None = None
    replaces_another_run: bool = False

    def start(self, settings: dict):
        """Main process, once the run's settings are whole and checked: from here the folder's results are this
        run's (its train_args.json says so); another run's best_model/ goes (--overwrite_output_dir)."""
        if self.replaces_another_run:
            checkpoints.remove(self.output_dir / "best_model")
        checkpoints.write_text_atomic(self.output_dir / checkpoints.SETTINGS_FILE, json.dumps(settings, indent=2))


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def lock_output_dir(output_dir: Path) -> FileLock:
    """One run per folder: a lock held by the run's main process (released when it ends, or dies), and who
    holds it beside it, for the next run's message."""
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(output_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = checkpoints.read_json(output_dir / HOLDER_FILE) or {}
        who = "holder unknown"
        if holder:
            who = f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: {holder.get('command')}"
        raise RuntimeError(
            f"--output_dir {output_dir} is in use by another run ({who}; lock file {output_dir / LOCK_FILE}): one run "
            "per output_dir at a time. Wait for it to end, or choose another --output_dir."
        ) from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    (output_dir / HOLDER_FILE).write_text(json.dumps(holder))
    return lock


def check_output_dir(output_dir: Path, settings: dict, *, overwrite: bool = False, resume_from_checkpoint: str | None = None) -> RunFolder:
    """Refuse a folder that holds files, unless they are the results of the run this one resumes, or
    `overwrite` (then this run replaces that run's model, card, results, log and best_model/ and leaves its
    step checkpoints, which this run's rotation and `latest` ignore). With `resume_from_checkpoint`: find the
    checkpoint (`latest`: of the folder's run), check that it is one and that this run's arguments are its."""
    folder_run = checkpoints.run_of(output_dir)  # the run whose results the folder holds (None: none recorded)
    run_id, checkpoint = new_run_id(), None
    if resume_from_checkpoint:
        checkpoint = checkpoints.find_checkpoint(output_dir, resume_from_checkpoint, folder_run)
        checkpoints.check_resume_settings(checkpoint, settings, skip=checkpoints.DERIVED_SETTINGS)  # the rest once the data is loaded
        run_id = checkpoints.run_of(checkpoint) or run_id
    held = [p.name for p in output_dir.iterdir() if p.name not in (LOCK_FILE, HOLDER_FILE, checkpoints.SETTINGS_FILE)] if output_dir.is_dir() else []
    held.sort(key=lambda name: (name not in RESULTS and not checkpoints.STEP_FOLDER.fullmatch(name), name))  # results first
    if not held or (checkpoint is not None and folder_run in (None, run_id)):
        return RunFolder(output_dir, run_id, checkpoint)
    what = f"the results of run {folder_run}" if folder_run else "files"
    listed = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
    if not overwrite:
        own = checkpoints.run_checkpoints(output_dir, folder_run) if folder_run else checkpoints.step_checkpoints(output_dir)
        why = f"--resume_from_checkpoint {checkpoint} continues run {run_id}, but " if checkpoint is not None else ""
        resume = "continue that run with --resume_from_checkpoint latest, " if own and checkpoint is None else ""
        raise ValueError(
            f"{why}--output_dir {output_dir} already holds {what} ({listed}): this run would write its model, log and "
            f"results over them. Choose another --output_dir, {resume}or pass --overwrite_output_dir to replace them."
        )
    others = [p.name for p in checkpoints.step_checkpoints(output_dir) if checkpoints.run_of(p) != run_id]
    logger.warning(
        f"--overwrite_output_dir: {output_dir} holds {what} ({listed}); this run replaces its model, README.md, "
        "eval_results.json, train_log.jsonl, train_args.json and best_model/"
        + (f"; its checkpoints {others} stay (but for one of a step this run checkpoints too), and this run's checkpoint "
           "rotation and --resume_from_checkpoint latest ignore them" if others else "")
    )  # fmt: skip
    return RunFolder(output_dir, run_id, checkpoint, replaces_another_run=True)


@contextmanager
def claim_output_dir(state, output_dir: Path, settings: dict, *, overwrite: bool = False, resume_from_checkpoint: str | None = None):
    """Hold `output_dir` for a run, before anything is built: the main process (of accelerate's `state`) takes
    the folder's lock and checks it (`check_output_dir`); every process gets the outcome (a `RunFolder`) or the
    main process's refusal. The lock is released when the `with` block ends."""
    lock, run, failure = None, None, None
    if state.is_main_process:
        try:
            lock = lock_output_dir(output_dir)
            run = check_output_dir(output_dir, settings, overwrite=overwrite, resume_from_checkpoint=resume_from_checkpoint)
        except Exception as err:
            failure = err
    message = None if failure is None else f"{type(failure).__name__}: {failure}"
    run, message = broadcast_object_list([run, message])
    try:
        if failure is not None:
            raise failure
        if message is not None:
            raise RuntimeError(f"the main process refused --output_dir {output_dir}: {message}")
        yield run
    finally:
        if lock is not None:
            (output_dir / HOLDER_FILE).unlink(missing_ok=True)
            lock.release()
