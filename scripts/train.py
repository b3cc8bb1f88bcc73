"""Train hf_detr with accelerate.

    accelerate launch scripts/train.py                      # built-in synthetic dataset, small model, CPU-friendly
    accelerate launch scripts/train.py --dataset_name detection-datasets/coco --output_dir detr-coco
    accelerate launch scripts/train.py --dataset_name /data/coco --train_split train2017 --eval_split val2017

Argument names follow transformers' object-detection example scripts. With no arguments it trains a
small DETR on the built-in synthetic dataset; with a dataset it trains DETR-R50 (the paper's recipe:
AdamW, lr 1e-4 / backbone 1e-5, weight decay 1e-4, gradient clipping 0.1, a step LR drop).
"""

import argparse
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

import hf_detr
from hf_detr import data as detr_data
from hf_detr.evaluation import evaluate_model
from hf_detr.hub import push_checkpoint, render_model_card
from hf_detr.speed import SDPA_BACKENDS, enable_fast_mode

logger = get_logger(__name__)

# The default run: a DETR small enough to train from scratch on 2 CPU cores in minutes.
SMALL_MODEL = dict(
    backbone_config=dict(
        model_type="resnet", embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 2],
        layer_type="basic", out_features=["stage3"],  # stride 16: an 8x8 feature map for 128-pixel images
    ),
    freeze_backbone_stages=0, freeze_backbone_batch_norm=False,  # trained from scratch: train all of it, live BN
    d_model=128, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=256, decoder_ffn_dim=256, num_queries=10, dropout=0.0,
    # the recipe that converged fastest in scripts/benchmark_convergence.py (BENCHMARKS.md): DAB-DETR's anchor
    # queries, the focal class loss (matching cost 2), Group DETR's query groups, DN-DETR's denoising queries
    query_type="anchor", class_loss="focal", class_cost=2.0, num_query_groups=6, num_denoising_queries=40,
)  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_name", default=None, help="Hub dataset id or local COCO folder; default: built-in synthetic data")
    p.add_argument("--train_split", default=None, help="default: the dataset's own (train / train2017)")
    p.add_argument("--eval_split", default=None, help="default: the dataset's own (val / validation / test)")
    p.add_argument("--bbox_format", choices=["xywh", "xyxy"], default=None, help="Hub datasets: box format of `objects.bbox`")
    p.add_argument("--model_name_or_path", default=None, help="start from a checkpoint (e.g. a converted DETR)")
    p.add_argument(
        "--config_overrides", default=None,
        help='HfDetrConfig values over the run\'s defaults, e.g. "query_type=anchor,class_loss=focal,num_query_groups=4"',
    )  # fmt: skip
    p.add_argument("--backbone_checkpoint", default="microsoft/resnet-50", help="ImageNet backbone for DETR-R50 runs")
    p.add_argument("--output_dir", default="outputs/hf-detr-synthetic")
    p.add_argument("--image_size", type=int, default=None, help="shortest edge at evaluation (and largest train scale)")
    p.add_argument("--max_size", type=int, default=None, help="longest edge cap")
    p.add_argument("--augmentation", choices=["detr", "flip"], default=None, help="detr: flip + multi-scale + crops")
    p.add_argument("--num_train_epochs", type=int, default=None)
    p.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    p.add_argument("--per_device_train_batch_size", type=int, default=None)
    p.add_argument("--per_device_eval_batch_size", type=int, default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--backbone_learning_rate", type=float, default=None)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--max_grad_norm", type=float, default=0.1)
    p.add_argument("--lr_drop_fraction", type=float, default=2 / 3, help="the LR drops 10x after this fraction of the steps")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--checkpointing_steps", default=None, help="an integer, or 'epoch'")
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    p.add_argument("--eval_every_epoch", action="store_true", help="COCO evaluation after every epoch, not only at the end")
    p.add_argument("--max_consecutive_nonfinite_steps", type=int, default=10,
                   help="a step whose loss or gradient is not finite is skipped (warned, counted); stop after this many in a row")  # fmt: skip
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None)
    p.add_argument("--with_tracking", action="store_true", help="log every loss term and metric (TensorBoard)")
    p.add_argument("--report_to", default="tensorboard")
    p.add_argument("--seed", type=int, default=42)
    # speed modes (opt-in; bf16/fp16 come from accelerate: `accelerate launch --mixed_precision bf16`)
    p.add_argument("--torch_compile", action="store_true", help="torch.compile the backbone + transformer")
    p.add_argument("--sdpa_backend", default=None, choices=sorted(SDPA_BACKENDS), help="pin the attention kernel")
    p.add_argument("--synthetic_train_images", type=int, default=None)
    p.add_argument("--synthetic_val_images", type=int, default=None)
    args = p.parse_args(argv)
    if args.max_consecutive_nonfinite_steps < 1:
        p.error(f"--max_consecutive_nonfinite_steps must be >= 1, got {args.max_consecutive_nonfinite_steps}")
    return args


