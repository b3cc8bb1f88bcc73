import itertools

import pytest
import torch
from scipy.optimize import linear_sum_assignment

import hf_detr
from conftest import random_labels
from hf_detr.box_ops import cxcywh_to_xyxy, generalized_box_iou


def naive_cost(logits, boxes, target, class_cost=1.0, bbox_cost=5.0, giou_cost=2.0):
    """The cost of the paper, written out for one image: [Q, N]."""
    probs = logits.softmax(-1)
    cost = torch.zeros(len(logits), len(target["boxes"]))
    for q in range(len(logits)):
        for t in range(len(target["boxes"])):
            l1 = (boxes[q] - target["boxes"][t]).abs().sum()
            giou = generalized_box_iou(cxcywh_to_xyxy(boxes[q : q + 1]), cxcywh_to_xyxy(target["boxes"][t : t + 1]))[0, 0]
            cost[q, t] = -class_cost * probs[q, target["class_labels"][t]] + bbox_cost * l1 - giou_cost * giou
    return cost


def random_predictions(layers, batch, queries, classes, generator):
    logits = torch.randn(layers, batch, queries, classes + 1, generator=generator)
    boxes = torch.rand(layers, batch, queries, 4, generator=generator) * 0.5 + 0.25
    return logits, boxes


def test_matching_is_optimal_against_brute_force(generator):
    matcher = hf_detr.HungarianMatcher()
    for _ in range(5):
        logits, boxes = random_predictions(1, 1, 5, 3, generator)
        labels = random_labels([3], 3, generator)
        (query_idx, target_idx), = matcher(logits[0], boxes[0], labels)
        cost = naive_cost(logits[0, 0], boxes[0, 0], labels[0])
        best = min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
        assert cost[query_idx, target_idx].sum() == pytest.approx(float(best), abs=1e-5)


def test_matching_equals_reference_solve_and_is_one_to_one(generator):
    matcher = hf_detr.HungarianMatcher(class_cost=2.0, bbox_cost=3.0, giou_cost=1.5)
    logits, boxes = random_predictions(1, 4, 20, 6, generator)
    labels = random_labels([5, 1, 12, 7], 6, generator)
    for b, (query_idx, target_idx) in enumerate(matcher(logits[0], boxes[0], labels)):
        n = len(labels[b]["boxes"])
        assert len(query_idx) == len(target_idx) == n
        assert len(set(query_idx.tolist())) == n and sorted(target_idx.tolist()) == list(range(n))
        cost = naive_cost(logits[0, b], boxes[0, b], labels[b], 2.0, 3.0, 1.5)
        ref_rows, ref_cols = linear_sum_assignment(cost.numpy())
        assert cost[query_idx, target_idx].sum() == pytest.approx(float(cost[ref_rows, ref_cols].sum()), abs=1e-4)


def test_all_layers_batched_equal_per_layer_per_image(generator):
    matcher = hf_detr.HungarianMatcher()
    logits, boxes = random_predictions(3, 3, 15, 4, generator)
    labels = random_labels([4, 0, 9], 4, generator)
    batched = matcher.match_layers(logits, boxes, labels)
    for layer in range(3):
        for b in range(3):
            single = matcher(logits[layer, b : b + 1], boxes[layer, b : b + 1], labels[b : b + 1])[0]
            assert torch.equal(batched[layer][b][0], single[0]) and torch.equal(batched[layer][b][1], single[1])


@pytest.mark.parametrize("layers_per_pass", [None, 1, 2, 3])
def test_target_costs_match_the_paper_whatever_the_layers_per_pass(layers_per_pass, generator):
    matcher = hf_detr.HungarianMatcher()
    logits, boxes = random_predictions(3, 3, 6, 4, generator)
    labels = random_labels([2, 0, 3], 4, generator)
    cost = matcher.target_costs(logits, boxes, labels, layers_per_pass=layers_per_pass)  # [L, N, Q]
    assert cost.shape == (3, 5, 6)
    for layer in range(3):
        expected = torch.cat([naive_cost(logits[layer, b], boxes[layer, b], labels[b]).T for b in range(3)])
        torch.testing.assert_close(cost[layer], expected, rtol=1e-5, atol=1e-5)


def test_images_without_objects_give_empty_indices(generator):
    matcher = hf_detr.HungarianMatcher()
    logits, boxes = random_predictions(1, 2, 6, 2, generator)
    empty = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    for labels in ([empty, empty], [empty, random_labels([2], 2, generator)[0]]):
        indices = matcher(logits[0], boxes[0], labels)
        assert indices[0][0].numel() == indices[0][1].numel() == 0
        assert indices[0][0].dtype == torch.long
    assert len(indices[1][0]) == 2


def test_diverged_predictions_do_not_crash_and_are_avoided(generator):
    matcher = hf_detr.HungarianMatcher()
    logits, boxes = random_predictions(1, 1, 4, 2, generator)
    boxes[0, 0, 0] = float("nan")
    (query_idx, _), = matcher(logits[0], boxes[0], random_labels([2], 2, generator))
    assert 0 not in query_idx.tolist()


def test_bad_costs_rejected():
    with pytest.raises(ValueError):
        hf_detr.HungarianMatcher(class_cost=-1.0)
    with pytest.raises(ValueError):
        hf_detr.HungarianMatcher(0.0, 0.0, 0.0)


@pytest.mark.parametrize("name", sorted(hf_detr.MATCHERS))
def test_every_matcher_returns_one_pair_per_image(name, generator):
    matcher = hf_detr.MATCHERS[name]()
    logits, boxes = random_predictions(1, 2, 8, 3, generator)
    indices = matcher(logits[0], boxes[0], random_labels([3, 5], 3, generator))
    assert [len(q) for q, _ in indices] == [3, 5]
