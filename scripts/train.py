"""Train hf_detr with accelerate.

    accelerate launch scripts/train.py                      # built-in synthetic dataset, small model, CPU-friendly
    accelerate launch scripts/train.py --synthetic_style clutter   # the second built-in set (not the one tuned on)
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
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from transformers import AutoConfig, AutoImageProcessor

import hf_detr
from hf_detr import checkpoints, run_folder, training
from hf_detr import data as detr_data
from hf_detr.convert import CONFIG_CONVERTERS, config_from_transformers_config
from hf_detr.ema import ExponentialMovingAverage
from hf_detr.evaluation import COCO_METRIC_NAMES, evaluate_model
from hf_detr.hub import base_model_id, push_checkpoint, render_model_card
from hf_detr.image_processing import fit_image_processor
from hf_detr.speed import SDPA_BACKENDS, enable_fast_mode

logger = get_logger(__name__)


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
    p.add_argument("--config_overrides", default=None,
                   help='HfDetrConfig values over the run\'s defaults, e.g. "query_type=anchor,class_loss=focal,num_query_groups=4"')  # fmt: skip
    p.add_argument("--image_processor_name", default=None, help="image processor (folder or Hub id); default: the one that fits the model")
    p.add_argument("--ignore_mismatched_sizes", action=argparse.BooleanOptionalAction, default=True,
                   help="--model_name_or_path with other classes: theirs are dropped and the dataset's new ones start afresh "
                        "(default on; the class head rows follow the classes by name)")  # fmt: skip
    p.add_argument("--backbone_checkpoint", default="microsoft/resnet-50", help="ImageNet backbone for DETR-R50 runs")
    p.add_argument("--output_dir", default="outputs/hf-detr-synthetic")
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="train in an --output_dir that holds another run's results, replacing them (its step checkpoints stay)")  # fmt: skip
    p.add_argument("--image_size", type=int, default=None, help="shortest edge at evaluation (and largest train scale)")
    p.add_argument("--max_size", type=int, default=None, help="longest edge cap")
    p.add_argument("--augmentation", choices=["detr", "flip"], default=None, help="detr: flip + multi-scale + crops")
    # training (defaults where None: hf_detr.training.run_defaults)
    p.add_argument("--num_train_epochs", type=int, default=None)
    p.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    p.add_argument("--per_device_train_batch_size", type=int, default=None)
    p.add_argument("--per_device_eval_batch_size", type=int, default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--backbone_learning_rate", type=float, default=None)
    p.add_argument("--weight_decay", type=float, default=None, help="default 1e-4")
    p.add_argument("--adam_beta1", type=float, default=None, help="default 0.9")
    p.add_argument("--adam_beta2", type=float, default=None, help="default 0.999")
    p.add_argument("--adam_epsilon", type=float, default=None, help="default 1e-8")
    p.add_argument("--max_grad_norm", type=float, default=None, help="default 0.1")
    p.add_argument("--ema_decay", type=float, default=None,
                   help="evaluate and save an exponential moving average of the weights with this decay (e.g. 0.9999, "
                        "RT-DETR's); default: off, the trained weights themselves")  # fmt: skip
    p.add_argument("--ema_warmup_steps", type=int, default=2000,
                   help="the average's decay ramps up as decay * (1 - exp(-step / this)) (RT-DETR's 2000)")
    p.add_argument("--lr_scheduler_type", choices=training.LR_SCHEDULERS, default=None,
                   help="step (default): DETR's 10x drop after --lr_drop_fraction of the steps; the others: transformers' get_scheduler")  # fmt: skip
    p.add_argument("--num_warmup_steps", type=int, default=None, help="linear warm-up steps of the learning rate (default 0)")
    p.add_argument("--lr_drop_fraction", type=float, default=None,
                   help="step: the LR drops 10x after this fraction of the steps (default: DETR's 2/3; the built-in run 0.8)")  # fmt: skip
    p.add_argument("--dataloader_num_workers", "--num_workers", type=int, default=None,
                   help="DataLoader workers per process, for training and evaluation (default: from the CPUs, 1-4)")  # fmt: skip
    # checkpoints and evaluation
    p.add_argument("--checkpointing_steps", default=None, help="save a step_N checkpoint every N steps, or every 'epoch'")
    p.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only this run's latest N step_N checkpoints")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint folder, or 'latest' (the --output_dir run's); the other arguments must be that run's")  # fmt: skip
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
    p.add_argument("--synthetic_style", default="shapes", choices=list(detr_data.SYNTHETIC_STYLES),
                   help="the built-in data's generator (no --dataset_name): shapes, the data the built-in recipe "
                        "was tuned on; clutter, other shapes, 1-20 per image, mostly small, on cluttered "
                        "backgrounds (30 queries)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        return training.check_run_arguments(args)
    except ValueError as err:
        p.error(str(err))


def apply_defaults(args):
    """Fill in what depends on the dataset: a small, fast run on synthetic data, DETR's recipe otherwise."""
    for name, value in training.run_defaults(built_in=args.dataset_name is None).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def load_data(args, accelerator):
    """-> ((train, eval) Hub-schema datasets, CategoryMap, the dataset's name for the card). The splits used are
    written into `args`, so that a checkpoint records them."""
    name, dataset_label = args.dataset_name, args.dataset_name
    kwargs = {"bbox_format": args.bbox_format, "config_name": args.dataset_config_name, "cache_dir": args.cache_dir}
    if args.label_names:
        kwargs["categories"] = detr_data.CategoryMap.from_names([label.strip() for label in args.label_names.split(",")])
    with accelerator.main_process_first():  # one process writes or downloads the data, the others read its cache
        if args.dataset_name is None:
            sizes = (args.synthetic_train_images, args.synthetic_val_images)
            name = detr_data.synthetic_dataset(*sizes, style=args.synthetic_style)
            dataset_label = f"hf_detr synthetic {args.synthetic_style}"
            args.train_split, args.eval_split = "train", "val"
        splits = detr_data.load_splits(name, args.train_split, args.eval_split, train_val_split=args.train_val_split, seed=args.seed, **kwargs)
    args.train_split, args.eval_split = splits.train_split, splits.eval_split
    train, val = splits.train, splits.eval
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        val = val.select(range(min(args.max_eval_samples, len(val))))
    return (train, val), splits.categories, dataset_label


