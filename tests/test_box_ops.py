import torch

from hf_detr.box_ops import (
    box_iou,
    center_planes,
    cxcywh_to_xyxy,
    generalized_box_iou,
    l1_and_generalized_box_iou_planes,
    xyxy_to_cxcywh,
)


def random_xyxy(n, generator):
    corner = torch.rand(n, 2, generator=generator)
    return torch.cat([corner, corner + torch.rand(n, 2, generator=generator) + 0.01], -1)


def test_format_round_trip(generator):
    boxes = random_xyxy(50, generator)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes)
    assert torch.equal(cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])), torch.tensor([0.4, 0.3, 0.6, 0.7]))


def test_iou_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 3.0, 2.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[2 / 6, 1.0, 0.0]]))
    # disjoint boxes: GIoU = 0 - (hull - union) / hull = -(36 - 5) / 36
    torch.testing.assert_close(generalized_box_iou(a, b)[0, 2], torch.tensor(-(36 - 5) / 36))


def test_giou_bounds_and_symmetry(generator):
    a, b = random_xyxy(20, generator), random_xyxy(30, generator)
    giou, iou = generalized_box_iou(a, b), box_iou(a, b)
    assert giou.shape == (20, 30)
    assert (giou <= iou + 1e-6).all() and (giou >= -1).all() and (giou <= 1).all()
    torch.testing.assert_close(giou, generalized_box_iou(b, a).T)
    torch.testing.assert_close(torch.diagonal(generalized_box_iou(a, a)), torch.ones(20))


def test_matched_pairs_from_center_planes_give_corner_values_and_gradients(generator):
    """The loss's use: L1 and GIoU of matched [M] pairs from [5, M] planes, values and gradients (which go
    through the in-place ops) equal to the corner formulas'."""
    a = (torch.rand(15, 4, generator=generator, dtype=torch.float64) * 0.5 + 0.25).requires_grad_()
    b = torch.rand(15, 4, generator=generator, dtype=torch.float64) * 0.5 + 0.25
    l1, giou = l1_and_generalized_box_iou_planes(center_planes(a), center_planes(b))
    (grad,) = torch.autograd.grad((l1 + 3 * giou).sum(), a)
    expected_l1 = (a - b).abs().sum(-1)
    expected_giou = torch.diagonal(generalized_box_iou(cxcywh_to_xyxy(a), cxcywh_to_xyxy(b)))
    (expected_grad,) = torch.autograd.grad((expected_l1 + 3 * expected_giou).sum(), a)
    torch.testing.assert_close(l1, expected_l1)
    torch.testing.assert_close(giou, expected_giou)
    torch.testing.assert_close(grad, expected_grad)
    assert torch.autograd.gradcheck(lambda x: l1_and_generalized_box_iou_planes(center_planes(x), center_planes(b)), (a,))


def test_batched_pairwise_equals_per_item(generator):
    a, b = random_xyxy(24, generator).view(2, 3, 4, 4), random_xyxy(10, generator).view(2, 5, 4)
    batched = generalized_box_iou(a, b[:, None])  # [2, 3, 4, 5]
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(batched[i, j], generalized_box_iou(a[i, j], b[i]))


def test_center_planes_give_the_corner_formulas(generator):
    boxes1 = torch.cat([torch.rand(40, 2, generator=generator), torch.rand(40, 2, generator=generator) * 0.5 + 0.01], -1)
    boxes2 = torch.cat([torch.rand(30, 2, generator=generator), torch.rand(30, 2, generator=generator) * 0.5 + 0.01], -1)
    # Cases the random draw may miss: identical, nested, disjoint and edge-touching boxes.
    special = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.1, 0.4], [0.1, 0.1, 0.1, 0.1], [0.6, 0.5, 0.2, 0.2]])
    boxes1, boxes2 = torch.cat([boxes1, special]), torch.cat([boxes2, special])
    l1, giou = l1_and_generalized_box_iou_planes(center_planes(boxes1)[:, :, None], center_planes(boxes2)[:, None, :])
    torch.testing.assert_close(l1, (boxes1[:, None] - boxes2[None]).abs().sum(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(giou, generalized_box_iou(cxcywh_to_xyxy(boxes1), cxcywh_to_xyxy(boxes2)), rtol=1e-5, atol=1e-6)
    assert torch.allclose(giou[-4:, -4:].diagonal(), torch.ones(4))
