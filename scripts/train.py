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
    return p.parse_args(argv)


def apply_defaults(args):
    """Fill in what depends on the dataset: a small, fast run on synthetic data, DETR's recipe otherwise."""
    synthetic = args.dataset_name is None
    defaults = (
        dict(image_size=128, max_size=128, augmentation="flip", num_train_epochs=18, per_device_train_batch_size=16,
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
        train, categories = detr_data.load_coco_folder(root, "train")
        val, _ = detr_data.load_coco_folder(root, "val")
        return train, val, categories, "hf_detr synthetic shapes"
    is_coco_folder = (Path(args.dataset_name) / "annotations").is_dir()
    known = detr_data.HUB_DATASETS.get(args.dataset_name)
    train_split = args.train_split or ("train2017" if is_coco_folder else known.train_split if known else "train")
    eval_split = args.eval_split or ("val2017" if is_coco_folder else known.eval_split if known else "validation")
    hub_kwargs = {} if is_coco_folder else {"bbox_format": args.bbox_format}
    train, categories = detr_data.load_detection_dataset(args.dataset_name, train_split, **hub_kwargs)
    val, _ = detr_data.load_detection_dataset(args.dataset_name, eval_split, **hub_kwargs)
    return train, val, categories, args.dataset_name


def config_overrides(overrides: str | None) -> dict:
    """--config_overrides "d_model=128,query_type=anchor" -> {name: value} typed as HfDetrConfig's
    fields (transformers' `PreTrainedConfig.update_from_string`, the convention of its run_clm example)."""
    if not overrides:
        return {}
    config = hf_detr.HfDetrConfig()
    config.update_from_string(overrides)
    return {item.split("=", 1)[0]: getattr(config, item.split("=", 1)[0]) for item in overrides.split(",")}


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


def save_checkpoint(accelerator, output_dir: Path, name: str):
    """accelerator.save_state, written to a temporary folder and renamed into place, so a run
    killed mid-write never leaves a half checkpoint that --resume_from_checkpoint would pick up."""
    final, partial = output_dir / name, output_dir / f"{name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    accelerator.wait_for_everyone()


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    if resume != "latest":
        return Path(resume)
    done = [p for p in output_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")]
    if not done:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no step_* checkpoint in {output_dir}")
    return max(done, key=lambda p: int(p.name.split("_")[1]))


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
    if args.with_tracking:
        accelerator.init_trackers("hf_detr", {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)})

    completed_steps, start_epoch, skip_batches = 0, 0, 0
    if not args.resume_from_checkpoint and accelerator.is_main_process:
        (output_dir / "train_log.jsonl").unlink(missing_ok=True)
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(output_dir, args.resume_from_checkpoint)
        accelerator.load_state(str(checkpoint))  # model, optimizer, scheduler, RNG states, sampler
        completed_steps = int(checkpoint.name.split("_")[1])
        start_epoch, done_in_epoch = divmod(completed_steps, steps_per_epoch)
        skip_batches = done_in_epoch * args.gradient_accumulation_steps
        logger.info(f"resumed from {checkpoint} at step {completed_steps}")

    progress = tqdm(total=args.max_train_steps, initial=completed_steps, disable=not accelerator.is_local_main_process)
    metrics, last_losses = {}, {}
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
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            last_losses = {"loss": outputs.loss.item(), **{k: v.item() for k, v in outputs.loss_dict.items()}}
            if accelerator.is_main_process:  # one line per optimizer step, also read by the resume test
                with open(output_dir / "train_log.jsonl", "a") as log:
                    log.write(json.dumps({"step": completed_steps, **last_losses}) + "\n")
            progress.set_postfix(loss=f"{last_losses['loss']:.3f}")
            if args.with_tracking:
                accelerator.log({f"train/{k}": v for k, v in last_losses.items()} | {"lr": scheduler.get_last_lr()[0]}, step=completed_steps)
            if args.checkpointing_steps not in (None, "epoch") and completed_steps % int(args.checkpointing_steps) == 0:
                save_checkpoint(accelerator, output_dir, f"step_{completed_steps}")
            if completed_steps >= args.max_train_steps:
                break
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, output_dir, f"step_{completed_steps}")
        if args.eval_every_epoch or completed_steps >= args.max_train_steps:
            metrics = evaluate_model(accelerator.unwrap_model(model), image_processor, eval_data, categories,
                                     batch_size=args.per_device_eval_batch_size, accelerator=accelerator)  # fmt: skip
            logger.info(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if args.with_tracking:
                accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=completed_steps)
        if completed_steps >= args.max_train_steps:
            break
    progress.close()
    if args.with_tracking:
        accelerator.end_training()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(output_dir, safe_serialization=True)
        image_processor.save_pretrained(output_dir)
        results = {**metrics, "train_steps": completed_steps, "final_train_loss": last_losses.get("loss"), "data_stats": train_set.stats.as_dict()}
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
        training_args = {k: v for k, v in vars(args).items() if k != "hub_token"}
        base_model = args.model_name_or_path if args.model_name_or_path and not Path(args.model_name_or_path).exists() else None
        card = render_model_card(
            metrics=metrics, dataset_name=dataset_label, training_args=training_args, model_id=args.hub_model_id,
            dataset_split=args.eval_split or "val", base_model=base_model, model_config=unwrapped.config,
        )  # fmt: skip
        (output_dir / "README.md").write_text(card)
        logger.info(f"run summary: {completed_steps} steps, final loss {last_losses.get('loss')}, data {train_set.stats.as_dict()}")
        logger.info(f"saved to {output_dir}; map {metrics.get('map', float('nan')):.4f}")
        if args.push_to_hub:
            url = push_checkpoint(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token)
            logger.info(f"pushed to {url}")
    return metrics


def main(argv=None):
    return train(apply_defaults(parse_args(argv)))


if __name__ == "__main__":
    main()
