"""What a training run writes, and how it resumes: atomic saves, step checkpoints, the best model.

A run's `--output_dir`, as `scripts/train.py` leaves it:

    config.json, model.safetensors, model code, preprocessor_config.json   the trained model (`save_model`)
    step_N/          accelerate's state + the model files + train_args.json (`save_checkpoint`)
    best_model/      the model with the best evaluation metric so far (`BestModel`)
    train_log.jsonl  one line per optimizer step (`hf_detr.training.train_loop`)

Every file lands by a rename from a temporary name, so a run killed mid-write leaves no half-written
file where a reader (`from_pretrained`, `--resume_from_checkpoint latest`) would take it for a whole one,
and no NaN/inf weights are ever saved. Resuming (`resume`) checks that the run's data-order settings are
the checkpoint's, loads its state and cuts the training log back to its step. Training side: never
imported by the model surface.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate.logging import get_logger

logger = get_logger(__name__)


def write_text_atomic(path: Path, text: str):
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def check_finite_weights(model, what: str):
    """Never save NaN/inf weights: raise naming the first parameters or buffers that hold any."""
    tensors = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    if not bool(finite.all()):
        names = [name for (name, _), ok in zip(tensors, finite.tolist()) if not ok]
        raise RuntimeError(f"not saving {what}: non-finite values in {len(names)} weights, e.g. {names[:3]}")


def save_model(model, image_processor, output_dir: Path, what: str = "the trained model"):
    """save_pretrained through a temporary folder whose files are then renamed into ``output_dir``
    (weights last): a run killed while saving never leaves a half-written file there."""
    check_finite_weights(model, what)
    output_dir.mkdir(parents=True, exist_ok=True)
    partial = output_dir / "model.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    image_processor.save_pretrained(partial)
    for file in sorted(partial.iterdir(), key=lambda f: "safetensors" in f.name):
        os.replace(file, output_dir / file.name)
    partial.rmdir()


def save_checkpoint(accelerator, model, image_processor, output_dir: Path, name: str, settings: dict, total_limit: int | None = None):
    """accelerator.save_state (for --resume_from_checkpoint) + the model files (config.json, weights, model code,
    image processor: from_pretrained, pipeline and scripts/evaluate.py load the folder as it is; the weights file
    is the one accelerate loads back) + the run's settings (train_args.json), written to a temporary folder and
    renamed into place, so a run killed mid-write never leaves a half checkpoint that --resume_from_checkpoint
    would pick up. Then, with `total_limit`, the oldest step_* checkpoints beyond it are deleted."""
    unwrapped = accelerator.unwrap_model(model)
    check_finite_weights(unwrapped, f"checkpoint {name}")
    final, partial = output_dir / name, output_dir / f"{name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(partial, safe_serialization=True)
        image_processor.save_pretrained(partial)
        (partial / "train_args.json").write_text(json.dumps(settings, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if total_limit is not None:
            for old in sorted(completed_checkpoints(output_dir), key=checkpoint_step)[:-total_limit]:
                shutil.rmtree(old)
                logger.info(f"deleted {old} (--checkpoints_total_limit {total_limit})")
    accelerator.wait_for_everyone()


class BestModel:
    """--metric_for_best_model over the evaluations of a run: the model with the best value so far is kept
    in <output_dir>/best_model (model files, processor, and its metrics in eval_results.json)."""

    def __init__(self, output_dir: Path, metric: str):
        self.folder, self.metric, self.best, self.step = output_dir / "best_model", metric, None, None

    def update(self, accelerator, model, image_processor, metrics: dict, step: int) -> bool:
        value = metrics.get(self.metric)
        if value is None or (self.best is not None and value <= self.best):
            return False
        self.best, self.step = value, step
        if accelerator.is_main_process:
            save_model(accelerator.unwrap_model(model), image_processor, self.folder, "the best model")
            write_text_atomic(self.folder / "eval_results.json", json.dumps({**metrics, "train_steps": step}, indent=2))
            logger.info(f"step {step}: best {self.metric} so far ({value:.4f}), saved to {self.folder}")
        return True

    def summary(self) -> dict | None:
        return None if self.step is None else {"step": self.step, self.metric: self.best, "path": self.folder.name}


# --- resuming ------------------------------------------------------------------------------------------

# Settings that fix which samples a step sees: a resumed run must share them with its checkpoint,
# or it would skip the wrong number of samples (checked against the checkpoint's train_args.json).
DATA_ORDER_SETTINGS = (
    "dataset_name", "train_split", "synthetic_train_images", "train_images", "per_device_train_batch_size",
    "gradient_accumulation_steps", "num_processes", "seed",
)  # fmt: skip


def run_settings(args, num_processes: int, num_train_images: int) -> dict:
    """What a checkpoint records of its run (train_args.json): the arguments (no token), the number of
    processes and of training images."""
    settings = {k: v for k, v in vars(args).items() if k != "hub_token"}
    return {**settings, "num_processes": num_processes, "train_images": num_train_images}


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("_")[1])


def completed_checkpoints(output_dir: Path) -> list[Path]:
    return [p for p in output_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")]


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    """--resume_from_checkpoint: a folder, or "latest": the completed step_* checkpoint of the highest step."""
    if resume != "latest":
        return Path(resume)
    done = completed_checkpoints(output_dir)
    if not done:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no step_* checkpoint in {output_dir}")
    return max(done, key=checkpoint_step)


def check_resume_settings(checkpoint: Path, settings: dict):
    """ValueError naming each data-order setting of this run that differs from the checkpoint's run."""
    saved_file = checkpoint / "train_args.json"
    if not saved_file.is_file():
        logger.warning(f"{checkpoint} has no train_args.json (an older checkpoint): cannot check that this run's settings match it")
        return
    saved = json.loads(saved_file.read_text())
    differ = [f"{key} (checkpoint {saved.get(key)!r}, now {settings[key]!r})" for key in DATA_ORDER_SETTINGS if saved.get(key) != settings[key]]
    if differ:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: settings that fix which samples each step sees differ from the run "
            f"that wrote it: {', '.join(differ)}. Resume with the same settings, or start a new run (e.g. from a saved "
            "model with --model_name_or_path)."
        )


def truncate_log(log_file: Path, step: int) -> list[dict]:
    """Keep the training log's lines up to ``step`` (a resumed run writes the later ones again); a line
    cut short by a crash is dropped. -> the kept lines."""
    if not log_file.is_file():
        return []
    kept = []
    for line in log_file.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("step", step + 1) <= step:
            kept.append(entry)
    write_text_atomic(log_file, "".join(json.dumps(entry) + "\n" for entry in kept))
    return kept


def resume(accelerator, output_dir: Path, resume_from_checkpoint: str, settings: dict, log_file: Path, steps_per_epoch: int) -> tuple[int, int]:
    """--resume_from_checkpoint: find the checkpoint, check the run's settings against it, load its state
    (model, optimizer, scheduler, RNG states, sampler) and cut the training log back to its step.
    -> (its step, the non-finite steps skipped up to it)."""
    checkpoint = find_checkpoint(output_dir, resume_from_checkpoint)
    check_resume_settings(checkpoint, settings)
    accelerator.load_state(str(checkpoint))
    step, skipped = checkpoint_step(checkpoint), 0
    if accelerator.is_main_process:  # the steps after the checkpoint are trained (and logged) again
        skipped = sum(1 for entry in truncate_log(log_file, step) if entry.get("skipped"))
    epoch, done_in_epoch = divmod(step, steps_per_epoch)
    logger.info(f"resumed from {checkpoint} at step {step} (epoch {epoch}, {done_in_epoch} steps into it)")
    return step, skipped
