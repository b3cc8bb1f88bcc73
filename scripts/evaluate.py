"""COCO box metrics of a checkpoint on one split of a detection dataset.

    python scripts/evaluate.py --model_name_or_path outputs/hf-detr-synthetic --dataset_name outputs/synthetic-coco
    python scripts/evaluate.py --model_name_or_path user/detr-coco --dataset_name detection-datasets/coco --eval_split val
    accelerate launch scripts/evaluate.py ...    # shards the split over processes, same numbers

The checkpoint is loaded with `AutoModelForObjectDetection` / `AutoImageProcessor` (hf_detr registers
itself with them); a checkpoint of transformers' DETR, Conditional DETR or DAB-DETR is converted to hf_detr
on the fly; the split goes through processor, model and `post_process_object_detection` with
the original image sizes, and pycocotools' COCOeval scores it (`hf_detr.evaluation.evaluate_model`).
The checkpoint's labels are matched to the split's categories by class name (`hf_detr.labels.match_labels`:
the same classes under other ids, or in another order, are scored as the classes they are; classes on one
side only are warned about; no class in common is an error).
The metrics are printed as JSON and, with --output_file, written there, with `data_stats`: the images
evaluated and those skipped (unreadable, or decoded at another size than the annotated one; each
also named in a warning).
"""

import argparse
import json
import logging
from pathlib import Path

from accelerate import Accelerator
from transformers import AutoImageProcessor, AutoModelForObjectDetection

import hf_detr  # registers hf_detr with the Auto classes
from hf_detr.convert import CONFIG_CONVERTERS
from hf_detr.data import default_num_workers, default_splits, load_detection_dataset
from hf_detr.evaluation import evaluate_model
from hf_detr.image_processing import fit_image_processor
from hf_detr.labels import match_labels
from hf_detr.modeling_hf_detr import checkpoint_model_type

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", required=True, help="checkpoint folder or Hub model id")
    p.add_argument("--dataset_name", required=True, help="Hub dataset id or local COCO folder")
    p.add_argument("--eval_split", "--split", default=None,
                   help="split name (COCO folders: instances_<split>.json); default: the dataset's own (val2017 / val / validation)")  # fmt: skip
    p.add_argument("--bbox_format", choices=["xywh", "xyxy"], default=None, help="Hub datasets: box format")
    p.add_argument("--max_eval_samples", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--per_device_eval_batch_size", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.0, help="post-processing score threshold")
    p.add_argument("--dataloader_num_workers", type=int, default=None, help="default: from the CPUs, as train.py")
    p.add_argument("--revision", default=None, help="Hub revision of the checkpoint")
    p.add_argument("--trust_remote_code", action="store_true", help="for checkpoints of other model types")
    p.add_argument("--output_file", default=None, help="write the metrics JSON here too")
    return p.parse_args(argv)


def load_model(model_name_or_path, **kwargs):
    """-> (model, image processor). A checkpoint of transformers' DETR, Conditional DETR or DAB-DETR converts to
    hf_detr on the fly (HfDetrForObjectDetection.from_pretrained logs it); its own image processor is used when
    it has one, else the one that fits the converted model (hf_detr.image_processor_for)."""
    model_type = checkpoint_model_type(model_name_or_path, revision=kwargs.get("revision"))
    if model_type not in CONFIG_CONVERTERS:
        model = AutoModelForObjectDetection.from_pretrained(model_name_or_path, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(model_name_or_path, **kwargs)
    else:
        model = hf_detr.HfDetrForObjectDetection.from_pretrained(model_name_or_path, revision=kwargs.get("revision"))
        try:
            image_processor = AutoImageProcessor.from_pretrained(model_name_or_path, revision=kwargs.get("revision"))
        except OSError:
            logger.info(f"{model_name_or_path} has no image processor: using hf_detr.image_processor_for(its config)")
            image_processor = hf_detr.image_processor_for(model.config)
    # a processor whose post-processing does not fit the class loss would score the wrong classes
    return model, fit_image_processor(image_processor, model.config, f"{model_name_or_path}'s image processor")


def main(argv=None):
    args = parse_args(argv)
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = default_num_workers()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator()

    kwargs = dict(revision=args.revision, trust_remote_code=args.trust_remote_code)
    model, image_processor = load_model(args.model_name_or_path, **kwargs)
    model = model.to(accelerator.device)
    args.eval_split = args.eval_split or default_splits(args.dataset_name)[1]
    load_kwargs = {"bbox_format": args.bbox_format} if args.bbox_format else {}
    dataset, categories = load_detection_dataset(args.dataset_name, args.eval_split, **load_kwargs)
    if args.max_eval_samples is not None:
        dataset = dataset.select(range(min(args.max_eval_samples, len(dataset))))
    if accelerator.is_main_process:
        where = f"{args.dataset_name} [{args.eval_split}]"
        logger.info(f"{len(dataset)} images of {where}, {accelerator.num_processes} process(es)")

    # which dataset category each label means, by class name (hf_detr.labels: one rule, for training from a checkpoint too)
    category_map = match_labels(
        model.config.id2label, categories, getattr(model.config, "category_ids", None),
        model=args.model_name_or_path, dataset=f"{args.dataset_name} [{args.eval_split}]",
    )  # fmt: skip
    metrics, data_stats = evaluate_model(
        model,
        image_processor,
        dataset,
        category_map,
        batch_size=args.per_device_eval_batch_size,
        accelerator=accelerator,
        threshold=args.threshold,
        num_workers=args.dataloader_num_workers,
        return_stats=True,
        per_class=True,
        category_names=dict(zip(categories.category_ids, categories.names)),
    )
    if accelerator.is_main_process:  # every process holds the same numbers; one prints them
        text = json.dumps({**metrics, "data_stats": data_stats}, indent=2)
        print(text)
        if args.output_file:
            Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output_file).write_text(text + "\n")
    return metrics


if __name__ == "__main__":
    main()
