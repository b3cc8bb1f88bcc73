import dataclasses
import json
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
        ("category_ids", [1, 2], "category_ids"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        hf_detr.HfDetrConfig(**{field: value})


@pytest.mark.parametrize("field", ["query_type", "class_loss", "matcher_type", "encoder_attention", "decoder_cross_attention"])
def test_variant_fields_are_typed_with_their_choices(field):
    """The variant fields are `Literal`s of the dicts' keys: a value outside them is refused by name, choices listed."""
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    with pytest.raises(StrictDataclassFieldValidationError, match=f"{field}.*expected one of"):
        hf_detr.HfDetrConfig(**{field: "dab"})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_real_valued_field_must_be_finite(bad):
    """NaN passed every range check (each comparison is False): bbox_cost=nan made the matcher pick arbitrary
    queries, eos_coefficient=nan a NaN loss."""
    from hf_detr.configuration_hf_detr import Float

    fields = [f.name for f in dataclasses.fields(hf_detr.HfDetrConfig) if f.type == Float]
    assert {"bbox_cost", "eos_coefficient", "class_cost", "focal_alpha", "dropout"} <= set(fields)
    for field in fields:
        with pytest.raises(ValueError, match=rf"HfDetrConfig\.{field} must be a finite number, got {bad}"):
            hf_detr.HfDetrConfig(**{field: bad})


def test_a_config_json_with_nan_or_label_gaps_is_refused(tmp_path):
    hf_detr.HfDetrConfig(num_labels=3).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "eos_coefficient": float("nan")}))  # json writes NaN
    with pytest.raises(ValueError, match=r"HfDetrConfig\.eos_coefficient must be a finite number, got nan"):
        hf_detr.HfDetrConfig.from_pretrained(tmp_path)
    gaps = {**saved, "id2label": {"0": "a", "2": "c"}, "label2id": {"a": 0, "c": 2}}
    (tmp_path / "config.json").write_text(json.dumps(gaps))
    with pytest.raises(ValueError, match=r"HfDetrConfig\.id2label must name the labels 0\.\.1 \(one per class, no gaps\), got the labels \[0, 2\]"):
        hf_detr.HfDetrConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"id2label must name the labels 0\.\.1"):
        hf_detr.HfDetrConfig(id2label={0: "a", 2: "c"})


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


def test_real_valued_fields_take_ints_as_transformers_configs_write_them(tmp_path):
    import dataclasses
    import json

    real_valued = [f.name for f in dataclasses.fields(hf_detr.HfDetrConfig) if type(f.default) is float]
    assert {"class_cost", "bbox_cost", "giou_cost", "dropout", "eos_coefficient", "focal_gamma"} <= set(real_valued)
    values = {name: 0 for name in real_valued} | {"class_cost": 1, "bbox_cost": 5, "giou_cost": 2, "focal_gamma": 2}
    config = hf_detr.HfDetrConfig(**values)
    for name in real_valued:
        assert type(getattr(config, name)) is float and getattr(config, name) == values[name], name
    # a config.json as transformers' DetrConfig writes it (`class_cost: 1`)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "class_cost": 1, "bbox_loss_coefficient": 5}))
    loaded = hf_detr.HfDetrConfig.from_pretrained(tmp_path)
    assert type(loaded.class_cost) is float and loaded.class_cost == 1.0 and loaded.bbox_loss_coefficient == 5.0
    with pytest.raises(Exception, match="class_cost"):  # still typed: a string is no number
        hf_detr.HfDetrConfig(class_cost="1")


@pytest.fixture
def labelled_checkpoint(tmp_path):
    from conftest import tiny_config

    model = hf_detr.HfDetrForObjectDetection(tiny_config(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, category_ids=[1, 3, 7]))
    model.save_pretrained(tmp_path)
    return tmp_path


def test_relabelling_gives_a_consistent_config(labelled_checkpoint, caplog):
    """from_pretrained(..., id2label=..., label2id=..., ignore_mismatched_sizes=True) on a checkpoint with
    category_ids kept the old ids (3 for 2 labels) and num_labels=K raised; the ids of the old labels now go
    (warned about), unless given again, and the class head has the new size."""
    relabelled = hf_detr.HfDetrForObjectDetection.from_pretrained(
        labelled_checkpoint, id2label={0: "x", 1: "y"}, label2id={"x": 0, "y": 1}, ignore_mismatched_sizes=True
    )
    config = relabelled.config
    assert (config.num_labels, config.id2label, config.category_ids) == (2, {0: "x", 1: "y"}, None)
    assert relabelled.model.heads.class_heads[0].out_features == 3  # 2 labels + no object

    for num_labels in (2, 5):
        config = hf_detr.HfDetrConfig.from_pretrained(labelled_checkpoint, num_labels=num_labels)
        assert config.num_labels == num_labels == len(config.id2label) == len(config.label2id)
        assert config.category_ids is None
    model = hf_detr.HfDetrForObjectDetection.from_pretrained(labelled_checkpoint, num_labels=5, ignore_mismatched_sizes=True)
    assert model.model.heads.class_heads[0].out_features == 6

    # given again, or the labels unchanged: the ids stay
    config = hf_detr.HfDetrConfig.from_pretrained(labelled_checkpoint, id2label={0: "x", 1: "y"}, category_ids=[4, 9])
    assert (config.num_labels, config.category_ids) == (2, [4, 9])
    assert hf_detr.HfDetrConfig.from_pretrained(labelled_checkpoint, num_labels=3).category_ids == [1, 3, 7]
    assert hf_detr.HfDetrConfig.from_pretrained(labelled_checkpoint).category_ids == [1, 3, 7]
    # ids that do not fit the labels: an error naming both fields
    with pytest.raises(ValueError, match="category_ids has 3 entries but num_labels is 2"):
        hf_detr.HfDetrConfig.from_pretrained(labelled_checkpoint, id2label={0: "x", 1: "y"}, category_ids=[1, 2, 3])


def test_num_channels_reaches_the_backbone_and_must_agree_with_it():
    """`num_channels` is the input's channel count: the default backbone is built with it (a greyscale model takes
    1-channel images), and a backbone_config that says otherwise is refused by name."""
    import torch

    from conftest import tiny_backbone_config, tiny_config

    greyscale = hf_detr.HfDetrConfig(num_channels=1)
    assert greyscale.backbone_config.num_channels == 1
    model = hf_detr.HfDetrForObjectDetection(tiny_config(num_channels=1, backbone_config=tiny_backbone_config(num_channels=1))).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).logits.shape[:2] == (1, 10)
    with pytest.raises(ValueError, match=r"num_channels \(1\) differs from its backbone_config.num_channels \(3\)"):
        tiny_config(num_channels=1)
