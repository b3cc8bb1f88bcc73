import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection, pipeline

import hf_detr
from conftest import random_labels, tiny_config


@pytest.fixture
def model():
    torch.manual_seed(0)
    return hf_detr.HfDetrForObjectDetection(tiny_config()).eval()


@pytest.fixture
def checkpoint(tmp_path, model):
    model.config.id2label = {0: "circle", 1: "square", 2: "triangle", 3: "star", 4: "cross"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(tmp_path)
    hf_detr.HfDetrImageProcessor(size={"shortest_edge": 96, "longest_edge": 128}).save_pretrained(tmp_path)
    return tmp_path


def test_output_shapes_and_box_range(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (2, 10, 6) and out.pred_boxes.shape == (2, 10, 4)
    assert ((out.pred_boxes > 0) & (out.pred_boxes < 1)).all()
    assert out.loss is None and out.last_hidden_state.shape == (2, 10, 32)
    # as in transformers' DETR, the intermediate layers' predictions come with the loss they feed (the
    # object-detection pipeline splits every output field by image, and a per-layer list cannot be)
    assert out.auxiliary_outputs is None
    with torch.no_grad():
        out = model(**inputs, labels=random_labels([2, 1], 5, torch.Generator().manual_seed(0)))
    assert len(out.auxiliary_outputs) == 2
    assert all(aux["logits"].shape == (2, 10, 6) and aux["pred_boxes"].shape == (2, 10, 4) for aux in out.auxiliary_outputs)


def test_forward_creates_nothing_on_the_cpu_for_another_device(model, inputs):
    """CI has no GPU: on the meta device (no data) every op must find its tensors on the inputs'
    device, which exercises the non-CPU code paths (no oneDNN products or shortcut subsample, the
    attention mask always passed) and catches any tensor made without a device."""
    model = model.to("meta")
    meta = {name: tensor.to("meta") for name, tensor in inputs.items()}
    with torch.no_grad():
        out = model(**meta)
    assert out.logits.device.type == "meta" and out.logits.shape == (2, 10, 6) and out.pred_boxes.device.type == "meta"
    model.train()
    assert model(**meta).pred_boxes.shape == (2, 10, 4)


@pytest.mark.parametrize("query_type", sorted(hf_detr.QUERY_BUILDERS))
def test_heads_are_shared_across_decoder_layers(query_type, inputs):
    """Every layer's logits and boxes are the same two heads on that layer's output, the boxes relative
    to that layer's reference points / boxes (none for DETR's queries)."""
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(tiny_config(query_type=query_type)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.model.heads.box_heads[0].layers[-1].weight, std=0.1)  # refinements that move the boxes
        base = model.model(**inputs)
        out = model(**inputs, labels=random_labels([2, 1], 5, torch.Generator().manual_seed(0)))
        layers = [*out.auxiliary_outputs, {"logits": out.logits, "pred_boxes": out.pred_boxes}]
        for layer, predicted in enumerate(layers):
            hidden = base.intermediate_hidden_states[layer]
            reference = None if base.reference_boxes is None else base.reference_boxes[layer]
            torch.testing.assert_close(predicted["logits"], model.model.heads.class_heads[0](hidden))
            torch.testing.assert_close(predicted["pred_boxes"], model.model.heads.box_heads[0](hidden, reference))
    assert (out.reference_boxes is None) == (query_type == "detr")
    if query_type == "anchor":  # refined: each layer's anchors differ from the last's
        assert not torch.allclose(base.reference_boxes[1], base.reference_boxes[0])


def test_auxiliary_loss_does_not_change_the_final_prediction(model, inputs):
    # As in the original DETR the shared decoder norm only feeds the heads, so turning the
    # auxiliary losses on or off leaves the model's function unchanged.
    with torch.no_grad():
        with_aux = model(**inputs)
        model.config.auxiliary_loss = False
        without_aux = model(**inputs)
    assert without_aux.auxiliary_outputs is None
    torch.testing.assert_close(with_aux.logits, without_aux.logits)


def test_missing_pixel_mask_means_all_pixels_are_real(model, inputs):
    with torch.no_grad():
        implicit = model(inputs["pixel_values"])
        explicit = model(inputs["pixel_values"], torch.ones(2, 64, 96, dtype=torch.long))
    torch.testing.assert_close(implicit.logits, explicit.logits)


def test_padding_mask_changes_the_padded_image_only(model, inputs):
    with torch.no_grad():
        masked = model(**inputs)
        unmasked = model(inputs["pixel_values"])
    torch.testing.assert_close(masked.logits[0], unmasked.logits[0])
    assert not torch.allclose(masked.logits[1], unmasked.logits[1])


def test_attentions_and_hidden_states_on_request(model, inputs):
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
        plain = model(**inputs)
    seq = 2 * 3  # 64x96 input, stride 32
    assert len(out.encoder_attentions) == 2 and out.encoder_attentions[0].shape == (2, 4, seq, seq)
    assert len(out.decoder_attentions) == 3 and out.decoder_attentions[0].shape == (2, 4, 10, 10)
    assert out.cross_attentions[0].shape == (2, 4, 10, seq)
    # padded feature positions get no attention
    assert out.cross_attentions[0][1, :, :, -1].abs().max() == 0
    torch.testing.assert_close(out.cross_attentions[0].sum(-1), torch.ones(2, 4, 10))
    assert len(out.encoder_hidden_states) == 3 and len(out.decoder_hidden_states) == 4
    # the explicit-probabilities path and the SDPA path agree
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-4, atol=1e-5)


def test_training_step_with_labels_reaches_queries_and_heads(model, inputs, generator):
    model.train()
    out = model(**inputs, labels=random_labels([3, 0], 5, generator))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.queries.position_embeddings.weight.grad.abs().sum() > 0
    assert model.model.heads.class_heads[0].weight.grad.abs().sum() > 0
    # DETR trains the backbone but not its stem and first stage; batch norm is frozen (no parameters)
    backbone = dict(model.model.backbone.model.named_parameters())
    assert not backbone["embedder.embedder.convolution.weight"].requires_grad
    assert backbone["encoder.stages.3.layers.0.layer.0.convolution.weight"].requires_grad
    assert not any("normalization" in name for name in backbone)


def test_frozen_backbone_option(inputs):
    model = hf_detr.HfDetrForObjectDetection(tiny_config(train_backbone=False))
    assert not any(p.requires_grad for p in model.model.backbone.parameters())


def test_save_load_round_trip(checkpoint, model, inputs, generator):
    loaded = hf_detr.HfDetrForObjectDetection.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    assert loaded.config.id2label[1] == "square"
    # The loss too: its class and term weights are buffers outside the state dict, which from_pretrained
    # (meta-device init) would leave uninitialised unless the model's init recomputes them.
    labels = random_labels([3, 1], model.config.num_labels, generator)
    for reloaded in (loaded, AutoModelForObjectDetection.from_pretrained(checkpoint).eval()):
        torch.testing.assert_close(reloaded.criterion.class_loss.class_weight, model.criterion.class_loss.class_weight, rtol=0, atol=0)
        torch.testing.assert_close(reloaded.criterion.term_weights, torch.tensor([1.0, 5.0, 2.0]), rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs, labels=labels).loss, model(**inputs, labels=labels).loss)