def apply_defaults(args):
    """Fill in what depends on the dataset: a small, fast run on synthetic data, DETR's recipe otherwise."""
    synthetic = args.dataset_name is None
    defaults = (
        dict(image_size=128, max_size=128, augmentation="flip", num_train_epochs=6, per_device_train_batch_size=16,
             per_device_eval_batch_size=32, learning_rate=5e-4, backbone_learning_rate=5e-4,
             synthetic_train_images=4000, synthetic_val_images=200)
        if synthetic
        else dict(image_size=800, max_size=1333, augmentation="detr", num_train_epochs=300, per_device_train_batch_size=4,
                  per_device_eval_batch_size=4, learning_rate=1e-4, backbone_learning_rate=1e-5)
    )  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def load_data(args, accelerator):
    """-> (train Hub-schema dataset, eval dataset, CategoryMap, dataset label for the card)."""
    if args.dataset_name is None:
        cache = Path(os.environ.get("HF_DETR_CACHE", Path.home() / ".cache" / "hf_detr"))
        root = cache / f"synthetic-{args.synthetic_train_images}-{args.synthetic_val_images}"
        with accelerator.main_process_first():  # one process writes the images, the others wait
            detr_data.make_synthetic_coco(root, num_train=args.synthetic_train_images, num_val=args.synthetic_val_images, seed=0)
        args.train_split, args.eval_split = "train", "val"
        train, categories = detr_data.load_coco_folder(root, "train")
        val, _ = detr_data.load_coco_folder(root, "val")
        return train, val, categories, "hf_detr synthetic shapes"
    is_coco_folder = (Path(args.dataset_name) / "annotations").is_dir()
    known = detr_data.HUB_DATASETS.get(args.dataset_name)
    # resolved here, so a checkpoint records the splits actually used
    args.train_split = args.train_split or ("train2017" if is_coco_folder else known.train_split if known else "train")
    args.eval_split = args.eval_split or ("val2017" if is_coco_folder else known.eval_split if known else "validation")
    hub_kwargs = {} if is_coco_folder else {"bbox_format": args.bbox_format}
    train, categories = detr_data.load_detection_dataset(args.dataset_name, args.train_split, **hub_kwargs)
    val, _ = detr_data.load_detection_dataset(args.dataset_name, args.eval_split, **hub_kwargs)
    return train, val, categories, args.dataset_name


def config_overrides(overrides: str | None) -> dict:
    """--config_overrides "d_model=128,query_type=anchor" -> {name: value} typed as HfDetrConfig's
    fields (transformers' `PreTrainedConfig.update_from_string`, the convention of its run_clm example)."""
    if not overrides:
        return {}
    config = hf_detr.HfDetrConfig()
    config.update_from_string(overrides)
    return {item.split("=", 1)[0]: getattr(config, item.split("=", 1)[0]) for item in overrides.split(",")}


