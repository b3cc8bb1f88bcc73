"""hf_detr.image_processing: the processor's post-processing must fit the model's class loss."""

import logging

import pytest
import torch
from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput

import hf_detr
from conftest import load_train_script, tiny_config
from hf_detr.image_processing import HfDetrImageProcessor, SigmoidImageProcessor, fit_image_processor


def last_class_outputs(num_labels: int) -> DetrObjectDetectionOutput:
    """One query, sure of the last of `num_labels` classes (sigmoid logits, no "no object" slot)."""
    logits = torch.full((1, 1, num_labels), -8.0)
    logits[0, 0, -1] = 8.0
    return DetrObjectDetectionOutput(logits=logits, pred_boxes=torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]))


@pytest.mark.parametrize("class_loss", ["focal", "iou_aware"])
def test_a_softmax_processor_on_a_sigmoid_model_is_swapped_keeping_its_settings(class_loss, caplog):
    config = tiny_config(class_loss=class_loss, num_labels=3)
    given = HfDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, image_mean=[0.5, 0.4, 0.3])
    # as given, the last class is taken for "no object" and never output
    results = given.post_process_object_detection(last_class_outputs(3), threshold=0.5, target_sizes=[(48, 64)])
    assert 2 not in results[0]["labels"].tolist()
    with caplog.at_level(logging.WARNING):
        fitted = fit_image_processor(given, config, "--image_processor_name x")
    assert isinstance(fitted, SigmoidImageProcessor)
    assert (fitted.size["shortest_edge"], fitted.size["longest_edge"], tuple(fitted.image_mean)) == (64, 96, (0.5, 0.4, 0.3))
    assert (
        f"--image_processor_name x is a {type(given).__name__}, whose post-processing takes a softmax over the classes: it "
        f"does not fit a model trained with class_loss={class_loss!r} (its last class would never be output); using a "
        f"{SigmoidImageProcessor.__name__} with its settings"
    ) in caplog.text
    results = fitted.post_process_object_detection(last_class_outputs(3), threshold=0.5, target_sizes=[(48, 64)])
    assert results[0]["labels"].tolist() == [2]


def test_a_sigmoid_processor_on_a_softmax_model_is_swapped_and_a_fitting_one_kept():
    softmax = tiny_config(class_loss="softmax")
    assert isinstance(fit_image_processor(SigmoidImageProcessor(), softmax), HfDetrImageProcessor)
    kept = HfDetrImageProcessor()
    assert fit_image_processor(kept, softmax) is kept


def test_train_script_fits_the_image_processor_name_to_the_model(tmp_path):
    HfDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(tmp_path)
    train = load_train_script()
    args = train.parse_args(["--image_processor_name", str(tmp_path)])
    model = hf_detr.HfDetrForObjectDetection(tiny_config(class_loss="focal"))
    processor = train.build_image_processor(args, model.config)
    assert isinstance(processor, SigmoidImageProcessor) and processor.size["longest_edge"] == 96


def test_batched_pipeline_of_mixed_image_sizes_needs_a_fixed_pad_size(tmp_path):
    """transformers' pipeline preprocesses each image alone and concatenates the pixel_values of a batch: images
    resized to different sizes cannot be batched (its `_pad` fails), the limit docs/bad-data.md states. With the
    processor's `pad_size` at the largest resized size, every image is padded to it, and batch sizes 1 to 8 give
    the unbatched detections (of that processor: padding changes what DETR's backbone sees at the borders).
    If a transformers version batches mixed sizes itself, the first half fails and the docs change."""
    from PIL import Image
    from transformers import pipeline

    torch.manual_seed(0)
    hf_detr.HfDetrForObjectDetection(tiny_config(decoder_layers=2)).save_pretrained(tmp_path)
    processor = HfDetrImageProcessor(size={"shortest_edge": 48, "longest_edge": 64})
    processor.save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(1)
    sizes = [(48, 64), (64, 48), (40, 40), (30, 60), (48, 64), (50, 50), (20, 64), (64, 64)]
    images = [Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=generator, dtype=torch.uint8).numpy()) for h, w in sizes]
    with pytest.raises(RuntimeError, match="must match"):  # torch.cat of pixel_values or pixel_mask of two sizes
        pipeline("object-detection", model=str(tmp_path), threshold=0.0)(images, batch_size=2)

    processor.pad_size = {"height": 64, "width": 64}  # = size["longest_edge"]: no resized image is larger
    detector = pipeline("object-detection", model=str(tmp_path), image_processor=processor, threshold=0.0)
    expected = [detector(image) for image in images]
    for batch_size in (1, 2, 4, 8):
        batched = detector(images, batch_size=batch_size)
        for got, want in zip(batched, expected, strict=True):
            assert [d["label"] for d in got] == [d["label"] for d in want], batch_size
            assert [d["score"] for d in got] == pytest.approx([d["score"] for d in want], abs=1e-5)
            assert all(abs(d["box"][k] - e["box"][k]) <= 1 for d, e in zip(got, want) for k in e["box"])
