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

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import PartialState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, is_torch_xla_available, set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, SchedulerType, get_scheduler

import hf_detr
from hf_detr import data as detr_data
from hf_detr.convert import CONFIG_CONVERTERS, config_from_transformers_config
from hf_detr.evaluation import COCO_METRIC_NAMES, evaluate_model
from hf_detr.hub import hub_id, push_checkpoint, render_model_card
from hf_detr.image_processing import fit_image_processor
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
    # queries, the focal class loss weighted 2 as in Deformable DETR (matching cost 3), Group DETR's query
    # groups, DN-DETR's denoising queries
    query_type="anchor", class_loss="focal", class_cost=3.0, ce_loss_coefficient=2.0, num_query_groups=6,
    num_denoising_queries=40,
)  # fmt: skip


# transformers' schedulers (get_scheduler) that need nothing but the step count; "step" is DETR's 10x drop
LR_SCHEDULERS = ["step"] + [t.value for t in SchedulerType if t.value not in ("reduce_lr_on_plateau", "greedy")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data (the names of transformers' object-detection examples)
    p.add_argument("--dataset_name", default=None, help="Hub dataset id or local COCO folder; default: built-in synthetic data")
    p.add_argument("--dataset_config_name", default=None, help="the Hub dataset's configuration (datasets.load_dataset's name)")
    p.add_argument("--train_split", default=None, help="default: the dataset's own (train / train2017)")
    p.add_argument("--eval_split", default=None, help="default: the dataset's own (val / validation / test)")
    p.add_argument("--train_val_split", type=float, default=0.15,
                   help="a dataset without the evaluation split: this fraction of the training split is held out for it")  # fmt: skip
    p.add_argument("--max_train_samples", type=int, default=None, help="train on the first N images only")
    p.add_argument("--max_eval_samples", type=int, default=None, help="evaluate on the first N images only")
    p.add_argument("--bbox_format", choices=["xywh", "xyxy"], default=None, help="Hub datasets: box format of `objects.bbox`")
    p.add_argument("--label_names", default=None,
                   help='Hub datasets whose objects.category holds integers without names: "cat,dog,..." (label i = the i-th)')  # fmt: skip
    p.add_argument("--cache_dir", default=None, help="where datasets and checkpoints downloaded from the Hub are stored")
    p.add_argument("--trust_remote_code", action="store_true", help="load a --model_name_or_path / --config_name with its own code")
    # model
    p.add_argument("--model_name_or_path", default=None,
                   help="start from a checkpoint: hf_detr, or transformers' DETR / Conditional DETR / DAB-DETR (converted on the fly)")  # fmt: skip
    p.add_argument("--config_name", default=None, help="start from this config (folder or Hub id) instead of the run's default")
    p.add_argument(
        "--config_overrides", default=None,
        help='HfDetrConfig values over the run\'s defaults, e.g. "query_type=anchor,class_loss=focal,num_query_groups=4"',
    )  # fmt: skip
    p.add_argument("--image_processor_name", default=None, help="image processor (folder or Hub id); default: the one that fits the model")
    p.add_argument("--ignore_mismatched_sizes", action=argparse.BooleanOptionalAction, default=True,
                   help="--model_name_or_path with other labels: re-initialise the class head (default on)")  # fmt: skip
    p.add_argument("--backbone_checkpoint", default="microsoft/resnet-50", help="ImageNet backbone for DETR-R50 runs")
    p.add_argument("--output_dir", default="outputs/hf-detr-synthetic")
    p.add_argument("--image_size", type=int, default=None, help="shortest edge at evaluation (and largest train scale)")
    p.add_argument("--max_size", type=int, default=None, help="longest edge cap")
    p.add_argument("--augmentation", choices=["detr", "flip"], default=None, help="detr: flip + multi-scale + crops")
    # training
    p.add_argument("--num_train_epochs", type=int, default=None)
    p.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    p.add_argument("--per_device_train_batch_size", type=int, default=None)
    p.add_argument("--per_device_eval_batch_size", type=int, default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--backbone_learning_rate", type=float, default=None)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=0.1)
    p.add_argument("--lr_scheduler_type", choices=LR_SCHEDULERS, default="step",
                   help="step: DETR's 10x drop after --lr_drop_fraction of the steps; the others: transformers' get_scheduler")  # fmt: skip
    p.add_argument("--num_warmup_steps", type=int, default=0, help="linear warm-up steps of the learning rate")
    p.add_argument("--lr_drop_fraction", type=float, default=None,
                   help="step: the LR drops 10x after this fraction of the steps (default: DETR's 2/3; the built-in run 0.8)")  # fmt: skip
    p.add_argument("--dataloader_num_workers", "--num_workers", type=int, default=None,
                   help="DataLoader workers per process, for training and evaluation (default: from the CPUs, 1-4)")  # fmt: skip
    # checkpoints and evaluation
    p.add_argument("--checkpointing_steps", default=None, help="an integer, or 'epoch'")
    p.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the latest N step_* checkpoints")
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    p.add_argument("--eval_strategy", choices=["no", "steps", "epoch"], default=None,
                   help="COCO evaluation during training (the final one always runs); default: every epoch on a dataset, "
                        "no on the synthetic data; 'steps' with --eval_steps")  # fmt: skip
    p.add_argument("--eval_steps", type=int, default=None, help="evaluate every N steps (--eval_strategy steps)")
    p.add_argument("--eval_every_epoch", action="store_true", help="same as --eval_strategy epoch")
    p.add_argument("--metric_for_best_model", choices=COCO_METRIC_NAMES, default="map",
                   help="with evaluations during training: the model with the best value is kept in <output_dir>/best_model")  # fmt: skip
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
    if args.eval_every_epoch:
        if args.eval_strategy not in (None, "epoch"):
            p.error(f"--eval_every_epoch contradicts --eval_strategy {args.eval_strategy}")
        args.eval_strategy = "epoch"
    if args.eval_steps is not None:
        if args.eval_steps < 1:
            p.error(f"--eval_steps must be >= 1, got {args.eval_steps}")
        if args.eval_strategy not in (None, "steps"):
            p.error(f"--eval_steps {args.eval_steps} needs --eval_strategy steps, got --eval_strategy {args.eval_strategy}")
        args.eval_strategy = "steps"
    if args.eval_strategy == "steps" and args.eval_steps is None:
        p.error("--eval_strategy steps needs --eval_steps N")
    if not 0 < args.train_val_split < 1:
        p.error(f"--train_val_split must be in (0, 1), got {args.train_val_split}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        p.error(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    return args


def apply_defaults(args):
    """Fill in what depends on the dataset: a small, fast run on synthetic data, DETR's recipe otherwise."""
    synthetic = args.dataset_name is None
    defaults = (
        dict(image_size=128, max_size=128, augmentation="flip", num_train_epochs=6, per_device_train_batch_size=16,
             per_device_eval_batch_size=32, learning_rate=5e-4, backbone_learning_rate=5e-4, lr_drop_fraction=0.8,
             synthetic_train_images=4000, synthetic_val_images=200)
        if synthetic
        else dict(image_size=800, max_size=1333, augmentation="detr", num_train_epochs=300, per_device_train_batch_size=4,
                  per_device_eval_batch_size=4, learning_rate=1e-4, backbone_learning_rate=1e-5, lr_drop_fraction=2 / 3)
    )  # fmt: skip
    defaults |= dict(eval_strategy="no" if synthetic else "epoch", dataloader_num_workers=detr_data.default_num_workers())
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
        return select_samples(train, val, args), categories, "hf_detr synthetic shapes"
    is_coco_folder = (Path(args.dataset_name) / "annotations").is_dir()
    eval_split_given = args.eval_split is not None
    # resolved here, so a checkpoint records the splits actually used (a COCO folder's: the ones it has)
    train_split, eval_split = detr_data.default_splits(args.dataset_name)
    args.train_split, args.eval_split = args.train_split or train_split, args.eval_split or eval_split
    kwargs = {} if is_coco_folder else {"bbox_format": args.bbox_format, "config_name": args.dataset_config_name, "cache_dir": args.cache_dir}
    if args.label_names and not is_coco_folder:
        kwargs["categories"] = detr_data.CategoryMap.from_names([name.strip() for name in args.label_names.split(",")])
    with accelerator.main_process_first():  # one process downloads and prepares, the others read its cache
        train, categories = detr_data.load_detection_dataset(args.dataset_name, args.train_split, **kwargs)
        try:
            val, _ = detr_data.load_detection_dataset(args.dataset_name, args.eval_split, **kwargs)
        except (FileNotFoundError, ValueError) as err:
            if eval_split_given or not detr_data.is_missing_split(err):
                raise
            # as transformers' examples do for datasets with a training split only
            logger.warning(
                f"{args.dataset_name} has no {args.eval_split!r} split ({err}); holding out --train_val_split "
                f"{args.train_val_split} of {args.train_split!r} for evaluation (seed {args.seed})"
            )
            parts = train.train_test_split(test_size=args.train_val_split, seed=args.seed)
            train, val = parts["train"], parts["test"]
            args.eval_split = f"{args.train_split}[held out {args.train_val_split}]"
    return select_samples(train, val, args), categories, args.dataset_name


def select_samples(train, val, args):
    """--max_train_samples / --max_eval_samples: the first N images of each split."""
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        val = val.select(range(min(args.max_eval_samples, len(val))))
    return train, val


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


def load_config(name: str, args) -> hf_detr.HfDetrConfig:
    """--config_name: an hf_detr config, or transformers' DETR / Conditional DETR / DAB-DETR one (mapped)."""
    config = AutoConfig.from_pretrained(name, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)
    if config.model_type in CONFIG_CONVERTERS:
        logger.info(f"--config_name {name}: a transformers {config.model_type!r} config, mapped to hf_detr's")
        return config_from_transformers_config(config)
    if not isinstance(config, hf_detr.HfDetrConfig) and type(config).__name__ != "HfDetrConfig":
        raise ValueError(f"--config_name {name}: a {config.model_type!r} config, not hf_detr's or a transformers DETR's")
    return config


def step_seed(seed: int, step: int, micro_step: int, process: int) -> int:
    """A seed for torch's global generator that depends only on the run's seed and where the run is."""
    return int(np.random.SeedSequence([seed, step, micro_step, process]).generate_state(1, np.uint64)[0] >> 1)


def build_model(args, categories):
    labels = dict(id2label=categories.id2label, label2id={v: k for k, v in categories.id2label.items()}, category_ids=list(categories.category_ids))
    overrides = config_overrides(args.config_overrides)
    config = None
    if args.config_name:  # its values, then the run's labels and --config_overrides, checked together
        config = hf_detr.HfDetrConfig.from_dict(load_config(args.config_name, args).to_dict(), **labels, **overrides)
    if args.model_name_or_path:
        # e.g. a converted COCO DETR fine-tuned on a new label set: the class head is re-initialised
        # (--ignore_mismatched_sizes); a transformers DETR checkpoint is converted on the fly
        kwargs = dict(config=config) if config is not None else {**labels, **overrides}
        return hf_detr.HfDetrForObjectDetection.from_pretrained(
            args.model_name_or_path, ignore_mismatched_sizes=args.ignore_mismatched_sizes, cache_dir=args.cache_dir, **kwargs
        )
    if config is not None:
        return hf_detr.HfDetrForObjectDetection(config)
    if args.dataset_name is None:
        return hf_detr.HfDetrForObjectDetection(hf_detr.HfDetrConfig(**{**SMALL_MODEL, **labels, **overrides}))
    config = hf_detr.HfDetrConfig(**{"use_pretrained_backbone": True, "backbone_checkpoint": args.backbone_checkpoint, **labels, **overrides})
    return hf_detr.HfDetrForObjectDetection(config)


def build_image_processor(args, config):
    """--image_processor_name, or the processor whose post-processing fits the model's class loss, at the run's sizes."""
    if args.image_processor_name:
        given = AutoImageProcessor.from_pretrained(args.image_processor_name, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)
        return fit_image_processor(given, config, f"--image_processor_name {args.image_processor_name}")
    return hf_detr.image_processor_for(config, size={"shortest_edge": args.image_size, "longest_edge": args.max_size})


def build_optimizer(model, args):
    """AdamW with DETR's two learning rates: one for the backbone, one for everything else."""
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("model.backbone.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("model.backbone.")]
    groups = [{"params": rest, "lr": args.learning_rate}, {"params": backbone, "lr": args.backbone_learning_rate}]
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )


def lr_drop_step(args) -> int:
    """The optimizer step after which DETR's step schedule lowers the learning rate 10x."""
    return max(1, int(args.max_train_steps * args.lr_drop_fraction))


def build_scheduler(optimizer, args, num_processes: int):
    """The learning-rate schedule, counted in scheduler steps: accelerate steps a prepared scheduler once per
    process for each optimizer step, so N processes make N scheduler steps per optimizer step (as in
    transformers' example scripts). "step": DETR's, the rate times 0.1 after `lr_drop_step` optimizer steps,
    after a linear warm-up of --num_warmup_steps; the others: transformers' get_scheduler."""
    if args.lr_scheduler_type != "step":
        return get_scheduler(
            args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps * num_processes,
            num_training_steps=args.max_train_steps * num_processes,
        )  # fmt: skip
    drop, warmup = lr_drop_step(args), args.num_warmup_steps

    def factor(scheduler_step: int) -> float:
        step = scheduler_step // num_processes  # optimizer steps done
        return (min(1.0, (step + 1) / warmup) if warmup else 1.0) * (0.1 if step >= drop else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def use_cpu() -> bool:
    """Force accelerate onto the CPU only where accelerate itself finds no accelerator (CUDA, MPS, XPU, NPU,
    HPU, MLU, MUSA, SDAA, Neuron, TPU), so that `accelerate launch --multi_gpu --num_processes N` on a machine
    without one forms a gloo group of N CPU processes; elsewhere the device is accelerate's choice (and
    `accelerate config`'s)."""
    return not is_torch_xla_available() and PartialState.default_device.fget(None).type == "cpu"


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


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.split("_")[1])


def completed_checkpoints(output_dir: Path) -> list[Path]:
    return [p for p in output_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")]


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    if resume != "latest":
        return Path(resume)
    done = completed_checkpoints(output_dir)
    if not done:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no step_* checkpoint in {output_dir}")
    return max(done, key=checkpoint_step)


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
        # Where accelerate finds no accelerator, the processes started by `accelerate launch --multi_gpu
        # --num_processes N` (torchrun) must be told they are CPU workers to join one gloo group
        # (accelerate's `--cpu` launches one process); elsewhere accelerate picks the device.
        cpu=use_cpu(),
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

    (train_data, eval_data), categories, dataset_label = load_data(args, accelerator)
    train_transform = detr_data.build_transform(
        train=True, image_size=args.image_size, max_size=args.max_size, augmentation=args.augmentation
    )
    train_set = detr_data.DetectionDataset(train_data, categories, train_transform, seed=args.seed)
    check_batches(len(train_set), len(train_set) // args.per_device_train_batch_size, args)
    # Every image every epoch (no drop_last): with several processes accelerate fills the last batches up
    # with images from the epoch's start (even_batches), so every step has full batches on every process.
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.per_device_train_batch_size, shuffle=True,
        collate_fn=detr_data.collate_fn, num_workers=args.dataloader_num_workers,
    )  # fmt: skip
    model = build_model(args, categories)
    train_set.check_num_queries(model.config.num_queries)  # warned about and counted in the run's data_stats
    image_processor = build_image_processor(args, model.config)
    enable_fast_mode(model, compile=args.torch_compile, sdpa_backend=args.sdpa_backend)
    optimizer = build_optimizer(model, args)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # Counted after `prepare`, which shards the loader over the processes (as transformers' examples do).
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    scheduler = accelerator.prepare(build_scheduler(optimizer, args, accelerator.num_processes))
    logger.info(
        f"{len(train_set)} training images, {steps_per_epoch} steps per epoch on each of {accelerator.num_processes} "
        f"process(es) (batch {args.per_device_train_batch_size} each), {args.max_train_steps} steps in {num_epochs} epochs"
        + (f"; the learning rate drops 10x after step {lr_drop_step(args)}" if args.lr_scheduler_type == "step" else "")
    )
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
        completed_steps = checkpoint_step(checkpoint)
        start_epoch, done_in_epoch = divmod(completed_steps, steps_per_epoch)
        skip_batches = done_in_epoch * args.gradient_accumulation_steps
        if accelerator.is_main_process:  # the steps after the checkpoint are trained (and logged) again
            skipped_steps = sum(1 for entry in truncate_log(log_file, completed_steps) if entry.get("skipped"))
        logger.info(f"resumed from {checkpoint} at step {completed_steps} (epoch {start_epoch}, {done_in_epoch} steps into it)")

    def evaluate(return_stats=False):
        return evaluate_model(
            accelerator.unwrap_model(model), image_processor, eval_data, categories, batch_size=args.per_device_eval_batch_size,
            accelerator=accelerator, num_workers=args.dataloader_num_workers, per_class=True, return_stats=return_stats,
        )  # fmt: skip

    best = BestModel(output_dir, args.metric_for_best_model)

    def evaluate_during_training(when: str):
        metrics = evaluate()
        logger.info(f"{when}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in COCO_METRIC_NAMES))
        best.update(accelerator, model, image_processor, metrics, completed_steps)
        if args.with_tracking:
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=completed_steps)
        model.train()

    progress = tqdm(total=args.max_train_steps, initial=completed_steps, disable=not accelerator.is_local_main_process)
    last_losses = {}
    guard = NonFiniteStepGuard(accelerator, model, args.max_consecutive_nonfinite_steps, skipped=skipped_steps)
    micro_step = 0  # batches into the current optimizer step (gradient accumulation); resumes start at 0
    for epoch in range(start_epoch, num_epochs):
        model.train()
        loader.set_epoch(epoch)  # the shuffling order
        train_set.set_epoch(epoch)  # the augmentation
        epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if epoch == start_epoch and skip_batches else loader
        for batch in epoch_loader:
            if batch is None:  # every image of this batch was unreadable (warned and counted by the dataset)
                continue
            # Dropout and the denoising queries' noise draw from torch's global generator: seeded here from the run's
            # seed, the step and the process, so a resumed run draws exactly what an uninterrupted one does, whatever
            # else drew random numbers in between (data-loader workers, evaluation, checkpointing).
            torch.manual_seed(step_seed(args.seed, completed_steps, micro_step, accelerator.process_index))
            micro_step += 1
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
                accelerator.backward(outputs.loss)
                guard.add_loss(outputs.loss)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step's update uses
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
            micro_step = 0
            completed_steps += 1
            progress.update(1)
            if guard.ok:
                last_losses = {"loss": outputs.loss.item(), **{k: v.item() for k, v in outputs.loss_dict.items()}}
                entry = {"step": completed_steps, **last_losses, "lr": lr}
            else:
                entry = guard.skip(completed_steps, outputs.loss.item(), [int(target["image_id"]) for target in batch["labels"]])
                entry["lr"] = lr
            if accelerator.is_main_process:  # one line per optimizer step, also read by the resume test
                with open(log_file, "a") as log:
                    log.write(json.dumps(entry) + "\n")
            guard.stop_if_too_many()
            if last_losses:
                progress.set_postfix(loss=f"{last_losses['loss']:.3f}")
            if args.with_tracking and entry["loss"] is not None:
                accelerator.log({f"train/{k}": v for k, v in last_losses.items()} | {"lr": lr}, step=completed_steps)
            if args.checkpointing_steps not in (None, "epoch") and completed_steps % int(args.checkpointing_steps) == 0:
                save_checkpoint(accelerator, model, image_processor, output_dir, f"step_{completed_steps}", settings, args.checkpoints_total_limit)
            if completed_steps >= args.max_train_steps:
                break
            if args.eval_strategy == "steps" and completed_steps % args.eval_steps == 0:
                evaluate_during_training(f"step {completed_steps}")
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, model, image_processor, output_dir, f"step_{completed_steps}", settings, args.checkpoints_total_limit)
        if completed_steps >= args.max_train_steps:  # the last evaluation follows the save
            break
        if args.eval_strategy == "epoch":
            evaluate_during_training(f"epoch {epoch}")
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
        metrics, eval_stats = evaluate(return_stats=True)
    except Exception:
        logger.error(f"evaluation failed; the trained model is saved in {output_dir}")
        raise
    logger.info("final evaluation: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in COCO_METRIC_NAMES))
    if args.eval_strategy != "no":
        best.update(accelerator, model, image_processor, metrics, completed_steps)
    if args.with_tracking:
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=completed_steps)
        accelerator.end_training()

    if accelerator.is_main_process:
        data_stats = {"train": train_stats, "eval": eval_stats}
        results = {**metrics, "train_steps": completed_steps, "final_train_loss": last_losses.get("loss"), "data_stats": data_stats}
        if best.summary():
            results["best_model"] = best.summary()
        write_text_atomic(output_dir / "eval_results.json", json.dumps(results, indent=2))
        training_args = {k: v for k, v in vars(args).items() if k != "hub_token"}
        card = render_model_card(
            metrics={k: metrics[k] for k in COCO_METRIC_NAMES}, dataset_name=dataset_label, training_args=training_args,
            model_id=args.hub_model_id, dataset_split=args.eval_split or "val", base_model=base_model_of(args, unwrapped.config),
            model_config=unwrapped.config,
        )  # fmt: skip
        write_text_atomic(output_dir / "README.md", card)
        logger.info(f"run summary: {completed_steps} steps ({guard.skipped} skipped: non-finite), final loss {last_losses.get('loss')}, data {data_stats}")
        logger.info(f"saved to {output_dir}; map {metrics.get('map', float('nan')):.4f}")
        if args.push_to_hub:
            url = push_checkpoint(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token)
            logger.info(f"pushed to {url}")
    return metrics


def base_model_of(args, config) -> str | None:
    """The Hub model the weights started from, for the card's base_model: --model_name_or_path when it is a
    Hub id, else the checkpoint a local (converted) folder's config names (`converted_from`)."""
    for candidate in (args.model_name_or_path, getattr(config, "converted_from", None) if args.model_name_or_path else None):
        if candidate and hub_id(candidate):
            return candidate
    return None


def main(argv=None):
    return train(apply_defaults(parse_args(argv)))


if __name__ == "__main__":
    main()