def build_model(args, categories):
    """--model_name_or_path (converted on the fly if a transformers DETR), --config_name (an hf_detr config,
    or a transformers DETR one, mapped) or the run's default config; then the run's labels and
    --config_overrides (`PreTrainedConfig.update_from_string`, as transformers' run_clm), checked together."""
    labels = dict(id2label=categories.id2label, label2id={v: k for k, v in categories.id2label.items()}, category_ids=list(categories.category_ids))
    overrides = {}
    if args.config_overrides:
        typed = hf_detr.HfDetrConfig()
        typed.update_from_string(args.config_overrides)  # typed as HfDetrConfig's fields
        overrides = {name: getattr(typed, name) for name in (item.split("=", 1)[0] for item in args.config_overrides.split(","))}
    config = None
    if args.config_name:
        loaded = AutoConfig.from_pretrained(args.config_name, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)
        if loaded.model_type in CONFIG_CONVERTERS:
            logger.info(f"--config_name {args.config_name}: a transformers {loaded.model_type!r} config, mapped to hf_detr's")
            loaded = config_from_transformers_config(loaded)
        elif not isinstance(loaded, hf_detr.HfDetrConfig) and type(loaded).__name__ != "HfDetrConfig":
            raise ValueError(f"--config_name {args.config_name}: a {loaded.model_type!r} config, not hf_detr's or a transformers DETR's")
        config = hf_detr.HfDetrConfig.from_dict(loaded.to_dict(), **labels, **overrides)
    if args.model_name_or_path:  # e.g. a converted COCO DETR fine-tuned on new labels: its class head rows follow them by name
        kwargs = dict(config=config) if config is not None else {**labels, **overrides}
        return training.load_for_fine_tuning(
            args.model_name_or_path, categories, dataset=f"{args.dataset_name or 'the synthetic data'} [{args.train_split}]",
            ignore_mismatched_sizes=args.ignore_mismatched_sizes, cache_dir=args.cache_dir,
            trust_remote_code=args.trust_remote_code, **kwargs,
        )  # fmt: skip
    if config is None and args.dataset_name is None:
        config = hf_detr.HfDetrConfig(**{**training.small_model(args.synthetic_style), **labels, **overrides})
    elif config is None:
        config = hf_detr.HfDetrConfig(**{"use_pretrained_backbone": True, "backbone_checkpoint": args.backbone_checkpoint, **labels, **overrides})
    return hf_detr.HfDetrForObjectDetection(config)