def check_batches(num_images: int, num_batches: int, args):
    """Refuse a training split that gives no full batch (batches are full: drop_last), naming it."""
    if num_images == 0:
        raise ValueError(f"the training split {args.train_split!r} of {args.dataset_name or 'the synthetic data'} has no images")
    if num_batches == 0:
        raise ValueError(
            f"the training split {args.train_split!r} has {num_images} images, fewer than one batch "
            f"(--per_device_train_batch_size {args.per_device_train_batch_size}): lower the batch size"
        )


def build_model(args, categories):
    labels = dict(id2label=categories.id2label, label2id={v: k for k, v in categories.id2label.items()}, category_ids=list(categories.category_ids))
    overrides = config_overrides(args.config_overrides)
    if args.model_name_or_path:
        # e.g. a converted COCO DETR fine-tuned on a new label set: the class head is re-initialised
        return hf_detr.HfDetrForObjectDetection.from_pretrained(args.model_name_or_path, ignore_mismatched_sizes=True, **labels, **overrides)
    if args.dataset_name is None:
        return hf_detr.HfDetrForObjectDetection(hf_detr.HfDetrConfig(**{**SMALL_MODEL, **labels, **overrides}))
    config = hf_detr.HfDetrConfig(**{"use_pretrained_backbone": True, "backbone_checkpoint": args.backbone_checkpoint, **labels, **overrides})
    return hf_detr.HfDetrForObjectDetection(config)