def test_resized_class_head_is_initialised_and_the_rest_loaded(checkpoint, model):
    """Fine-tuning on other classes (`ignore_mismatched_sizes`, as train.py --model_name_or_path does): the
    new class head gets torch's default init, not uninitialised memory; every other weight is the checkpoint's."""
    resized = hf_detr.HfDetrForObjectDetection.from_pretrained(checkpoint, num_labels=7, ignore_mismatched_sizes=True)
    head = resized.model.heads.class_heads[0]
    assert head.weight.shape == (8, model.config.d_model)
    bound = 1 / model.config.d_model**0.5  # nn.Linear's default: uniform(-1/sqrt(in), 1/sqrt(in))
    assert head.weight.abs().max() <= bound and head.bias.abs().max() <= bound
    assert head.weight.std() > bound / 4
    original = model.state_dict()
    for name, value in resized.state_dict().items():
        if not name.startswith("model.heads.class_heads."):
            torch.testing.assert_close(value, original[name], rtol=0, atol=0, msg=name)
    assert resized.criterion.class_loss.class_weight.tolist() == pytest.approx([1.0] * 7 + [0.1])


def test_checkpoints_saved_with_the_earlier_key_layout_load_and_save_in_todays(checkpoint, model, inputs, tmp_path):
    """hf_detr checkpoints from before the heads and input projection moved into HfDetrModel (top-level
    `class_labels_classifier.`, `bbox_predictor.`, `model.input_projection.`) load with the same weights."""
    from safetensors.torch import load_file, save_file

    saved = load_file(checkpoint / "model.safetensors")
    earlier = {"model.heads.class_heads.0.": "class_labels_classifier.", "model.heads.box_heads.0.": "bbox_predictor.",
               "model.feature_levels.projections.0.": "model.input_projection."}  # fmt: skip
    renamed = {}
    for key, value in saved.items():
        for today, before in earlier.items():
            key = key.replace(today, before) if key.startswith(today) else key
        renamed[key] = value
    assert "class_labels_classifier.weight" in renamed and "model.input_projection.weight" in renamed
    save_file(renamed, checkpoint / "model.safetensors", metadata={"format": "pt"})
    loaded = hf_detr.HfDetrForObjectDetection.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
        torch.testing.assert_close(loaded(**inputs).pred_boxes, model(**inputs).pred_boxes)
    loaded.save_pretrained(tmp_path / "again")
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == set(saved)


