"""Convert published DETR weights (DETR, Conditional DETR, DAB-DETR) into an hf_detr checkpoint folder.

    python scripts/convert_detr_checkpoint.py --model_name_or_path facebook/detr-resnet-50 --output_dir outputs/detr-resnet-50
    python scripts/convert_detr_checkpoint.py --model_name_or_path facebook/detr-resnet-50 --revision no_timm --output_dir ...
    python scripts/convert_detr_checkpoint.py --model_name_or_path detr-r50-e632da11.pth --output_dir ...   # facebookresearch/detr
    python scripts/convert_detr_checkpoint.py --model_name_or_path path/to/transformers_detr_folder --output_dir ...
    python scripts/convert_detr_checkpoint.py --model_name_or_path microsoft/conditional-detr-resnet-50 --output_dir ...
    python scripts/convert_detr_checkpoint.py --model_name_or_path IDEA-Research/dab-detr-resnet-50 --output_dir ...

--model_name_or_path is a Hub id, a local transformers DETR / Conditional DETR / DAB-DETR folder (config.json +
model.safetensors or pytorch_model.bin), or an original facebookresearch/detr `.pth` (read with
weights_only=True). The
output folder holds the model (config.json with COCO's 91 label slots for COCO models, weights and the
model-surface files for trust_remote_code) and the image processor, ready for `from_pretrained`,
`AutoImageProcessor` and `pipeline("object-detection")`. The conversion itself is
`hf_detr.convert.convert_checkpoint`.
"""

import argparse
import logging

from hf_detr import image_processor_for
from hf_detr.convert import convert_checkpoint

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", "--checkpoint", required=True,
                   help="Hub id, transformers DETR folder, or original DETR .pth")
    p.add_argument("--output_dir", required=True, help="where to write the hf_detr checkpoint")
    p.add_argument("--revision", default=None, help="Hub revision, e.g. no_timm")
    p.add_argument(
        "--num_heads", type=int, default=None, help=".pth only: attention heads (default: the saved args, else 8)"
    )
    p.add_argument("--timm_backbone", action="store_true", help="a timm ResNet backbone (needs timm) instead of transformers' ResNet")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model = convert_checkpoint(args.model_name_or_path, revision=args.revision, num_heads=args.num_heads, timm_backbone=args.timm_backbone)
    model.save_pretrained(args.output_dir)
    image_processor_for(model.config).save_pretrained(args.output_dir)
    num_parameters = sum(p.numel() for p in model.parameters())
    summary = f"{num_parameters / 1e6:.1f}M parameters, {model.config.num_labels} labels"
    logger.info(f"{args.model_name_or_path} -> {args.output_dir} ({summary})")


if __name__ == "__main__":
    main()
