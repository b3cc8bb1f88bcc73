"""Export an HfDetrForObjectDetection (every query type) to `torch.export` and ONNX, with a dynamic batch,
height and width and the pixel mask as an input. Training side: never imported by the model surface.

    program = hf_detr.export.torch_export(model)                 # an ExportedProgram
    hf_detr.export.export_onnx(model, "model.onnx")              # onnxruntime runs it
    # inputs: pixel_values [B, 3, H, W] float32, pixel_mask [B, H, W] int64 (1 = real pixel, 0 = padding)
    # outputs: logits [B, Q, C], pred_boxes [B, Q, 4] (cxcywh, normalised to each image's un-padded size)

The model's speed kernels (hf_detr/kernels.py) and its CPU shortcut that drops an all-true mask step
aside while exporting, so the graph is the plain model's and masks padding for any input.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

INPUT_NAMES = ("pixel_values", "pixel_mask")
OUTPUT_NAMES = ("logits", "pred_boxes")


class Detector(nn.Module):
    """The detection model as a graph needs it: tensors in, (logits, pred_boxes) out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
        output = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return output.logits, output.pred_boxes


def _example_and_dims(model, batch_size: int, height: int, width: int, max_side: int):
    device = next(model.parameters()).device
    pixel_values = torch.randn(batch_size, model.config.num_channels, height, width, device=device)
    pixel_mask = torch.ones(batch_size, height, width, dtype=torch.long, device=device)
    batch = torch.export.Dim("batch", min=1, max=1024)
    low = min_side(model.config)
    rows, columns = torch.export.Dim("height", min=low, max=max_side), torch.export.Dim("width", min=low, max=max_side)
    dynamic = {"pixel_values": {0: batch, 2: rows, 3: columns}, "pixel_mask": {0: batch, 1: rows, 2: columns}}
    return (pixel_values, pixel_mask), dynamic


def min_side(config) -> int:
    """The smallest image side the graph takes: 64 pixels, and with stride-2 levels beyond the backbone's
    (stride 32) enough for two cells of the coarsest one (a side of one cell would be traced as a constant)."""
    extra_levels = config.num_feature_levels - config.backbone_stages()
    return 64 if extra_levels <= 0 else 32 * 2**extra_levels + 1


def torch_export(model, batch_size: int = 2, height: int = 96, width: int = 128, max_side: int = 4096) -> torch.export.ExportedProgram:
    """`torch.export.export` of the model in eval mode, the batch, height and width dynamic (an example
    of batch_size x height x width traces it; sides from `min_side(config)` (64 for DETR) to max_side pixels)."""
    model.eval()
    example, dynamic = _example_and_dims(model, batch_size, height, width, max_side)
    return torch.export.export(Detector(model), example, dynamic_shapes=dynamic, strict=False)


def export_onnx(model, path: str | Path, opset_version: int | None = None, program=None, optimize: bool = True, **kwargs) -> Path:
    """Write the model as ONNX (torch's dynamo exporter, from `torch_export`'s program: pass `program` to
    reuse one; `optimize`: onnxscript's graph optimisation). kwargs go to `torch_export`. -> the file's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = program or torch_export(model, **kwargs)
    torch.onnx.export(
        program, args=(), f=str(path), input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
        opset_version=opset_version, dynamo=True, verbose=False, optimize=optimize,
    )  # fmt: skip
    return path


__all__ = ["Detector", "torch_export", "export_onnx", "min_side", "INPUT_NAMES", "OUTPUT_NAMES"]
