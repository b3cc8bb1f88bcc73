"""hf_detr/export.py and scripts/export_onnx.py: torch.export and ONNX graphs that compute what the model
computes, for any batch size and image size, padding included."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

import hf_detr
from conftest import tiny_backbone_config, tiny_config
from hf_detr.export import Detector, export_onnx, torch_export

ROOT = Path(__file__).resolve().parents[1]
# 4 levels, and fewer layers: a deformable layer's exported graph is large, and the export time grows with it
LEVELS = dict(
    num_feature_levels=4, backbone_config=tiny_backbone_config(out_features=["stage2", "stage3", "stage4"]), encoder_n_points=2,
    decoder_n_points=2, encoder_layers=1, decoder_layers=2,
)  # fmt: skip
VARIANTS = {  # every query type and attention kind, with the training-only parts (groups, denoising) that must not reach the graph
    "detr": dict(query_type="detr"),  # dense attention
    "anchor": dict(query_type="anchor", class_loss="iou_aware", num_query_groups=2, num_denoising_queries=6),  # spatial attention
    # Deformable DETR, two-stage with box refinement, deformable attention over 4 levels
    "deformable": dict(query_type="deformable", encoder_attention="deformable", with_box_refine=True, two_stage=True, class_loss="focal", **LEVELS),
    # conditional queries with deformable cross-attention over a dense encoder of 4 levels, groups
    "conditional-deformable": dict(query_type="conditional", decoder_cross_attention="deformable", class_loss="focal", num_query_groups=2, **LEVELS),
}


def padded_batch(processor):
    """Three images of different sizes, padded to one batch by the processor."""
    generator = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy()) for h, w in ((60, 90), (80, 50), (64, 64))]
    inputs = processor(images=images, return_tensors="pt")
    assert not inputs["pixel_mask"].all()  # some image is padded
    return inputs, [image.size[::-1] for image in images]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exported_graphs_equal_the_model(variant, tmp_path):
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(tiny_config(**VARIANTS[variant])).eval()
    processor = hf_detr.image_processor_for(model.config, size={"shortest_edge": 96, "longest_edge": 112})
    inputs, sizes = padded_batch(processor)  # batch 3 at 96 x 112: not the export example (batch 2, 96 x 128)
    with torch.no_grad():
        expected = Detector(model)(inputs["pixel_values"], inputs["pixel_mask"])

    program = torch_export(model)
    exported = program.module()(inputs["pixel_values"], inputs["pixel_mask"])
    for actual, reference in zip(exported, expected):
        torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-5)

    path = export_onnx(model, tmp_path / "model.onnx", program=program)
    # batch, height and width are symbols in the graph, not the example's numbers (only the 3 channels are fixed)
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(path)).graph.input}
    assert shapes["pixel_values"][1] == 3 and all(isinstance(d, str) for d in shapes["pixel_values"][:1] + shapes["pixel_values"][2:])
    assert all(isinstance(d, str) for d in shapes["pixel_mask"]) and shapes["pixel_mask"][0] == shapes["pixel_values"][0]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {"pixel_values": inputs["pixel_values"].numpy(), "pixel_mask": inputs["pixel_mask"].numpy()})
    assert abs(logits - expected[0].numpy()).max() <= 1e-4 and abs(boxes - expected[1].numpy()).max() <= 1e-5
    # and the same detections after the processor's post-processing
    target_sizes = torch.tensor(sizes)
    ours = processor.post_process_object_detection(SimpleNamespace(logits=torch.from_numpy(logits), pred_boxes=torch.from_numpy(boxes)), 0.0, target_sizes)
    theirs = processor.post_process_object_detection(SimpleNamespace(logits=expected[0], pred_boxes=expected[1]), 0.0, target_sizes)
    for a, b in zip(ours, theirs):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-3)


def test_export_script_checks_onnxruntime_against_pytorch(tmp_path, caplog):
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(tiny_config()).eval()
    model.save_pretrained(tmp_path / "ckpt")
    hf_detr.image_processor_for(model.config, size={"shortest_edge": 96, "longest_edge": 128}).save_pretrained(tmp_path / "ckpt")
    spec = importlib.util.spec_from_file_location("export_onnx", ROOT / "scripts" / "export_onnx.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    import logging

    with caplog.at_level(logging.INFO):
        script.main(["--model_name_or_path", str(tmp_path / "ckpt"), "--output", str(tmp_path / "model.onnx"), "--check", "--benchmark", "2"])
    assert (tmp_path / "model.onnx").stat().st_size > 10_000
    line = next(r.getMessage() for r in caplog.records if "onnxruntime vs PyTorch" in r.getMessage())
    differences = [float(word) for word in line.replace(",", " ").split() if "e-" in word or word.replace(".", "").isdigit()]
    assert differences and max(differences) <= 1e-4, line
    assert any("PyTorch / onnxruntime" in r.getMessage() for r in caplog.records)