def test_a_checkpoint_of_a_family_hf_detr_cannot_convert_is_refused_by_its_model_type(tmp_path):
    from transformers import RTDetrConfig

    RTDetrConfig().save_pretrained(tmp_path)
    for model_class in (hf_detr.HfDetrForObjectDetection, hf_detr.HfDetrModel):
        with pytest.raises(ValueError, match="is a 'rt_detr' checkpoint, not an hf_detr one, and hf_detr cannot convert it"):
            model_class.from_pretrained(tmp_path)


def test_auto_classes_after_import(checkpoint, model, inputs):
    assert isinstance(AutoConfig.from_pretrained(checkpoint), hf_detr.HfDetrConfig)
    detector = AutoModelForObjectDetection.from_pretrained(checkpoint).eval()
    assert isinstance(detector, hf_detr.HfDetrForObjectDetection)
    base = AutoModel.from_pretrained(checkpoint).eval()
    assert type(base) is hf_detr.HfDetrModel
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).last_hidden_state, model.model(**inputs).last_hidden_state)
    assert isinstance(AutoImageProcessor.from_pretrained(checkpoint), hf_detr.HfDetrImageProcessor)


def test_checkpoint_carries_remote_code(checkpoint):
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_hf_detr.HfDetrConfig",
        "AutoModel": "modeling_hf_detr.HfDetrModel",
        "AutoModelForObjectDetection": "modeling_hf_detr.HfDetrForObjectDetection",
    }
    for name in ("configuration_hf_detr.py", "modeling_hf_detr.py", "queries.py", "matching.py", "loss.py", "box_ops.py"):
        assert (checkpoint / name).is_file(), name
    # Only the model's own import closure travels: no converter, training or data code.
    from transformers.dynamic_module_utils import get_relative_import_files

    package = Path(hf_detr.__file__).parent
    needed = {Path(f).name for root in ("configuration_hf_detr.py", "modeling_hf_detr.py")
              for f in [package / root, *get_relative_import_files(package / root)]}
    assert {f.name for f in checkpoint.glob("*.py")} == needed
    assert not needed & {"convert.py", "checkpoint_converters.py", "training.py", "data.py", "checkpoints.py"}


