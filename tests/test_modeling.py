import json
import subprocess
import sys
import textwrap

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
def inputs():
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 64, 96)
    pixel_mask = torch.ones(2, 64, 96, dtype=torch.long)
    pixel_mask[1, 40:] = 0  # second image padded at the bottom and right
    pixel_mask[1, :, 64:] = 0
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}


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
    assert out.logits.device.type == "meta" and out.logits.shape == (2, 10, 6)
    assert all(aux["pred_boxes"].device.type == "meta" for aux in out.auxiliary_outputs)
    model.train()
    assert model(**meta).pred_boxes.shape == (2, 10, 4)


def test_heads_are_shared_across_decoder_layers(model, inputs):
    with torch.no_grad():
        base = model.model(**inputs)
        out = model(**inputs)
    for layer, aux in enumerate(out.auxiliary_outputs):
        hidden = base.intermediate_hidden_states[layer]
        torch.testing.assert_close(aux["logits"], model.class_labels_classifier(hidden))
        torch.testing.assert_close(aux["pred_boxes"], model.bbox_predictor(hidden))


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
    assert model.class_labels_classifier.weight.grad.abs().sum() > 0
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
        torch.testing.assert_close(reloaded.criterion.class_weight, model.criterion.class_weight, rtol=0, atol=0)
        torch.testing.assert_close(reloaded.criterion.term_weights, torch.tensor([1.0, 5.0, 2.0]), rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs, labels=labels).loss, model(**inputs, labels=labels).loss)


def test_resized_class_head_is_initialised_and_the_rest_loaded(checkpoint, model):
    """Fine-tuning on other classes (`ignore_mismatched_sizes`, as train.py --model_name_or_path does): the
    new class head gets torch's default init, not uninitialised memory; every other weight is the checkpoint's."""
    resized = hf_detr.HfDetrForObjectDetection.from_pretrained(checkpoint, num_labels=7, ignore_mismatched_sizes=True)
    head = resized.class_labels_classifier
    assert head.weight.shape == (8, model.config.d_model)
    bound = 1 / model.config.d_model**0.5  # nn.Linear's default: uniform(-1/sqrt(in), 1/sqrt(in))
    assert head.weight.abs().max() <= bound and head.bias.abs().max() <= bound
    assert head.weight.std() > bound / 4
    original = model.state_dict()
    for name, value in resized.state_dict().items():
        if not name.startswith("class_labels_classifier."):
            torch.testing.assert_close(value, original[name], rtol=0, atol=0, msg=name)
    assert resized.criterion.class_weight.tolist() == pytest.approx([1.0] * 7 + [0.1])


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
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path_factory.mktemp("cwd"), timeout=300)
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


# ---- speed: the frozen batch norm folded into its convolution (same numbers, same state dict)


def _conv_and_frozen_norm(generator):
    from hf_detr.modeling_hf_detr import FrozenBatchNorm2d

    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
    norm = FrozenBatchNorm2d(6)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        for name in ("weight", "running_var"):
            getattr(norm, name).copy_(torch.rand(6, generator=generator) + 0.5)
        for name in ("bias", "running_mean"):
            getattr(norm, name).copy_(torch.randn(6, generator=generator))
    return conv, norm


def test_folded_convolution_equals_convolution_then_frozen_batch_norm(generator):
    from hf_detr.modeling_hf_detr import FoldedBatchNormConv2d

    conv, norm = _conv_and_frozen_norm(generator)
    x = torch.randn(2, 4, 9, 11, generator=generator)
    expected = norm(conv(x))
    folded = FoldedBatchNormConv2d.fold(conv, norm)
    assert folded.weight is conv.weight and norm.folded and torch.equal(norm(x), x)
    for layout in (torch.contiguous_format, torch.channels_last):
        with torch.no_grad():
            torch.testing.assert_close(folded(x.contiguous(memory_format=layout)), expected, rtol=1e-5, atol=1e-5)
    # training: the gradient reaches the convolution's weight through the fold, as without it
    expected_grad = torch.autograd.grad((expected * expected).sum(), conv.weight)[0]
    output = folded(x)
    torch.testing.assert_close(torch.autograd.grad((output * output).sum(), folded.weight)[0], expected_grad, rtol=1e-4, atol=1e-4)


def test_folded_weights_follow_changed_statistics(generator):
    from hf_detr.modeling_hf_detr import FoldedBatchNormConv2d

    conv, norm = _conv_and_frozen_norm(generator)
    folded = FoldedBatchNormConv2d.fold(conv, norm)
    x = torch.randn(1, 4, 5, 5, generator=generator)
    with torch.no_grad():
        before = folded(x)
        norm.running_var.mul_(4.0)  # in place, as load_state_dict does
        folded.weight.data.mul_(0.5)  # through .data: no version-counter bump, still seen
        after = folded(x)
        norm.folded = False
        torch.testing.assert_close(after, norm(torch.nn.functional.conv2d(x, conv.weight, None, padding=1)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_folding_keeps_state_dict_keys_and_values(model, inputs):
    from hf_detr.modeling_hf_detr import FoldedBatchNormConv2d, FrozenBatchNorm2d

    backbone = model.model.backbone.model
    folded = [m for m in backbone.modules() if isinstance(m, FoldedBatchNormConv2d)]
    norms = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert folded and len(folded) == len(norms) and all(norm.folded for norm in norms)
    keys = set(model.state_dict())
    assert "model.backbone.model.embedder.embedder.normalization.running_var" in keys
    assert "model.backbone.model.embedder.embedder.convolution.weight" in keys
    assert not any("convolution._" in key for key in keys)
    # new statistics through load_state_dict reach the folded weights
    with torch.no_grad():
        model(**inputs)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["model.backbone.model.embedder.embedder.normalization.running_var"] *= 3.0
        reference = hf_detr.HfDetrForObjectDetection(model.config).eval()
        reference.load_state_dict(state)
        model.load_state_dict(state)
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits)


@pytest.mark.parametrize("kernel, stride", [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_folded_batch_norm_convolution_equals_convolution_then_batch_norm(kernel, stride):
    from hf_detr.modeling_hf_detr import FoldedBatchNormConv2d, FrozenBatchNorm2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, kernel, stride=stride, padding=kernel // 2, bias=False)
    norm = FrozenBatchNorm2d(16)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(norm, name).copy_(torch.rand(16) + 0.5 if name in ("weight", "running_var") else torch.randn(16))
    x = torch.randn(2, 8, 11, 14).contiguous(memory_format=torch.channels_last)  # odd sizes: strides do not divide
    x_reference, x_folded = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = norm(conv(x_reference))
    expected.backward(torch.ones_like(expected))
    grad_expected = conv.weight.grad.clone()
    conv.weight.grad = None
    folded = FoldedBatchNormConv2d.fold(conv, norm)  # norm now passes its input through
    actual = folded(x_folded)
    actual.backward(torch.ones_like(actual))
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_folded.grad, x_reference.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.weight.grad, grad_expected, rtol=1e-4, atol=1e-4)
