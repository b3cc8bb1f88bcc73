import typing

import pytest

import hf_detr
from hf_detr.configuration_hf_detr import QueryType


def test_defaults_are_the_papers_detr_r50():
    config = hf_detr.HfDetrConfig()
    assert config.model_type == "hf_detr"
    assert config.backbone_config.model_type == "resnet" and config.backbone_config.out_features == ["stage4"]
    assert list(config.backbone_config.depths) == [3, 4, 6, 3]  # ResNet-50
    assert (config.encoder_layers, config.decoder_layers, config.d_model, config.hidden_size) == (6, 6, 256, 256)
    assert (config.encoder_attention_heads, config.encoder_ffn_dim, config.decoder_ffn_dim) == (8, 2048, 2048)
    assert (config.num_queries, config.dropout, config.num_labels) == (100, 0.1, 91)
    assert (config.class_cost, config.bbox_cost, config.giou_cost) == (1.0, 5.0, 2.0)
    assert (config.ce_loss_coefficient, config.bbox_loss_coefficient, config.giou_loss_coefficient) == (1.0, 5.0, 2.0)
    assert config.eos_coefficient == 0.1 and config.auxiliary_loss and not config.normalize_before
    assert config.query_type == "detr"


def test_query_types_are_exactly_the_builders():
    assert set(typing.get_args(QueryType)) == set(hf_detr.QUERY_BUILDERS)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("d_model", 250, "d_model"),
        ("decoder_attention_heads", 3, "decoder_attention_heads"),
        ("num_queries", 0, "num_queries"),
        ("encoder_layers", -1, "encoder_layers"),
        ("class_cost", -1.0, "class_cost"),
        ("giou_loss_coefficient", -2.0, "giou_loss_coefficient"),
        ("eos_coefficient", -0.1, "eos_coefficient"),
        ("dropout", 1.0, "dropout"),
        ("query_type", "dab", "query_type"),
        ("category_ids", [1, 2], "category_ids"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        hf_detr.HfDetrConfig(**{field: value})


def test_all_zero_matcher_costs_rejected():
    with pytest.raises(ValueError, match="cannot all be 0"):
        hf_detr.HfDetrConfig(class_cost=0.0, bbox_cost=0.0, giou_cost=0.0)


def test_round_trip_keeps_every_field(tmp_path):
    config = hf_detr.HfDetrConfig(
        d_model=64, num_queries=7, id2label={0: "a", 1: "b"}, category_ids=[3, 9], normalize_before=True, eos_coefficient=0.2
    )
    config.save_pretrained(tmp_path)
    loaded = hf_detr.HfDetrConfig.from_pretrained(tmp_path)
    for field in ("d_model", "num_queries", "id2label", "category_ids", "normalize_before", "eos_coefficient", "num_labels"):
        assert getattr(loaded, field) == getattr(config, field), field
    assert loaded.backbone_config.to_dict() == config.backbone_config.to_dict()
