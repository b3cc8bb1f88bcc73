"""What a training run writes, and how it resumes.

A run's `--output_dir`, as `scripts/train.py` leaves it:

    config.json, model.safetensors, model code, preprocessor_config.json   the trained model (`save_model`)
    train_args.json  the run's settings and id: the run whose results the folder holds (`hf_detr.run_folder`)
    step_N/          accelerate's state + the model files + train_args.json + trainer_state.json (`save_checkpoint`)
    best_model/      the model with the best evaluation metric so far (`BestModel`)
    train_log.jsonl  one line per optimizer step (`hf_detr.training.train_loop`)
    .train.lock      held by the run's main process while it runs (`hf_detr.run_folder`)

Every run has an id (`hf_detr.run_folder`, which also keeps one run per folder and never over another run's
results), in the train_args.json of the folder and of each of its checkpoints: the checkpoint rotation and
`--resume_from_checkpoint latest` see that run's `step_<N>` folders only (never `step_backup`, never another
run's). Every file lands by a rename from a temporary name, a checkpoint or best_model/ as a whole folder, so
a run killed mid-write leaves nothing half-written where a reader would take it for whole; a full disk is an
error that says so, and the earlier checkpoint is intact.
No NaN/inf weights are ever saved. Resuming (`resume`) checks that the run's arguments and model are the
checkpoint's, loads its state and its best-model state, and cuts the training log back to its step.
Training side: never imported by the model surface.
"""

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.logging import get_logger

logger = get_logger(__name__)

STEP_FOLDER = re.compile(r"step_(\d+)")  # a step checkpoint; step_backup, step_3.partial, step_3.old are not
SETTINGS_FILE, STATE_FILE = "train_args.json", "trainer_state.json"


# --- writing -------------------------------------------------------------------------------------------


def remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def is_disk_full(err: BaseException) -> bool:
    """A full disk or quota, however it is reported: OSError ENOSPC / EDQUOT, safetensors' wrapped io error, or
    torch's zip writer after a short write ("unexpected pos 307520 vs 307440", "file write failed")."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(err) for text in ("No space left on device", "Disk quota exceeded", "unexpected pos", "file write failed"))


def _free_space(folder: Path) -> str:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return "unknown" if existing is None else f"{shutil.disk_usage(existing).free / 2**20:.0f} MiB"


@contextmanager
def writing(what: str, where: Path, partial: Path | None = None, kept: str = ""):
    """Around writing `what` to `where`: on any error the temporary `partial` (file or folder) goes, and a full
    disk becomes OSError(ENOSPC) that says so and names `where`; `kept` says what is left intact."""
    try:
        yield
    except BaseException as err:
        if partial is not None:
            remove(partial)
        if not isinstance(err, Exception) or not is_disk_full(err):
            raise
        raise OSError(
            errno.ENOSPC, f"no space left on device: writing {what} to {where} failed ({_free_space(where)} free there "
            f"now){'; ' + kept if kept else ''}. ({type(err).__name__}: {err})",
        ) from err  # fmt: skip


def write_text_atomic(path: Path, text: str):
    partial = path.with_name(path.name + ".partial")
    with writing(path.name, path.parent, partial):
        partial.write_text(text)
        os.replace(partial, path)


def replace_folder(partial: Path, final: Path):
    """Put the whole folder `partial` in the place of `final` by renames; an earlier `final` stays whole (as
    `<final>.old`) until the new one is in place."""
    old = final.with_name(final.name + ".old")
    remove(old)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    remove(old)


def check_finite_weights(model, what: str):
    """Never save NaN/inf weights: raise naming the first parameters or buffers that hold any."""
    tensors = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    if not bool(finite.all()):
        names = [name for (name, _), ok in zip(tensors, finite.tolist()) if not ok]
        raise RuntimeError(f"not saving {what}: non-finite values in {len(names)} weights, e.g. {names[:3]}")


def _save_pretrained(model, image_processor, folder: Path):
    model.save_pretrained(folder, safe_serialization=True)
    image_processor.save_pretrained(folder)


def save_model(model, image_processor, output_dir: Path, what: str = "the trained model"):
    """save_pretrained through a temporary folder whose files are then renamed into ``output_dir``
    (weights last): a run killed while saving never leaves a half-written file there."""
    check_finite_weights(model, what)
    output_dir.mkdir(parents=True, exist_ok=True)
    partial = output_dir / "model.partial"
    remove(partial)
    with writing(what, output_dir, partial):
        _save_pretrained(model, image_processor, partial)
        for file in sorted(partial.iterdir(), key=lambda f: "safetensors" in f.name):
            os.replace(file, output_dir / file.name)
        partial.rmdir()


# --- step checkpoints and the best model ---------------------------------------------------------------


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_of(folder: Path) -> str | None:
    """The id of the run that wrote `folder` (an output_dir or a checkpoint), from its train_args.json."""
    return (read_json(folder / SETTINGS_FILE) or {}).get("run_id")


def step_checkpoints(output_dir: Path) -> list[Path]:
    """The `step_<N>` folders of `output_dir`, oldest first (a half-written `step_N.partial`, a `step_backup`
    or anything else is not one)."""
    found = [p for p in output_dir.iterdir() if STEP_FOLDER.fullmatch(p.name) and p.is_dir()] if output_dir.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_FOLDER.fullmatch(p.name).group(1)))


def run_checkpoints(output_dir: Path, run_id: str | None) -> list[Path]:
    """The step checkpoints of run `run_id` in `output_dir`, oldest first."""
    return [p for p in step_checkpoints(output_dir) if run_of(p) == run_id]


def save_checkpoint(accelerator, model, image_processor, output_dir: Path, step: int, settings: dict,
                    total_limit: int | None = None, best: "BestModel | None" = None):  # fmt: skip
    """`step_<step>/`: accelerator.save_state (for --resume_from_checkpoint) + the model files (config.json,
    weights, model code, image processor: from_pretrained, pipeline and scripts/evaluate.py load the folder as
    it is; the weights file is the one accelerate loads back) + the run's settings (train_args.json, with its
    `run_id`) + the step and the best model so far (trainer_state.json), written to a temporary folder and
    renamed into place whole. Then, with `total_limit`, this run's oldest step checkpoints beyond it are
    deleted (another run's, or a folder not named step_<N>, never)."""
    unwrapped, name, run_id = accelerator.unwrap_model(model), f"step_{step}", settings.get("run_id")
    check_finite_weights(unwrapped, f"checkpoint {name}")
    final, partial = output_dir / name, output_dir / f"{name}.partial"
    earlier = run_checkpoints(output_dir, run_id)
    kept = f"{earlier[-1]} is intact (--resume_from_checkpoint latest resumes from it)" if earlier else "no earlier checkpoint"
    if accelerator.is_main_process:
        remove(partial)
    accelerator.wait_for_everyone()
    with writing(f"checkpoint {name}", output_dir, partial, kept=f"the checkpoint was not written; {kept}"):
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _save_pretrained(unwrapped, image_processor, partial)
            (partial / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
            state = {"global_step": step, **(best.state() if best is not None else {})}
            (partial / STATE_FILE).write_text(json.dumps(state, indent=2))
            replace_folder(partial, final)
    if accelerator.is_main_process and total_limit is not None:
        for old in run_checkpoints(output_dir, run_id)[:-total_limit]:
            shutil.rmtree(old)
            logger.info(f"deleted {old} (--checkpoints_total_limit {total_limit})")
    accelerator.wait_for_everyone()


class BestModel:
    """--metric_for_best_model over the evaluations of a run: the model with the best value so far is kept
    in <output_dir>/best_model (model files, processor, and its metrics in eval_results.json), replaced as a
    whole folder. Its state (`state`) travels in each checkpoint and is restored on resume (`restore`), so a
    resumed run replaces best_model/ only with a better model."""

    def __init__(self, output_dir: Path, metric: str):
        self.folder, self.metric, self.best, self.step = output_dir / "best_model", metric, None, None

    def update(self, accelerator, model, image_processor, metrics: dict, step: int) -> bool:
        value = metrics.get(self.metric)
        if value is None or (self.best is not None and value <= self.best):
            return False
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            check_finite_weights(unwrapped, "the best model")
            partial = self.folder.with_name(self.folder.name + ".partial")
            remove(partial)
            with writing("the best model", self.folder, partial, kept=f"{self.folder} keeps the best model before it"):
                _save_pretrained(unwrapped, image_processor, partial)
                (partial / "eval_results.json").write_text(json.dumps({**metrics, "train_steps": step}, indent=2))
                replace_folder(partial, self.folder)
            logger.info(f"step {step}: best {self.metric} so far ({value:.4f}), saved to {self.folder}")
        self.best, self.step = value, step
        return True

    def state(self) -> dict:
        """What a checkpoint records of it (trainer_state.json; transformers Trainer's names)."""
        saved = self.folder.name if self.step is not None else None
        return {"metric_for_best_model": self.metric, "best_metric": self.best, "best_global_step": self.step, "best_model_checkpoint": saved}

    def restore(self, state: dict, checkpoint: Path):
        """On resume: the best value so far is the checkpoint's (its trainer_state.json), where best_model/ holds
        that model; else what best_model/ holds (e.g. a later step of the interrupted run, which the resumed run
        trains again), so best_model/ is only ever replaced by a better model; else none yet."""
        held = read_json(self.folder / "eval_results.json") or {}
        held = (held.get(self.metric), held.get("train_steps"))
        recorded = (state.get("best_metric"), state.get("best_global_step")) if state.get("metric_for_best_model") == self.metric else (None, None)
        if recorded[1] is not None and held[1] == recorded[1]:
            self.best, self.step = recorded
        elif held[0] is not None:
            self.best, self.step = held
            if recorded[1] is not None:
                logger.warning(
                    f"{self.folder} holds the model of step {held[1]}, not the best of {checkpoint} (step {recorded[1]}): it "
                    "stays the best so far"
                )
        elif recorded[1] is not None:
            logger.warning(
                f"the best model of {checkpoint} (step {recorded[1]}, {self.metric} {recorded[0]:.4f}) is not in {self.folder} (a "
                "checkpoint from another folder?): this run's evaluations choose the best model afresh"
            )
        if self.step is not None:
            logger.info(f"best {self.metric} so far: {self.best:.4f} at step {self.step}; {self.folder} is replaced only by a better model")

    def summary(self) -> dict | None:
        return None if self.step is None else {"step": self.step, self.metric: self.best, "path": self.folder.name}


# --- resuming ------------------------------------------------------------------------------------------

# Arguments a resumed run may change: where and how often it writes, evaluates and reports, how fast it loads
# data. Every other one (learning rates, schedule, length, batch size, data, model, augmentation, seed, ...)
# must be the checkpoint's run's: its optimizer, scheduler and sampler state are restored as they were, so a
# new value would silently not apply (a restored scheduler keeps its learning rate), or apply from the middle
# of a schedule laid out for the other, and train_args.json and the model card would record what did not train.
MAY_DIFFER_ON_RESUME = (
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "run_id", "checkpointing_steps",
    "checkpoints_total_limit", "eval_strategy", "eval_steps", "eval_every_epoch", "per_device_eval_batch_size",
    "dataloader_num_workers", "max_consecutive_nonfinite_steps", "with_tracking", "report_to", "push_to_hub",
    "hub_model_id", "cache_dir", "trust_remote_code", "torch_compile", "sdpa_backend",
)  # fmt: skip
# Settings known once the data is loaded (compared then; `hf_detr.run_folder.check_output_dir` compares the
# rest before anything is built).
DERIVED_SETTINGS = ("train_split", "eval_split", "max_train_steps", "num_processes", "train_images")
# Config fields that record where a model came from, not what it is.
PROVENANCE_FIELDS = (
    "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "auto_map", "converted_from",
    "use_pretrained_backbone", "backbone_checkpoint", "output_attentions", "output_hidden_states", "return_dict",
)  # fmt: skip


def run_settings(args, num_processes: int | None = None, num_train_images: int | None = None, run_id: str | None = None) -> dict:
    """What a run records of itself (train_args.json): the arguments (no token), the number of processes and
    of training images, the run's id (those given)."""
    settings = {k: v for k, v in vars(args).items() if k != "hub_token"}
    extra = {"num_processes": num_processes, "train_images": num_train_images, "run_id": run_id}
    return {**settings, **{k: v for k, v in extra.items() if v is not None}}


def check_is_checkpoint(folder: Path):
    """A folder that --resume_from_checkpoint can load: accelerate's state (the model weights, optimizer.bin,
    scheduler.bin) or an error naming what it lacks."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {folder}: no such folder")
    missing = [] if any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")) else ["model.safetensors"]
    missing += [name for name in ("optimizer.bin", "scheduler.bin") if not (folder / name).is_file()]
    if missing:
        model = f" To start a new run from the model saved there, pass --model_name_or_path {folder}." if (folder / "config.json").is_file() else ""
        raise ValueError(
            f"--resume_from_checkpoint {folder} is not a training checkpoint: it lacks {', '.join(missing)}. A checkpoint is a "
            "step_N folder that --checkpointing_steps writes: accelerate's state (model.safetensors, optimizer.bin, "
            f"scheduler.bin, random_states_*.pkl), the run's train_args.json and trainer_state.json.{model}"
        )


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint was taken at: its trainer_state.json's, else its step_<N> name's."""
    step = (read_json(checkpoint / STATE_FILE) or {}).get("global_step")
    if step is None and (named := STEP_FOLDER.fullmatch(checkpoint.name)):
        step = int(named.group(1))
    if step is None:
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: cannot tell its step (no trainer_state.json, and not named step_<N>)")
    return step


def find_checkpoint(output_dir: Path, resume_from_checkpoint: str, run_id: str | None = None) -> Path:
    """--resume_from_checkpoint: a checkpoint folder, or "latest": the step checkpoint of the highest step in
    `output_dir` of run `run_id` (the run whose results the folder holds; None: any)."""
    if resume_from_checkpoint != "latest":
        checkpoint = Path(resume_from_checkpoint)
    else:
        every = step_checkpoints(output_dir)
        own = [p for p in every if run_id is None or run_of(p) == run_id]
        if not own:
            others = f"; {[p.name for p in every]} there are another run's" if every else ""
            whose = f"of run {run_id} (the run whose results it holds) " if run_id else ""
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no step_N checkpoint {whose}in {output_dir}{others}")
        checkpoint = own[-1]
    check_is_checkpoint(checkpoint)
    return checkpoint


def check_resume_settings(checkpoint: Path, settings: dict, skip=()):
    """ValueError naming each of this run's settings that differs from the checkpoint's run (both values),
    but those that may (`MAY_DIFFER_ON_RESUME`) and `skip`."""
    saved = read_json(checkpoint / SETTINGS_FILE)
    if saved is None:
        logger.warning(f"{checkpoint} has no train_args.json (an older checkpoint): cannot check that this run's settings match it")
        return
    now = json.loads(json.dumps(settings))  # as the checkpoint recorded them
    differ = [
        f"{key} (checkpoint {saved[key]!r}, now {value!r})" for key, value in sorted(now.items())
        if key in saved and key not in MAY_DIFFER_ON_RESUME and key not in skip and saved[key] != value
    ]  # fmt: skip
    if differ:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: arguments differ from the run that wrote it: {', '.join(differ)}. A "
            "resumed run continues that run as it was set up (its optimizer, learning-rate schedule and sample order "
            "come from the checkpoint, and train_args.json and the model card record one set of arguments): resume "
            "with the checkpoint's values (its train_args.json), or start a new run from its weights with "
            f"--model_name_or_path {checkpoint} and another --output_dir."
        )


def _flat(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if key in PROVENANCE_FIELDS:
            continue
        if isinstance(value, dict) and key not in ("id2label", "label2id"):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_model(checkpoint: Path, config):
    """ValueError naming each config field of this run's model (`config`) that differs from the checkpoint's
    config.json (both values), before its weights are loaded."""
    if not (checkpoint / "config.json").is_file():
        logger.warning(f"{checkpoint} has no config.json: cannot check that this run's model is the one it holds")
        return
    saved, now = _flat(type(config).from_pretrained(checkpoint).to_dict()), _flat(config.to_dict())
    differ = [
        f"{key} (checkpoint {saved.get(key)!r}, now {now.get(key)!r})" for key in sorted(saved.keys() | now.keys()) if saved.get(key) != now.get(key)
    ]  # fmt: skip
    if differ:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: this run builds another model than the one it holds: {', '.join(differ)}. "
            "Resume with the model arguments of the run that wrote it (--model_name_or_path, --config_name, "
            f"--config_overrides: its train_args.json), or start a new run from its weights with --model_name_or_path {checkpoint}."
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


@dataclass
class Resumed:
    step: int  # the checkpoint's optimizer step
    skipped_nonfinite_steps: int  # steps skipped up to it (from the training log)
    state: dict  # its trainer_state.json: the best model so far (`BestModel.restore`)


def resume(accelerator, checkpoint: Path, settings: dict, config, log_file: Path, steps_per_epoch: int) -> Resumed:
    """--resume_from_checkpoint (found by `hf_detr.run_folder.claim_output_dir`): check this run's settings (`settings`) and model
    (`config`) against the checkpoint's, load its state (model, optimizer, scheduler, RNG states, sampler) and
    cut the training log back to its step."""
    check_resume_settings(checkpoint, settings)
    check_resume_model(checkpoint, config)
    step = checkpoint_step(checkpoint)
    accelerator.load_state(str(checkpoint))
    skipped = 0
    if accelerator.is_main_process:  # the steps after the checkpoint are trained (and logged) again
        skipped = sum(1 for entry in truncate_log(log_file, step) if entry.get("skipped"))
    epoch, done_in_epoch = divmod(step, steps_per_epoch)
    logger.info(f"resumed from {checkpoint} at step {step} (epoch {epoch}, {done_in_epoch} steps into it)")
    return Resumed(step, skipped, read_json(checkpoint / STATE_FILE) or {})
