"""The training loop of `scripts/train.py` and `scripts/benchmark_convergence.py`, and what it needs.

    model, optimizer, loader = accelerator.prepare(model, build_optimizer(model, 1e-4, 1e-5), loader)
    scheduler = accelerator.prepare(build_scheduler(optimizer, "step", max_train_steps=1000))
    result = train_loop(accelerator, model, optimizer, scheduler, loader, max_train_steps=1000, seed=42,
                        after_step=lambda step, entry, last: ...)   # checkpoints, evaluations, timing

Also here: the built-in run's model and both runs' defaults (`SMALL_MODEL`, `small_model`, `run_defaults`),
the check of a run's arguments (`check_run_arguments`, before anything is built), a checkpoint loaded for
fine-tuning with its class head rows following the dataset's classes by name (`load_for_fine_tuning`) and the guard
that skips an optimizer step whose loss or gradient is not finite (`NonFiniteStepGuard`). Checkpoints, the
best model and resuming are in `hf_detr.checkpoints`, the output folder in `hf_detr.run_folder`. Training
side: never imported by the model surface.
"""

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.state import PartialState
from accelerate.utils import is_torch_xla_available
from tqdm.auto import tqdm
from transformers import AutoConfig, SchedulerType, get_scheduler

from .data import CategoryMap, default_num_workers
from .synthetic import SYNTHETIC_STYLES
from .heads import HfDetrHeads, start_at_prior
from .labels import class_head_rows, label_names
from .modeling_hf_detr import HfDetrForObjectDetection
from .memory import EncoderProposals
from .queries import Denoising

logger = get_logger(__name__)

# The built-in run's model: a DETR small enough to train from scratch on 2 CPU cores in minutes.
SMALL_MODEL = dict(
    backbone_config=dict(
        model_type="resnet", embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 2],
        layer_type="basic", out_features=["stage3"],  # stride 16: an 8x8 feature map for 128-pixel images
    ),
    freeze_backbone_stages=0, freeze_backbone_batch_norm=False,  # trained from scratch: train all of it, live BN
    d_model=128, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=256, decoder_ffn_dim=256, num_queries=10, dropout=0.0,
    # the recipe with the most mAP per second of training on 2 cores (BENCHMARKS.md, "The built-in run's recipe"):
    # DAB-DETR's anchor queries, the focal class loss weighted 2 as in Deformable DETR (matching cost 3), Group DETR's
    # query groups, DN-DETR's denoising queries, and Deformable DETR's deformable attention in the encoder and the
    # decoder's cross-attention, on the one stride-16 level (its extra levels cost more time than they gain here)
    query_type="anchor", class_loss="focal", class_cost=3.0, ce_loss_coefficient=2.0, num_query_groups=6,
    num_denoising_queries=40, encoder_attention="deformable", decoder_cross_attention="deformable",
)  # fmt: skip


def small_model(synthetic_style: str = "shapes") -> dict:
    """`SMALL_MODEL` for a style of the built-in data: at least 1.5 queries per object of its fullest image (the
    matcher gives every object a query of its own): 10 on "shapes" (up to 4 objects), 30 on "clutter" (up to 20)."""
    most = SYNTHETIC_STYLES[synthetic_style].max_objects
    return {**SMALL_MODEL, "num_queries": max(SMALL_MODEL["num_queries"], math.ceil(1.5 * most))}


# transformers' schedulers (get_scheduler) that need nothing but the step count; "step" is DETR's 10x drop
LR_SCHEDULERS = ["step"] + [t.value for t in SchedulerType if t.value not in ("reduce_lr_on_plateau", "greedy")]