def build_image_processor(args, config):
    """--image_processor_name, or the processor whose post-processing fits the model's class loss, at the run's sizes."""
    if args.image_processor_name:
        given = AutoImageProcessor.from_pretrained(args.image_processor_name, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)
        return fit_image_processor(given, config, f"--image_processor_name {args.image_processor_name}")
    return hf_detr.image_processor_for(config, size={"shortest_edge": args.image_size, "longest_edge": args.max_size})


def train(args, run):
    """Train in `run.output_dir` (claimed by main()), resuming from `run.checkpoint` if any."""
    output_dir = run.output_dir
    accelerator = Accelerator(
        # Where accelerate finds no accelerator, the processes started by `accelerate launch --multi_gpu
        # --num_processes N` (torchrun) must be told they are CPU workers to join one gloo group.
        cpu=training.use_cpu(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # seeded shuffling: a resumed run sees the same batches as an uninterrupted one
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    logger.info(f"{accelerator.num_processes} process(es), {accelerator.distributed_type}, device {accelerator.device}")

    (train_data, eval_data), categories, dataset_label = load_data(args, accelerator)
    transform = detr_data.build_transform(train=True, image_size=args.image_size, max_size=args.max_size, augmentation=args.augmentation)
    train_set = detr_data.DetectionDataset(train_data, categories, transform, seed=args.seed)
    training.check_train_split(len(train_set), args.per_device_train_batch_size, args.train_split, args.dataset_name or "the synthetic data")
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
    optimizer = training.build_optimizer(
        model, args.learning_rate, args.backbone_learning_rate, args.weight_decay, (args.adam_beta1, args.adam_beta2), args.adam_epsilon
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # --ema_decay: an average of the weights, which evaluations, best_model/ and the final model use; step checkpoints
    # carry it in their state (their model files are the trained weights, which a resume continues from)
    ema = ExponentialMovingAverage(accelerator.unwrap_model(model), args.ema_decay, args.ema_warmup_steps) if args.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    steps_per_epoch = training.steps_per_epoch(loader, accelerator)  # after `prepare` has sharded the loader
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    scheduler = accelerator.prepare(
        training.build_scheduler(optimizer, args.lr_scheduler_type, args.max_train_steps, args.num_warmup_steps, args.lr_drop_fraction, accelerator.num_processes)
    )
    logger.info(
        f"{len(train_set)} training images, {steps_per_epoch} steps per epoch on each of {accelerator.num_processes} process(es) "
        f"(batch {args.per_device_train_batch_size} each), {args.max_train_steps} steps in {math.ceil(args.max_train_steps / steps_per_epoch)} epochs"
        + (f"; the learning rate drops 10x after step {training.lr_drop_step(args.max_train_steps, args.lr_drop_fraction)}" if args.lr_scheduler_type == "step" else "")
    )  # fmt: skip
    settings = checkpoints.run_settings(args, accelerator.num_processes, len(train_set), run.run_id)
    log_file = output_dir / "train_log.jsonl"
    best = checkpoints.BestModel(output_dir, args.metric_for_best_model)
    start_step, skipped_steps = 0, 0
    if run.checkpoint is not None:  # its arguments and model checked against this run's, its best model restored
        resumed = checkpoints.resume(accelerator, run.checkpoint, settings, accelerator.unwrap_model(model).config, log_file, steps_per_epoch)
        start_step, skipped_steps = resumed.step, resumed.skipped_nonfinite_steps
        best.restore(resumed.state, run.checkpoint)
    if accelerator.is_main_process:
        run.start(settings)  # the folder's results are this run's from here (its train_args.json)
    if args.with_tracking:
        accelerator.init_trackers("hf_detr", {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)})

    def reported():  # the model the run evaluates and saves
        return ema.module if ema is not None else accelerator.unwrap_model(model)

    def evaluate(return_stats=False):
        return evaluate_model(
            reported(), image_processor, eval_data, categories, batch_size=args.per_device_eval_batch_size,
            accelerator=accelerator, num_workers=args.dataloader_num_workers, per_class=True, return_stats=return_stats,
        )  # fmt: skip

    def evaluate_during_training(step, when):
        metrics = evaluate()
        logger.info(f"{when}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in COCO_METRIC_NAMES))
        best.update(accelerator, reported(), image_processor, metrics, step)
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)  # a no-op without --with_tracking

    def save_checkpoint(step):
        # the model files of step_N are the state accelerate resumes from (the trained weights; an average rides along)
        checkpoints.save_checkpoint(accelerator, model, image_processor, output_dir, step, settings, args.checkpoints_total_limit, best)

    def after_step(step, entry, last):
        if isinstance(args.checkpointing_steps, int) and step % args.checkpointing_steps == 0:
            save_checkpoint(step)
        if not last and args.eval_strategy == "steps" and step % args.eval_steps == 0:
            evaluate_during_training(step, f"step {step}")

    def after_epoch(epoch, step, last):
        if args.checkpointing_steps == "epoch":
            save_checkpoint(step)
        if not last and args.eval_strategy == "epoch":  # the last evaluation follows the final save
            evaluate_during_training(step, f"epoch {epoch}")

    result = training.train_loop(
        accelerator, model, optimizer, scheduler, loader, max_train_steps=args.max_train_steps, seed=args.seed,
        max_grad_norm=args.max_grad_norm, max_consecutive_nonfinite_steps=args.max_consecutive_nonfinite_steps,
        start_step=start_step, skipped_steps=skipped_steps, log_file=log_file, after_step=after_step, after_epoch=after_epoch, ema=ema,
    )  # fmt: skip

    # The trained model first: nothing after training (evaluation, the card, the push) may lose it.
    accelerator.wait_for_everyone()
    unwrapped = reported()
    if accelerator.is_main_process:
        checkpoints.save_model(unwrapped, image_processor, output_dir)
        logger.info(f"saved the trained model to {output_dir}")
    # Images skipped by any process, merged (each process reads its own shard of the data).
    image_status = accelerator.gather(train_set.image_status.to(accelerator.device, torch.int32)[None]).amax(0).cpu()
    train_stats = {**train_set.stats_for(image_status).as_dict(), "skipped_nonfinite_steps": result.skipped_nonfinite_steps}
    try:
        metrics, eval_stats = evaluate(return_stats=True)
    except Exception:
        logger.error(f"evaluation failed; the trained model is saved in {output_dir}")
        raise
    logger.info("final evaluation: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in COCO_METRIC_NAMES))
    if args.eval_strategy != "no":
        best.update(accelerator, unwrapped, image_processor, metrics, result.steps)
    if args.with_tracking:
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=result.steps)
        accelerator.end_training()
    if accelerator.is_main_process:
        write_results(args, unwrapped.config, metrics, {"train": train_stats, "eval": eval_stats}, result, best, dataset_label)
    return metrics


def write_results(args, config, metrics, data_stats, result, best, dataset_label):
    """eval_results.json and the model card in --output_dir; then --push_to_hub."""
    output_dir, final_loss = Path(args.output_dir), result.last_losses.get("loss")
    results = {**metrics, "train_steps": result.steps, "final_train_loss": final_loss, "data_stats": data_stats}
    if best.summary():
        results["best_model"] = best.summary()
    checkpoints.write_text_atomic(output_dir / "eval_results.json", json.dumps(results, indent=2))
    card = render_model_card(
        metrics={k: metrics[k] for k in COCO_METRIC_NAMES}, dataset_name=dataset_label, training_args={k: v for k, v in vars(args).items() if k != "hub_token"},
        model_id=args.hub_model_id, dataset_split=args.eval_split or "val", base_model=base_model_id(args.model_name_or_path, config),
        model_config=config,
    )  # fmt: skip
    checkpoints.write_text_atomic(output_dir / "README.md", card)
    logger.info(f"run summary: {result.steps} steps ({result.skipped_nonfinite_steps} skipped: non-finite), final loss {final_loss}, data {data_stats}")
    logger.info(f"saved to {output_dir}; map {metrics.get('map', float('nan')):.4f}")
    if args.push_to_hub:
        url = push_checkpoint(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token)
        logger.info(f"pushed to {url}")


def main(argv=None):
    args = apply_defaults(parse_args(argv))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # One run per --output_dir at a time, never over another run's results, checked before anything is built
    # (hf_detr.run_folder); held until the run ends.
    with run_folder.claim_output_dir(
        PartialState(cpu=training.use_cpu()), Path(args.output_dir), checkpoints.run_settings(args),
        overwrite=args.overwrite_output_dir, resume_from_checkpoint=args.resume_from_checkpoint,
    ) as run:  # fmt: skip
        return train(args, run)


if __name__ == "__main__":
    main()
