"""Export an hf_detr checkpoint to ONNX, with a dynamic batch, height and width and the pixel mask as an input.

    python scripts/export_onnx.py --model_name_or_path outputs/hf-detr-synthetic --output model.onnx
    python scripts/export_onnx.py --model_name_or_path you/your-detr --output model.onnx --check   # compare onnxruntime with PyTorch
    python scripts/export_onnx.py --model_name_or_path outputs/hf-detr-synthetic --output model.onnx --benchmark 20   # latency, side by side

The graph takes pixel_values [B, 3, H, W] float32 and pixel_mask [B, H, W] int64 (what the checkpoint's
image processor makes) and gives logits [B, Q, C] and pred_boxes [B, Q, 4]; the processor's
`post_process_object_detection` turns them into detections as for the PyTorch model. --check runs a
padded batch of three images of different sizes through onnxruntime and PyTorch and prints the largest
differences. The export itself is `hf_detr.export.export_onnx`.
"""

import argparse
import logging

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForObjectDetection

import hf_detr  # noqa: F401  (registers hf_detr with the Auto classes)
from hf_detr import measure
from hf_detr.export import INPUT_NAMES, Detector, export_onnx

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", "--model", required=True, help="checkpoint folder or Hub id")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's)")
    p.add_argument("--check", action="store_true", help="compare onnxruntime's outputs with PyTorch's")
    p.add_argument("--benchmark", type=int, default=0, metavar="N", help="time N interleaved runs of onnxruntime and PyTorch")
    p.add_argument("--batch_size", type=int, default=1, help="images per run for --benchmark")
    p.add_argument("--trust_remote_code", action="store_true")
    return p.parse_args(argv)


def check(model, processor, path) -> dict[str, float]:
    """Largest |onnxruntime - PyTorch| of logits and boxes on a padded batch of 3 images of different sizes."""
    import onnxruntime

    generator = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy()) for h, w in ((480, 640), (500, 375), (300, 300))
    ]  # fmt: skip
    inputs = processor(images=images, return_tensors="pt")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {name: inputs[name].numpy() for name in INPUT_NAMES})
    with torch.no_grad():
        expected_logits, expected_boxes = Detector(model)(inputs["pixel_values"], inputs["pixel_mask"])
    return {
        "logits": float(abs(logits - expected_logits.numpy()).max()),
        "pred_boxes": float(abs(boxes - expected_boxes.numpy()).max()),
    }


def benchmark(model, processor, path, repeats: int, batch_size: int) -> dict[str, float]:
    """Median seconds per forward of PyTorch (eager, fp32) and onnxruntime on the same batch, interleaved
    after one warm-up each, and the median of their per-pair ratio."""
    import onnxruntime

    generator = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(480, 640, 3, generator=generator) * 255).to(torch.uint8).numpy()) for _ in range(batch_size)]
    inputs = processor(images=images, return_tensors="pt")
    feed = {name: inputs[name].numpy() for name in INPUT_NAMES}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    detector = Detector(model)

    def torch_run():
        with torch.no_grad():
            detector(inputs["pixel_values"], inputs["pixel_mask"])

    def onnx_run():
        session.run(None, feed)

    pytorch_s, onnxruntime_s, ratio = measure.paired_medians(*measure.interleaved([torch_run, onnx_run], repeats, warmup=1))
    return {
        "pytorch_s": pytorch_s,
        "onnxruntime_s": onnxruntime_s,
        "pytorch_over_onnxruntime": ratio,
        "input_shape": list(inputs["pixel_values"].shape),
    }


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    kwargs = {"trust_remote_code": True} if args.trust_remote_code else {}
    model = AutoModelForObjectDetection.from_pretrained(args.model_name_or_path, **kwargs).eval()
    path = export_onnx(model, args.output, opset_version=args.opset)
    logger.info(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.check:
        differences = check(model, AutoImageProcessor.from_pretrained(args.model_name_or_path, **kwargs), path)
        logger.info("onnxruntime vs PyTorch, max abs diff: " + ", ".join(f"{k} {v:.2e}" for k, v in differences.items()))
    if args.benchmark:
        times = benchmark(model, AutoImageProcessor.from_pretrained(args.model_name_or_path, **kwargs), path, args.benchmark, args.batch_size)
        logger.info(
            f"input {times['input_shape']}: PyTorch {times['pytorch_s'] * 1e3:.1f} ms, onnxruntime {times['onnxruntime_s'] * 1e3:.1f} ms "
            f"(median of {args.benchmark}), PyTorch / onnxruntime {times['pytorch_over_onnxruntime']:.2f}x"
        )


if __name__ == "__main__":
    main()