def run_defaults(built_in: bool) -> dict:
    """The values a run takes where its arguments give none: a small, fast run on the built-in synthetic
    data; the paper's DETR-R50 recipe on a dataset. Both: DETR's AdamW (weight decay 1e-4), gradient
    clipping 0.1 and step schedule (one 10x drop)."""
    optimization = dict(
        weight_decay=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=0.1,
        lr_scheduler_type="step", num_warmup_steps=0, dataloader_num_workers=default_num_workers(),
    )  # fmt: skip
    if built_in:
        # 5 epochs (1250 steps): the built-in recipe passes the 1500-step dense-attention run's mAP in less time
        # (BENCHMARKS.md, "The built-in run's recipe"); 6 epochs add 0.026 mAP for 1.2x the steps
        return optimization | dict(
            image_size=128, max_size=128, augmentation="flip", num_train_epochs=5, per_device_train_batch_size=16,
            per_device_eval_batch_size=32, learning_rate=5e-4, backbone_learning_rate=5e-4, lr_drop_fraction=0.8,
            synthetic_train_images=4000, synthetic_val_images=200, eval_strategy="no",
        )  # fmt: skip
    return optimization | dict(
        image_size=800, max_size=1333, augmentation="detr", num_train_epochs=300, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, learning_rate=1e-4, backbone_learning_rate=1e-5, lr_drop_fraction=2 / 3,
        eval_strategy="epoch",
    )  # fmt: skip


# Each numeric argument's range (None: the run's default, from `run_defaults`): (low, high, low included,
# high included); a bound of None is open-ended. Floats must also be finite (NaN passes every comparison).
ARGUMENT_RANGES = {
    "max_train_steps": (1, None, True, None), "num_train_epochs": (1, None, True, None),
    "per_device_train_batch_size": (1, None, True, None), "per_device_eval_batch_size": (1, None, True, None),
    "gradient_accumulation_steps": (1, None, True, None),
    "learning_rate": (0, None, False, None),  # a negative rate climbs the loss; 0 trains nothing
    "backbone_learning_rate": (0, None, True, None),  # 0 freezes the backbone
    "weight_decay": (0, None, True, None), "adam_beta1": (0, 1, True, False), "adam_beta2": (0, 1, True, False),
    "adam_epsilon": (0, None, False, None), "max_grad_norm": (0, None, True, None),  # 0: no clipping
    "num_warmup_steps": (0, None, True, None), "lr_drop_fraction": (0, 1, False, True),
    "max_train_samples": (1, None, True, None), "max_eval_samples": (1, None, True, None),
    "synthetic_train_images": (1, None, True, None), "synthetic_val_images": (1, None, True, None),
    "image_size": (1, None, True, None), "max_size": (1, None, True, None),
    "dataloader_num_workers": (0, None, True, None), "seed": (0, 2**32, True, False),  # numpy's seed range
    "eval_steps": (1, None, True, None), "checkpoints_total_limit": (1, None, True, None),
    "max_consecutive_nonfinite_steps": (1, None, True, None), "train_val_split": (0, 1, False, False),
    "ema_decay": (0, 1, False, False), "ema_warmup_steps": (0, None, True, None),
}  # fmt: skip


def _range_text(low, high, low_in, high_in) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def check_run_arguments(args):
    """Refuse arguments that contradict each other or are out of range (ValueError naming the argument and
    its value), before anything is built; settle `eval_strategy` from `--eval_every_epoch` / `--eval_steps`
    and `--checkpointing_steps` to an int or "epoch"."""
    for name, (low, high, low_in, high_in) in ARGUMENT_RANGES.items():
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name} must be a finite number, got {value}")
        below = value < low if low_in else value <= low
        above = high is not None and (value > high if high_in else value >= high)
        if below or above:
            raise ValueError(f"--{name} must be {_range_text(low, high, low_in, high_in)}, got {value}")
    if args.checkpointing_steps not in (None, "epoch"):
        steps = str(args.checkpointing_steps).strip()
        if not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"--checkpointing_steps must be a number of steps >= 1 or 'epoch', got {args.checkpointing_steps!r}")
        args.checkpointing_steps = int(steps)
    if args.eval_every_epoch:
        if args.eval_strategy not in (None, "epoch"):
            raise ValueError(f"--eval_every_epoch contradicts --eval_strategy {args.eval_strategy}")
        args.eval_strategy = "epoch"
    if args.eval_steps is not None:
        if args.eval_strategy not in (None, "steps"):
            raise ValueError(f"--eval_steps {args.eval_steps} needs --eval_strategy steps, got --eval_strategy {args.eval_strategy}")
        args.eval_strategy = "steps"
    if args.eval_strategy == "steps" and args.eval_steps is None:
        raise ValueError("--eval_strategy steps needs --eval_steps N")
    return args


