import pytest
import torch

import hf_detr


@pytest.mark.parametrize("query_type", sorted(hf_detr.QUERY_BUILDERS))
def test_query_builder_contract(query_type):
    builder = hf_detr.QUERY_BUILDERS[query_type](num_queries=7, d_model=16)
    content, position = builder(batch_size=3)
    assert content.shape == position.shape == (3, 7, 16)
    # every image of a batch starts from the same learned queries
    assert torch.equal(position[0], position[2])
    position.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in builder.parameters())


@pytest.mark.parametrize("query_type", sorted(hf_detr.QUERY_BUILDERS))
def test_model_builds_and_runs_with_each_query_type(query_type):
    from conftest import tiny_config

    model = hf_detr.HfDetrForObjectDetection(tiny_config(query_type=query_type)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 10, 6) and out.pred_boxes.shape == (2, 10, 4)


def test_detr_content_queries_are_zeros_and_positions_are_a_learned_embedding():
    builder = hf_detr.DetrQueries(num_queries=5, d_model=8)
    assert isinstance(builder.position_embeddings, torch.nn.Embedding)
    assert builder.position_embeddings.weight.shape == (5, 8)
    content, position = builder(batch_size=2)
    assert torch.equal(content, torch.zeros(2, 5, 8))
    assert torch.equal(position[1], builder.position_embeddings.weight)