def build_optimizer(model, args):
    """AdamW with DETR's two learning rates: one for the backbone, one for everything else."""
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("model.backbone.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("model.backbone.")]
    groups = [{"params": rest, "lr": args.learning_rate}, {"params": backbone, "lr": args.backbone_learning_rate}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)


# Settings that fix which samples a step sees: a resumed run must share them with its checkpoint,
# or it would skip the wrong number of samples (checked against the checkpoint's train_args.json).
DATA_ORDER_SETTINGS = (
    "dataset_name", "train_split", "synthetic_train_images", "train_images", "per_device_train_batch_size",
    "gradient_accumulation_steps", "num_processes", "seed",
)  # fmt: skip


def run_settings(args, accelerator, train_set) -> dict:
    """The run's arguments (no token), the number of processes and of training images."""
    settings = {k: v for k, v in vars(args).items() if k != "hub_token"}
    return {**settings, "num_processes": accelerator.num_processes, "train_images": len(train_set)}


def check_resume_settings(checkpoint: Path, settings: dict):
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


def write_text_atomic(path: Path, text: str):
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


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


def check_finite_weights(model, what: str):
    """Never save NaN/inf weights: raise naming the first parameters or buffers that hold any."""
    tensors = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    if not bool(finite.all()):
        names = [name for (name, _), ok in zip(tensors, finite.tolist()) if not ok]
        raise RuntimeError(f"not saving {what}: non-finite values in {len(names)} weights, e.g. {names[:3]}")


def save_checkpoint(accelerator, model, output_dir: Path, name: str, settings: dict):
    """accelerator.save_state (+ the run's settings, train_args.json), written to a temporary folder and
    renamed into place, so a run killed mid-write never leaves a half checkpoint that
    --resume_from_checkpoint would pick up."""
    check_finite_weights(model, f"checkpoint {name}")
    final, partial = output_dir / name, output_dir / f"{name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "train_args.json").write_text(json.dumps(settings, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    accelerator.wait_for_everyone()


def save_model(model, image_processor, output_dir: Path):
    """save_pretrained through a temporary folder whose files are then renamed into ``output_dir``
    (weights last): a run killed while saving never leaves a half-written file there."""
    check_finite_weights(model, "the trained model")
    partial = output_dir / "model.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    image_processor.save_pretrained(partial)
    for file in sorted(partial.iterdir(), key=lambda f: "safetensors" in f.name):
        os.replace(file, output_dir / file.name)
    partial.rmdir()


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    if resume != "latest":
        return Path(resume)
    done = [p for p in output_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")]
    if not done:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no step_* checkpoint in {output_dir}")
    return max(done, key=lambda p: int(p.name.split("_")[1]))


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


def train(args):
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        # Without a GPU, processes started by `accelerate launch --multi_gpu --num_processes N` (torchrun)
        # must be told they are CPU workers to join one gloo group (accelerate's `--cpu` launches one process).
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # seeded shuffling: a resumed run sees the same batches as an uninterrupted one
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    logger.info(f"{accelerator.num_processes} process(es), {accelerator.distributed_type}, device {accelerator.device}")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    train_data, eval_data, categories, dataset_label = load_data(args, accelerator)
    train_transform = detr_data.build_transform(
        train=True, image_size=args.image_size, max_size=args.max_size, augmentation=args.augmentation
    )
    train_set = detr_data.DetectionDataset(train_data, categories, train_transform, seed=args.seed)
    check_batches(len(train_set), len(train_set) // args.per_device_train_batch_size, args)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.per_device_train_batch_size, shuffle=True,
        collate_fn=detr_data.collate_fn, num_workers=args.num_workers, drop_last=True,
    )  # fmt: skip
    model = build_model(args, categories)
    # the processor whose post-processing fits the model's class loss
    image_processor = hf_detr.image_processor_for(model.config, size={"shortest_edge": args.image_size, "longest_edge": args.max_size})
    enable_fast_mode(model, compile=args.torch_compile, sdpa_backend=args.sdpa_backend)
    optimizer = build_optimizer(model, args)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    # DETR's step schedule: one 10x drop late in training (epoch 200 of 300 in the paper).
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, int(args.max_train_steps * args.lr_drop_fraction)), gamma=0.1)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    check_batches(len(train_set), len(loader), args)
    settings = run_settings(args, accelerator, train_set)
    if args.with_tracking:
        accelerator.init_trackers("hf_detr", {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)})

    completed_steps, start_epoch, skip_batches, skipped_steps = 0, 0, 0, 0
    log_file = output_dir / "train_log.jsonl"
    if not args.resume_from_checkpoint and accelerator.is_main_process:
        log_file.unlink(missing_ok=True)
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(output_dir, args.resume_from_checkpoint)
        check_resume_settings(checkpoint, settings)
        accelerator.load_state(str(checkpoint))  # model, optimizer, scheduler, RNG states, sampler
        completed_steps = int(checkpoint.name.split("_")[1])
        start_epoch, done_in_epoch = divmod(completed_steps, steps_per_epoch)
        skip_batches = done_in_epoch * args.gradient_accumulation_steps
        if accelerator.is_main_process:  # the steps after the checkpoint are trained (and logged) again
            skipped_steps = sum(1 for entry in truncate_log(log_file, completed_steps) if entry.get("skipped"))
        logger.info(f"resumed from {checkpoint} at step {completed_steps}")

    progress = tqdm(total=args.max_train_steps, initial=completed_steps, disable=not accelerator.is_local_main_process)
    metrics, last_losses = {}, {}
    guard = NonFiniteStepGuard(accelerator, model, args.max_consecutive_nonfinite_steps, skipped=skipped_steps)
    for epoch in range(start_epoch, num_epochs):
        model.train()
        loader.set_epoch(epoch)  # the shuffling order
        train_set.set_epoch(epoch)  # the augmentation
        epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if epoch == start_epoch and skip_batches else loader
        for batch in epoch_loader:
            if batch is None:  # every image of this batch was unreadable (warned and counted by the dataset)
                continue
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
                accelerator.backward(outputs.loss)
                guard.add_loss(outputs.loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm) if args.max_grad_norm > 0 else None
                    # fp16's grad scaler skips steps with non-finite gradients itself, and must see every step
                    fp16_scaler = accelerator.scaler is not None
                    if guard.step_ok(None if fp16_scaler else grad_norm) or fp16_scaler:
                        optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            if guard.ok:
                last_losses = {"loss": outputs.loss.item(), **{k: v.item() for k, v in outputs.loss_dict.items()}}
                entry = {"step": completed_steps, **last_losses}
            else:
                entry = guard.skip(completed_steps, outputs.loss.item(), [int(target["image_id"]) for target in batch["labels"]])
            if accelerator.is_main_process:  # one line per optimizer step, also read by the resume test
                with open(log_file, "a") as log:
                    log.write(json.dumps(entry) + "\n")
            guard.stop_if_too_many()
            if last_losses:
                progress.set_postfix(loss=f"{last_losses['loss']:.3f}")
            if args.with_tracking and entry["loss"] is not None:
                accelerator.log({f"train/{k}": v for k, v in last_losses.items()} | {"lr": scheduler.get_last_lr()[0]}, step=completed_steps)
            if args.checkpointing_steps not in (None, "epoch") and completed_steps % int(args.checkpointing_steps) == 0:
                save_checkpoint(accelerator, model, output_dir, f"step_{completed_steps}", settings)
            if completed_steps >= args.max_train_steps:
                break
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, model, output_dir, f"step_{completed_steps}", settings)
        if args.eval_every_epoch and completed_steps < args.max_train_steps:  # the last evaluation follows the save
            metrics = evaluate_model(accelerator.unwrap_model(model), image_processor, eval_data, categories,
                                     batch_size=args.per_device_eval_batch_size, accelerator=accelerator)  # fmt: skip
            logger.info(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if args.with_tracking:
                accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=completed_steps)
        if completed_steps >= args.max_train_steps:
            break
    progress.close()

    # The trained model first: nothing after training (evaluation, the card, the push) may lose it.
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        save_model(unwrapped, image_processor, output_dir)
        logger.info(f"saved the trained model to {output_dir}")
    # Images skipped by any process, merged (each process reads its own shard of the data).
    image_status = accelerator.gather(train_set.image_status.to(accelerator.device, torch.int32)[None]).amax(0).cpu()
    train_stats = {**train_set.stats_for(image_status).as_dict(), "skipped_nonfinite_steps": guard.skipped}
    try:
        metrics, eval_stats = evaluate_model(unwrapped, image_processor, eval_data, categories, return_stats=True,
                                             batch_size=args.per_device_eval_batch_size, accelerator=accelerator)  # fmt: skip
    except Exception:
        logger.error(f"evaluation failed; the trained model is saved in {output_dir}")
        raise
    logger.info("final evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.with_tracking:
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=completed_steps)
        accelerator.end_training()

    if accelerator.is_main_process:
        data_stats = {"train": train_stats, "eval": eval_stats}
        results = {**metrics, "train_steps": completed_steps, "final_train_loss": last_losses.get("loss"), "data_stats": data_stats}
        write_text_atomic(output_dir / "eval_results.json", json.dumps(results, indent=2))
        training_args = {k: v for k, v in vars(args).items() if k != "hub_token"}
        base_model = args.model_name_or_path if args.model_name_or_path and not Path(args.model_name_or_path).exists() else None
        card = render_model_card(
            metrics=metrics, dataset_name=dataset_label, training_args=training_args, model_id=args.hub_model_id,
            dataset_split=args.eval_split or "val", base_model=base_model, model_config=unwrapped.config,
        )  # fmt: skip
        write_text_atomic(output_dir / "README.md", card)
        logger.info(f"run summary: {completed_steps} steps ({guard.skipped} skipped: non-finite), final loss {last_losses.get('loss')}, data {data_stats}")
        logger.info(f"saved to {output_dir}; map {metrics.get('map', float('nan')):.4f}")
        if args.push_to_hub:
            url = push_checkpoint(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token)
            logger.info(f"pushed to {url}")
    return metrics


def main(argv=None):
    return train(apply_defaults(parse_args(argv)))


if __name__ == "__main__":
    main()
