import pytest
import torch

import hf_detr
from conftest import random_labels, tiny_config
from hf_detr.queries import AnchorQueries, Denoising, box_sine_embedding, group_attention_mask


@pytest.mark.parametrize("query_type", sorted(hf_detr.QUERY_BUILDERS))
def test_query_builder_contract(query_type):
    config = tiny_config(query_type=query_type, d_model=32, num_queries=7)
    builder = hf_detr.QUERY_BUILDERS[query_type].from_config(config).eval()
    queries = builder(batch_size=3)
    assert queries.content.shape == (3, 7, 32) and queries.num_groups == 1 and queries.num_denoising == 0
    assert queries.prediction_slice == slice(0, 7) and queries.matching_slice == slice(0, None)
    assert queries.self_attention_mask is None
    if builder.reference_size:
        assert queries.reference.shape == (3, 7, builder.reference_size)
        assert ((queries.reference > 0) & (queries.reference < 1)).all()
    else:
        assert queries.reference is None
    hidden = torch.randn(3, 7, 32)
    for layer in range(2):
        position, spatial = builder.layer_positions(layer, hidden, queries, queries.reference)
        assert position.shape == (3, 7, 32)
        # a spatial query exactly where the cross-attention takes one (Conditional DETR's)
        assert (spatial is not None) == builder.spatial_query == (config.decoder_cross_attention == "spatial")
        # every image of a batch starts from the same learned queries
        torch.testing.assert_close(position[0], position[2]) if layer == 0 else None
    (position.sum() + (spatial.sum() if spatial is not None else 0)).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in builder.parameters())


@pytest.mark.parametrize("query_type", sorted(hf_detr.QUERY_BUILDERS))
def test_model_builds_and_runs_with_each_query_type(query_type):
    model = hf_detr.HfDetrForObjectDetection(tiny_config(query_type=query_type)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 10, 6) and out.pred_boxes.shape == (2, 10, 4)


def test_deformable_queries_are_learned_content_and_positions_with_reference_points():
    builder = hf_detr.DeformableQueries(num_queries=5, d_model=8)
    builder.content_embeddings.weight.data.normal_()
    queries = builder(batch_size=2)
    assert torch.equal(queries.content[1], builder.content_embeddings.weight)  # learned, not zeros
    assert torch.equal(queries.position[1], builder.position_embeddings.weight)
    torch.testing.assert_close(queries.reference, builder.reference_points(queries.position).sigmoid())


def test_detr_content_queries_are_zeros_and_positions_are_a_learned_embedding():
    builder = hf_detr.DetrQueries(num_queries=5, d_model=8)
    assert isinstance(builder.position_embeddings, torch.nn.Embedding)
    assert builder.position_embeddings.weight.shape == (5, 8)
    queries = builder(batch_size=2)
    assert torch.equal(queries.content, torch.zeros(2, 5, 8))
    assert torch.equal(queries.position[1], builder.position_embeddings.weight)