def check_train_split(num_images: int, batch_size: int, split: str, dataset: str):
    """Refuse a training split without images, or with fewer than one batch, naming it."""
    if num_images == 0:
        raise ValueError(f"the training split {split!r} of {dataset} has no images")
    if num_images < batch_size:
        raise ValueError(
            f"the training split {split!r} has {num_images} images, fewer than one batch "
            f"(--per_device_train_batch_size {batch_size}): lower the batch size"
        )


def use_cpu() -> bool:
    """Force accelerate onto the CPU only where accelerate itself finds no accelerator (CUDA, MPS, XPU, NPU,
    HPU, MLU, MUSA, SDAA, Neuron, TPU), so that `accelerate launch --multi_gpu --num_processes N` on a machine
    without one forms a gloo group of N CPU processes; elsewhere the device is accelerate's choice (and
    `accelerate config`'s)."""
    return not is_torch_xla_available() and PartialState.default_device.fget(None).type == "cpu"


# Deformable DETR trains the layers that say where to sample (deformable attention's sampling offsets, the
# reference points of its queries) at a tenth of the learning rate
SAMPLING_LEARNING_RATE_FACTOR = 0.1
SAMPLING_LAYERS = (".sampling_offsets.", ".reference_points.")


def build_optimizer(model, learning_rate: float, backbone_learning_rate: float, weight_decay: float = 1e-4,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:  # fmt: skip
    """AdamW with DETR's two learning rates, one for the backbone and one for the transformer, and Deformable
    DETR's third: SAMPLING_LEARNING_RATE_FACTOR x the transformer's for the sampling layers (models with any)."""
    groups = {"transformer": [], "backbone": [], "sampling": []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            kind = "backbone" if name.startswith("model.backbone.") else "sampling" if any(s in name for s in SAMPLING_LAYERS) else "transformer"
            groups[kind].append(parameter)
    rates = {"transformer": learning_rate, "backbone": backbone_learning_rate, "sampling": learning_rate * SAMPLING_LEARNING_RATE_FACTOR}
    param_groups = [{"params": groups[kind], "lr": rates[kind]} for kind in groups if groups[kind] or kind != "sampling"]
    return torch.optim.AdamW(param_groups, lr=learning_rate, weight_decay=weight_decay, betas=betas, eps=eps)


def load_for_fine_tuning(model_name_or_path: str, categories: CategoryMap, *, dataset: str, ignore_mismatched_sizes: bool = True,
                         cache_dir: str | None = None, trust_remote_code: bool = False, **kwargs) -> HfDetrForObjectDetection:  # fmt: skip
    """`HfDetrForObjectDetection.from_pretrained(model_name_or_path, **kwargs)` (kwargs: the run's labels and
    config) for training on `categories`, with the class head's rows following the dataset's classes by name
    (`hf_detr.labels.class_head_rows`, the rule evaluation uses): the same classes in another order or under
    other ids keep what the checkpoint learned of each, a class the checkpoint lacks starts afresh (a
    checkpoint of other classes: the whole head), one the dataset lacks is dropped. Loaded by index, row i
    would go on as the checkpoint's i-th class under the dataset's i-th name. With `ignore_mismatched_sizes`
    off, other classes than the dataset's (order aside) are a ValueError naming both lists."""
    saved = AutoConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    saved_labels = {int(label): name for label, name in (saved.id2label or {}).items()}
    rows = class_head_rows(saved_labels, categories, getattr(saved, "category_ids", None), model=model_name_or_path, dataset=dataset)
    same_classes = None not in rows and sorted(rows) == list(range(len(saved_labels)))
    if not same_classes and not ignore_mismatched_sizes:
        names = label_names(saved_labels) or sorted(saved_labels)
        raise ValueError(
            f"--no-ignore_mismatched_sizes: {model_name_or_path}'s classes {names} are not those of {dataset} "
            f"{categories.names} (matched by name): pass --ignore_mismatched_sizes to drop the checkpoint's other classes "
            "and start the dataset's new ones afresh"
        )
    model = HfDetrForObjectDetection.from_pretrained(
        model_name_or_path, ignore_mismatched_sizes=ignore_mismatched_sizes, cache_dir=cache_dir, **kwargs
    )
    if rows != list(range(len(saved_labels))):
        source = None if all(row is None for row in rows) else HfDetrForObjectDetection.from_pretrained(model_name_or_path, cache_dir=cache_dir)
        carry_class_rows(model, source, rows)
    return model


@torch.no_grad()
def carry_class_rows(model, source, rows: list[int | None]):
    """Row j of each class-indexed weight of `model` (the class heads, the denoising queries' label embeddings)
    becomes row `rows[j]` of `source`'s (the checkpoint's, module by module); a row without one (None, or no
    `source`) starts afresh, from the module's own init. A softmax head's last row ("no object") stays the
    checkpoint's. A two-stage encoder's class head too where it scores by class (DINO); a class-agnostic one
    (Deformable DETR's, trained as "object") is left as loaded."""
    source_modules = dict(source.named_modules()) if source is not None else {}
    prior = next(module.prior_probability for module in model.modules() if isinstance(module, HfDetrHeads))
    for name, module in model.named_modules():
        if isinstance(module, HfDetrHeads):
            layers = [(f"{name}.class_heads.{i}", head, prior) for i, head in enumerate(module.class_heads)]
        elif isinstance(module, EncoderProposals) and not module.class_agnostic:
            layers = [(f"{name}.class_head", module.class_head, prior)]
        elif isinstance(module, Denoising):
            layers = [(f"{name}.label_embeddings", module.label_embeddings, None)]
        else:
            continue
        for layer_name, layer, layer_prior in layers:
            fresh = copy.deepcopy(layer)
            fresh.reset_parameters()
            if layer_prior is not None:
                start_at_prior(fresh, layer_prior)
            old = source_modules.get(layer_name)
            for param_name, param in fresh.named_parameters():
                old_param = getattr(old, param_name, None)
                if old_param is None or old_param.shape[1:] != param.shape[1:]:
                    continue
                for label, row in enumerate(rows):
                    if row is not None:
                        param[label] = old_param[row]
                if param.shape[0] == len(rows) + 1:  # "no object"
                    param[-1] = old_param[-1]
            layer.load_state_dict(fresh.state_dict())


def lr_drop_step(max_train_steps: int, lr_drop_fraction: float) -> int:
    """The optimizer step after which DETR's step schedule lowers the learning rate 10x."""
    return max(1, int(max_train_steps * lr_drop_fraction))


def build_scheduler(optimizer, lr_scheduler_type: str, max_train_steps: int, num_warmup_steps: int = 0,
                    lr_drop_fraction: float = 2 / 3, num_processes: int = 1):  # fmt: skip
    """The learning-rate schedule, counted in scheduler steps: accelerate steps a prepared scheduler once per
    process for each optimizer step, so N processes make N scheduler steps per optimizer step (as in
    transformers' example scripts). "step": DETR's, the rate times 0.1 after `lr_drop_step` optimizer steps,
    after a linear warm-up of `num_warmup_steps`; the others: transformers' get_scheduler."""
    if lr_scheduler_type != "step":
        return get_scheduler(
            lr_scheduler_type, optimizer, num_warmup_steps=num_warmup_steps * num_processes,
            num_training_steps=max_train_steps * num_processes,
        )  # fmt: skip
    drop, warmup = lr_drop_step(max_train_steps, lr_drop_fraction), num_warmup_steps

    def factor(scheduler_step: int) -> float:
        step = scheduler_step // num_processes  # optimizer steps done
        return (min(1.0, (step + 1) / warmup) if warmup else 1.0) * (0.1 if step >= drop else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(loader, accelerator) -> int:
    """Optimizer steps per epoch of a prepared loader (after `prepare` has sharded it over the processes,
    as transformers' examples count them)."""
    return math.ceil(len(loader) / accelerator.gradient_accumulation_steps)


def step_seed(seed: int, step: int, micro_step: int, process: int) -> int:
    """A seed for torch's global generator that depends only on the run's seed and where the run is."""
    return int(np.random.SeedSequence([seed, step, micro_step, process]).generate_state(1, np.uint64)[0] >> 1)


class NonFiniteStepGuard:
    """Skips an optimizer step whose loss, or gradient norm, is not finite on any process (NaN/inf
    pixels, a diverging run): one such step would make every weight NaN. The step's forward passes
    changed the live batch norms' running statistics too; they are put back. Each skip is warned about
    (with the batch's image ids) and counted; after ``limit`` in a row, RuntimeError."""

    def __init__(self, accelerator, model, limit: int, skipped: int = 0):
        self.accelerator, self.limit, self.skipped, self.in_a_row = accelerator, limit, skipped, 0
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.statistics = [b for m in norms for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.saved = [b.clone() for b in self.statistics]
        self.loss_ok, self.ok, self.reason = None, True, ""

    @torch.no_grad()
    def add_loss(self, loss: torch.Tensor):
        """After each forward pass of the accumulation window (no host sync)."""
        self.loss_ok = torch.isfinite(loss) if self.loss_ok is None else self.loss_ok & torch.isfinite(loss)

    def step_ok(self, grad_norm: torch.Tensor | None) -> bool:
        """At the window's optimizer step: may it run? The same answer on every process (one host sync)."""
        grad_ok = torch.isfinite(grad_norm) if grad_norm is not None else torch.ones_like(self.loss_ok)
        flags = self.accelerator.gather(torch.stack([self.loss_ok, grad_ok]).float()[None]).amin(0)
        loss_ok, grad_ok = (flags > 0).tolist()
        self.ok, self.loss_ok = loss_ok and grad_ok, None
        self.reason = "" if self.ok else "non-finite loss" if not loss_ok else "non-finite gradient norm"
        if self.ok:  # the statistics the next window starts from
            self.in_a_row = 0
            with torch.no_grad():
                for saved, buffer in zip(self.saved, self.statistics):
                    saved.copy_(buffer)
        return self.ok

    @torch.no_grad()
    def skip(self, step: int, loss: float, image_ids: list[int]) -> dict:
        """After a step that did not run: restore, warn, count; -> its log entry."""
        for saved, buffer in zip(self.saved, self.statistics):
            buffer.copy_(saved)
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
        self.last = f"step {step}, images {image_ids}"
        logger.warning(
            f"step {step}: {self.reason} (this process's loss: {loss}), optimizer step skipped ({self.in_a_row} in a row, "
            f"{self.skipped} in this run); image ids of this process's batch: {image_ids}", main_process_only=False,
        )  # fmt: skip
        return {"step": step, "loss": None, "skipped": self.reason}

    def stop_if_too_many(self):
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"{self.in_a_row} optimizer steps in a row had a {self.reason} (the last: {self.last}); stopping "
                f"(--max_consecutive_nonfinite_steps {self.limit}). These steps did not change the weights; check "
                "those images and the learning rate."
            )


@dataclass
class LoopResult:
    steps: int  # optimizer steps done (a resumed run's included)
    last_losses: dict  # the loss terms of the last step that ran
    skipped_nonfinite_steps: int  # steps skipped by the NonFiniteStepGuard (a resumed run's included)


def train_loop(
    accelerator, model, optimizer, scheduler, loader, *, max_train_steps: int, seed: int, max_grad_norm: float = 0.1,
    max_consecutive_nonfinite_steps: int = 10, start_step: int = 0, skipped_steps: int = 0,
    log_file: Path | None = None, after_step=None, after_epoch=None, progress: bool = True, ema=None,
) -> LoopResult:  # fmt: skip
    """Train `model` (prepared by `accelerator`, as are `optimizer`, `scheduler` and `loader`, whose dataset
    has `set_epoch` for its augmentation) up to `max_train_steps` optimizer steps.

    Each step: torch's generator seeded from (seed, step, process) (dropout, denoising noise: a resumed
    run draws what an uninterrupted one does), forward with `labels`, backward, gradient clipping to
    `max_grad_norm` (> 0), and the optimizer step unless `NonFiniteStepGuard` skips it. One line per
    step (loss terms and learning rate, or `{"loss": null, "skipped": ...}`) goes to `log_file` (main
    process; a run from step 0 starts it afresh) and to accelerate's trackers.
    `start_step` resumes mid-run (its epoch's first batches are skipped); `skipped_steps` carries a
    resumed run's count. `after_step(step, entry, last)` runs after every step and `after_epoch(epoch,
    step, last)` after every epoch (the last one possibly cut short): checkpoints, evaluations, timing;
    `last` is True once `max_train_steps` are done. `progress`: a progress bar (local main process).
    `ema`: an `hf_detr.ema.ExponentialMovingAverage` of the model, updated after every optimizer step taken.
    """
    per_epoch = steps_per_epoch(loader, accelerator)
    start_epoch, done_in_epoch = divmod(start_step, per_epoch)
    if log_file is not None and start_step == 0 and accelerator.is_main_process:
        log_file.unlink(missing_ok=True)
    guard = NonFiniteStepGuard(accelerator, model, max_consecutive_nonfinite_steps, skipped=skipped_steps)
    bar = tqdm(total=max_train_steps, initial=start_step, disable=not (progress and accelerator.is_local_main_process))
    step, micro_step, last_losses = start_step, 0, {}  # micro_step: batches into the step (gradient accumulation)
    for epoch in range(start_epoch, math.ceil(max_train_steps / per_epoch)):
        model.train()
        loader.set_epoch(epoch)  # the shuffling order
        loader.dataset.set_epoch(epoch)  # the augmentation
        skip = done_in_epoch * accelerator.gradient_accumulation_steps if epoch == start_epoch else 0
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            if batch is None:  # every image of this batch was unreadable (warned and counted by the dataset)
                continue
            torch.manual_seed(step_seed(seed, step, micro_step, accelerator.process_index))
            micro_step += 1
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
                accelerator.backward(outputs.loss)
                guard.add_loss(outputs.loss)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step's update uses
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm > 0 else None
                    # fp16's grad scaler skips steps with non-finite gradients itself, and must see every step
                    fp16_scaler = accelerator.scaler is not None
                    if guard.step_ok(None if fp16_scaler else grad_norm) or fp16_scaler:
                        optimizer.step()
                        if ema is not None:
                            ema.update(accelerator.unwrap_model(model))
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            micro_step, step = 0, step + 1
            bar.update(1)
            if guard.ok:
                last_losses = {"loss": outputs.loss.item(), **{k: v.item() for k, v in outputs.loss_dict.items()}}
                entry = {"step": step, **last_losses, "lr": lr}
            else:
                entry = guard.skip(step, outputs.loss.item(), [int(target["image_id"]) for target in batch["labels"]])
                entry["lr"] = lr
            if log_file is not None and accelerator.is_main_process:
                with open(log_file, "a") as log:
                    log.write(json.dumps(entry) + "\n")
            guard.stop_if_too_many()
            if last_losses:
                bar.set_postfix(loss=f"{last_losses['loss']:.3f}")
            if entry["loss"] is not None:  # a no-op without trackers (--with_tracking)
                accelerator.log({f"train/{k}": v for k, v in last_losses.items()} | {"lr": lr}, step=step)
            if after_step is not None:
                after_step(step, entry, step >= max_train_steps)
                model.train()  # after an evaluation
            if step >= max_train_steps:
                break
        if after_epoch is not None:
            after_epoch(epoch, step, step >= max_train_steps)
            model.train()
        if step >= max_train_steps:
            break
    bar.close()
    return LoopResult(steps=step, last_losses=last_losses, skipped_nonfinite_steps=guard.skipped)
