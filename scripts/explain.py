"""See inside a DETR checkpoint: an HTML page with PNGs.

    # one image: every decoder layer's predictions, where each detection and a few pixels attend
    python scripts/explain.py --model_name_or_path outputs/hf-detr-synthetic --image photo.jpg --output_dir explain/
    # ... with its ground truth: the Hungarian matching per layer and the cost of each matched pair (the image's
    # entry is found by its file name; --image_id N picks it by id, and is checked to be this file)
    python scripts/explain.py --model_name_or_path outputs/hf-detr-synthetic --image val/000003.jpg \\
        --annotations annotations/instances_val.json --output_dir explain/
    # over a split: where each query slot predicts (DETR's figure 7) and how often it is matched, per class
    python scripts/explain.py --model_name_or_path outputs/hf-detr-synthetic --dataset_name /data/coco --eval_split val2017 --output_dir slots/

--model_name_or_path is a checkpoint folder or Hub id (its own image processor is used); --dataset_name a Hub
dataset id or a local COCO folder, as scripts/train.py takes them.
"""

import argparse
import json
import logging
from itertools import islice
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForObjectDetection

import hf_detr  # noqa: F401  (registers hf_detr with the Auto classes)
from hf_detr import data as detr_data
from hf_detr.explain import coco_image_of, explain, labels_from_coco, query_statistics
from hf_detr.visualize import write_dataset_report, write_report

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", "--model", required=True, help="checkpoint folder or Hub id")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--image", default=None, help="an image file")
    p.add_argument("--annotations", default=None, help="a COCO json with the image's ground truth (found by its file name)")
    p.add_argument("--image_id", type=int, default=None, help="with --annotations: the image's id there (checked against its file name)")
    p.add_argument("--threshold", type=float, default=0.5, help="score from which a query counts as a detection")
    p.add_argument("--training_queries", action="store_true", help="also build every query group (and denoising queries)")
    p.add_argument("--dataset_name", "--dataset", default=None, help="Hub dataset id or local COCO folder: statistics over a split")
    p.add_argument("--eval_split", "--split", default=None, help="default: the dataset's own (val2017 / val / validation)")
    p.add_argument("--max_eval_samples", "--max_images", type=int, default=None, help="the first N images of the split only")
    p.add_argument("--trust_remote_code", action="store_true")
    args = p.parse_args(argv)
    if (args.image is None) == (args.dataset_name is None):
        p.error("give one of --image or --dataset_name")
    if args.image_id is not None and args.annotations is None:
        p.error("--image_id needs --annotations")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    kwargs = {"trust_remote_code": True} if args.trust_remote_code else {}
    model = AutoModelForObjectDetection.from_pretrained(args.model_name_or_path, **kwargs).eval()
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, **kwargs)
    torch.manual_seed(0)  # denoising queries' noise, with --training_queries
    if args.image is not None:
        labels = None
        if args.annotations:
            coco = json.loads(Path(args.annotations).read_text())
            entry = coco_image_of(coco, args.image, args.image_id, args.annotations)
            labels = labels_from_coco(coco, entry["id"], model.config.category_ids)
        explanation = explain(
            model, args.image, labels=labels, threshold=args.threshold, image_processor=processor,
            training_queries=args.training_queries,
        )  # fmt: skip
        page = write_report(explanation, args.output_dir, title=f"{Path(args.image).name} through {args.model_name_or_path}")
        logger.info(f"{len(explanation.detections())} detections over {args.threshold}; wrote {page}")
    else:
        args.eval_split = args.eval_split or detr_data.default_splits(args.dataset_name)[1]
        dataset = detr_data.load_detection_dataset(args.dataset_name, args.eval_split).dataset
        examples = islice(dataset, args.max_eval_samples) if args.max_eval_samples else dataset
        statistics = query_statistics(model, examples, image_processor=processor)
        page = write_dataset_report(statistics, args.output_dir, title=f"{args.model_name_or_path}'s query slots on {args.dataset_name} {args.eval_split}")
        logger.info(f"{len(statistics.centres)} images; wrote {page}")


if __name__ == "__main__":
    main()
