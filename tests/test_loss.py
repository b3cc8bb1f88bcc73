import pytest
import torch
import torch.nn.functional as F

import hf_detr
from conftest import random_labels
from hf_detr.box_ops import cxcywh_to_xyxy, generalized_box_iou
from hf_detr.loss import SoftmaxCrossEntropy


def criterion(num_labels, eos_coefficient=0.1, **kwargs):
    return hf_detr.SetCriterion(hf_detr.HungarianMatcher(), SoftmaxCrossEntropy(num_labels, eos_coefficient), **kwargs)


def naive_layer_loss(crit, logits, boxes, labels):
    """The paper's loss for one layer, one image at a time, with the matches of our matcher."""
    indices = crit.matcher(logits, boxes, labels)
    num_boxes = max(sum(len(t["boxes"]) for t in labels), 1)
    ce_num = ce_den = l1 = giou = 0.0
    for b, (q_idx, t_idx) in enumerate(indices):
        target = torch.full((logits.shape[1],), crit.class_loss.num_labels)
        target[q_idx] = labels[b]["class_labels"][t_idx]
        weights = crit.class_loss.class_weight[target]
        ce_num = ce_num + (F.cross_entropy(logits[b], target, reduction="none") * weights).sum()
        ce_den = ce_den + weights.sum()
        src, tgt = boxes[b, q_idx], labels[b]["boxes"][t_idx]
        l1 = l1 + (src - tgt).abs().sum()
        if len(src):
            giou = giou + (1 - torch.diagonal(generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)))).sum()
    return {"loss_ce": ce_num / ce_den, "loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}


def test_vectorised_loss_equals_naive_per_layer_per_image(generator):
    crit = criterion(4, eos_coefficient=0.3, bbox_coefficient=4.0)
    logits = torch.randn(3, 3, 12, 5, generator=generator)
    boxes = torch.rand(3, 3, 12, 4, generator=generator) * 0.5 + 0.25
    labels = random_labels([3, 0, 6], 4, generator)
    loss, loss_dict = crit(logits, boxes, labels)
    expected_total = 0.0
    for layer in range(3):
        naive = naive_layer_loss(crit, logits[layer], boxes[layer], labels)
        suffix = "" if layer == 2 else f"_{layer}"
        for name, value in naive.items():
            torch.testing.assert_close(loss_dict[name + suffix], torch.as_tensor(value, dtype=torch.float32), rtol=1e-5, atol=1e-6)
        expected_total += naive["loss_ce"] + 4.0 * naive["loss_bbox"] + 2.0 * naive["loss_giou"]
    torch.testing.assert_close(loss, torch.as_tensor(expected_total, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert set(loss_dict) == {f"{n}{s}" for n in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_0", "_1")} | {"cardinality_error"}


def test_no_objects_means_every_query_learns_no_object(generator):
    crit = criterion(3)
    logits = torch.randn(1, 2, 5, 4, generator=generator, requires_grad=True)
    boxes = torch.rand(1, 2, 5, 4, generator=generator, requires_grad=True)
    empty = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    loss, loss_dict = crit(logits, boxes, [empty, empty])
    assert loss_dict["loss_bbox"] == 0 and loss_dict["loss_giou"] == 0
    torch.testing.assert_close(loss_dict["loss_ce"], F.cross_entropy(logits[0].reshape(-1, 4), torch.full((10,), 3)))
    loss.backward()
    # gradient descent raises every query's "no object" logit
    assert (logits.grad[..., 3] < 0).all()


def test_unmatched_queries_target_no_object_matched_ones_their_class(generator):
    crit = criterion(3, eos_coefficient=1.0)
    logits = torch.zeros(1, 1, 4, 4, requires_grad=True)
    boxes = torch.tensor([[[[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.1, 0.9, 0.1, 0.1]]]])
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.8, 0.8, 0.1, 0.1]])}]
    loss, _ = crit(logits, boxes, labels)
    loss.backward()
    grad = logits.grad[0, 0]
    assert grad[1, 1] < 0  # the matched query (same box) is pushed towards class 1
    assert (grad[[0, 2, 3], 3] < 0).all()  # the others towards "no object"


@pytest.mark.parametrize(
    "boxes, classes, message",
    [
        ([[0.5, 0.5, 0.0, 0.2]], [0], r"labels\[1\], annotation 0: box"),
        ([[0.5, 0.5, 0.2, 0.2], [0.5, 1.5, 0.2, 0.2]], [0, 1], r"labels\[1\], annotation 1: box"),
        ([[0.5, float("nan"), 0.2, 0.2]], [0], r"labels\[1\], annotation 0: box"),
        ([[0.5, 0.5, 0.2, 0.2]], [3], r"labels\[1\], annotation 0: class id 3"),
        ([[0.5, 0.5, 0.2, 0.2]], [-1], r"labels\[1\], annotation 0: class id -1"),
    ],
)
def test_bad_targets_raise_value_error_naming_image_and_annotation(boxes, classes, message, generator):
    crit = criterion(3)
    logits, pred = torch.randn(1, 2, 5, 4), torch.rand(1, 2, 5, 4)
    labels = random_labels([2], 3, generator) + [{"class_labels": torch.tensor(classes), "boxes": torch.tensor(boxes)}]
    with pytest.raises(ValueError, match=message):
        crit(logits, pred, labels)


def test_mismatched_target_shapes_rejected():
    crit = criterion(3)
    labels = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.rand(3, 4)}]
    with pytest.raises(ValueError, match=r"labels\[0\]"):
        crit(torch.randn(1, 1, 5, 4), torch.rand(1, 1, 5, 4), labels)
    with pytest.raises(ValueError, match=r"labels\[0\] must have"):
        crit(torch.randn(1, 1, 5, 4), torch.rand(1, 1, 5, 4), [{"boxes": torch.rand(1, 4)}])


def test_cardinality_error_counts_object_predictions(generator):
    crit = criterion(2)
    logits = torch.full((1, 1, 4, 3), -10.0)
    logits[0, 0, :3, 0] = 10.0  # three queries predict class 0, one predicts no object
    logits[0, 0, 3, 2] = 10.0
    _, loss_dict = crit(logits, torch.rand(1, 1, 4, 4) * 0.5 + 0.25, random_labels([1], 2, generator))
    assert loss_dict["cardinality_error"].item() == 2.0
