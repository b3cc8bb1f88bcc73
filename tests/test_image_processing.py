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