def test_remote_code_loads_where_hf_detr_cannot_be_imported(checkpoint, model, inputs, tmp_path_factory):
    labels = random_labels([2, 1], model.config.num_labels, torch.Generator().manual_seed(5))
    torch.save({**inputs, "labels": labels}, checkpoint.parent / "inputs.pt")
    with torch.no_grad():
        output = model(**inputs, labels=labels)
        torch.save({"logits": output.logits, "loss": output.loss}, checkpoint.parent / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_detr"] = None  # any `import hf_detr` now fails
        try:
            import hf_detr
        except ImportError:
            pass
        else:
            raise SystemExit("hf_detr is importable")
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForObjectDetection
        folder = {str(checkpoint)!r}
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        assert type(config).__name__ == "HfDetrConfig" and "hf_detr" not in type(config).__module__.split(".")[0]
        detector = AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(folder, trust_remote_code=True)
        assert type(base).__name__ == "HfDetrModel", type(base)
        inputs = torch.load({str(checkpoint.parent / "inputs.pt")!r})
        with torch.no_grad():
            output = detector(**inputs)
        expected = torch.load({str(checkpoint.parent / "expected.pt")!r})
        torch.testing.assert_close(output.logits, expected["logits"])
        torch.testing.assert_close(output.loss, expected["loss"])
        print("remote-ok", type(detector).__module__)
        """
    )
    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("modules")), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path_factory.mktemp("cwd"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-ok transformers_modules" in result.stdout


def test_pipeline_on_a_real_photograph(checkpoint):
    import skimage.data
    from PIL import Image

    image = Image.fromarray(skimage.data.astronaut())
    detector = pipeline("object-detection", model=str(checkpoint), threshold=0.0)
    detections = detector(image)
    assert len(detections) == 10  # threshold 0: one per query that predicts an object class
    names = {"circle", "square", "triangle", "star", "cross"}
    for detection in detections:
        assert set(detection) == {"score", "label", "box"}
        assert detection["label"] in names and 0 <= detection["score"] <= 1
        box = detection["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= image.width and 0 <= box["ymin"] <= box["ymax"] <= image.height


def _uniform_std(bound):
    return bound / 3**0.5


def _assert_std(tensor, expected, what):
    """The sample std of `tensor` within 4 standard errors (~1/sqrt(2n) relative) of `expected`."""
    n = tensor.numel()
    assert tensor.std().item() == pytest.approx(expected, rel=max(4 / (2 * n) ** 0.5, 0.05)), what


@pytest.mark.parametrize("query_type, class_loss", [("detr", "softmax"), ("conditional", "focal"), ("anchor", "iou_aware")])
@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_a_fresh_model_has_detrs_initialisation(query_type, class_loss, gain):
    """A model built from a config (as train.py builds it) starts from DETR's init: xavier-uniform attention and
    FFN weights of gain `init_xavier_std` with zero biases, in the encoder and decoder of the detection model too
    (its HfDetrModel is initialised first, inside it); LayerNorms at identity; the learned query embeddings
    N(0, 1) (nn.Embedding's); the heads and the input projection with torch's default (uniform +-1/sqrt(fan_in)),
    a sigmoid class head's bias at the 0.01 prior; the ResNet backbone with its own (kaiming-normal) init."""
    torch.manual_seed(0)
    config = tiny_config(query_type=query_type, class_loss=class_loss, init_xavier_std=gain, d_model=64,
                         encoder_ffn_dim=128, decoder_ffn_dim=128)  # fmt: skip
    for model in (hf_detr.HfDetrForObjectDetection(config), AutoModelForObjectDetection.from_config(config)):
        transformer_linears = [
            (f"{name}.{child_name}", child)
            for name, module in model.named_modules() if isinstance(module, hf_detr.layers.HfDetrAttention | hf_detr.layers.HfDetrMLP)
            for child_name, child in module.named_children() if isinstance(child, torch.nn.Linear)
        ]  # fmt: skip
        assert len(transformer_linears) >= 4 * (2 + 2 * 3) + 2 * 5  # q, k, v, o per attention; fc1, fc2 per FFN
        for name, linear in transformer_linears:
            fan_out, fan_in = linear.weight.shape
            bound = gain * (6 / (fan_in + fan_out)) ** 0.5
            assert linear.weight.abs().max() <= bound, name
            _assert_std(linear.weight, _uniform_std(bound), name)
            assert linear.bias.abs().max() == 0, name
        for name, norm in model.named_modules():
            if isinstance(norm, torch.nn.LayerNorm):
                assert (norm.weight == 1).all() and (norm.bias == 0).all(), name
        queries = model.model.queries
        embedding = queries.anchor_embeddings if query_type == "anchor" else queries.position_embeddings
        _assert_std(embedding.weight, 1.0, "query embeddings")
        assert embedding.weight.mean().abs() < 4 / embedding.weight.numel() ** 0.5
        head = model.model.heads.class_heads[0]
        default_bound = 1 / head.in_features**0.5
        assert head.weight.abs().max() <= default_bound
        _assert_std(head.weight, _uniform_std(default_bound), "class head")
        if class_loss == "softmax":
            assert head.bias.abs().max() <= default_bound and head.bias.std() > 0
        else:
            torch.testing.assert_close(head.bias, torch.full_like(head.bias, -math.log(0.99 / 0.01)))
        box_layers = model.model.heads.box_heads[0].layers
        first = box_layers[0]
        _assert_std(first.weight, _uniform_std(1 / first.in_features**0.5), "box head")
        if query_type == "detr":
            assert box_layers[-1].weight.std() > 0
        else:  # the first boxes are the reference points / anchors themselves
            assert box_layers[-1].weight.abs().max() == 0 and box_layers[-1].bias.abs().max() == 0
        projection = model.model.feature_levels.projections[0]
        assert projection.weight.abs().max() <= 1 / projection.in_channels**0.5
        conv = model.model.backbone.model.encoder.stages[-1].layers[0].layer[0].convolution
        fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
        _assert_std(conv.weight, (2 / fan_out) ** 0.5, "backbone convolution")


@pytest.mark.parametrize("decoder_layers", [2, 6])
def test_batched_pipeline_gives_the_unbatched_detections(decoder_layers, tmp_path):
    """pipeline(images, batch_size=B) splits every output field by image: a per-layer list in the output
    (auxiliary_outputs, which train.py's auxiliary_loss=True would fill) failed once B >= the layer count."""
    from PIL import Image

    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(tiny_config(decoder_layers=decoder_layers, auxiliary_loss=True))
    model.save_pretrained(tmp_path)
    hf_detr.HfDetrImageProcessor(size={"shortest_edge": 48, "longest_edge": 64}).save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(1)
    images = [Image.fromarray(torch.randint(0, 255, (48, 64, 3), generator=generator, dtype=torch.uint8).numpy()) for _ in range(8)]
    detector = pipeline("object-detection", model=str(tmp_path), threshold=0.0)
    expected = [detector(image) for image in images]
    assert all(len(detections) == model.config.num_queries for detections in expected)  # threshold 0: every query
    for batch_size in (1, 2, 4, 8):
        batched = detector(images, batch_size=batch_size)
        assert len(batched) == len(images)
        for got, want in zip(batched, expected):
            assert [d["label"] for d in got] == [d["label"] for d in want], batch_size
            for d, e in zip(got, want):
                assert d["score"] == pytest.approx(e["score"], abs=1e-5)
                assert all(abs(d["box"][k] - e["box"][k]) <= 1 for k in e["box"])  # integer pixels


def test_building_the_pipeline_logs_only_transformers_built_in_table_error(checkpoint, caplog):
    """transformers' object-detection pipeline checks the model class against a copy of its built-in table
    (MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES), not the models registered with AutoModelForObjectDetection, and
    logs an ERROR line for any other; the pipeline then runs (README, "Use"). If a transformers version
    accepts registered models there, this test fails and the README's note goes."""
    import logging

    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.ERROR):
            detector = pipeline("object-detection", model=str(checkpoint), threshold=0.0)
    finally:
        transformers_logging.disable_propagation()
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors and all(e.startswith("The model 'HfDetrForObjectDetection' is not supported for object-detection") for e in errors)
    assert len(detector(__import__("PIL.Image").Image.new("RGB", (64, 48)))) == 10
