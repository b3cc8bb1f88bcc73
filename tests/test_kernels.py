"""hf_detr/kernels.py: the speed kernels compute what the plain model computes, keep the state dict,
and step aside while the model is exported."""

import pytest
import torch

import hf_detr
from conftest import tiny_config


@pytest.fixture
def model():
    torch.manual_seed(0)
    return hf_detr.HfDetrForObjectDetection(tiny_config()).eval()


# ---- speed: the frozen batch norm folded into its convolution (same numbers, same state dict)


def _conv_and_frozen_norm(generator):
    from hf_detr.backbone import FrozenBatchNorm2d

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
    from hf_detr.kernels import FoldedBatchNormConv2d

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
    from hf_detr.kernels import FoldedBatchNormConv2d

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
    from hf_detr.kernels import FoldedBatchNormConv2d
    from hf_detr.backbone import FrozenBatchNorm2d

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
    from hf_detr.kernels import FoldedBatchNormConv2d
    from hf_detr.backbone import FrozenBatchNorm2d

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


def ran_convolution(fn) -> bool:
    with torch.profiler.profile() as profile:
        fn()
    return any(event.key == "aten::convolution" for event in profile.key_averages())


def test_linear_matches_nn_linear_in_forward_and_backward():
    from hf_detr.kernels import ONEDNN_PRODUCTS, OneDnnLinear

    torch.manual_seed(0)
    reference, ours = torch.nn.Linear(256, 128), OneDnnLinear(256, 128)  # 512 x 256 x 128 products: the oneDNN path
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 256, 256)
    x_ours = x.clone().requires_grad_()
    x_reference = x.clone().requires_grad_()
    out = ours(x_ours)
    expected = reference(x_reference)
    assert out.shape == (2, 256, 128)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_reference.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-5)
    # Which path ran: oneDNN (a 1x1 convolution) where available, nn.Linear for small products,
    # under autocast and with oneDNN switched off.
    assert ran_convolution(lambda: ours(x)) == ONEDNN_PRODUCTS
    assert not ran_convolution(lambda: ours(x[:, :8]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ran_convolution(lambda: ours(x))
    torch.backends.mkldnn.enabled = False
    try:
        assert not ran_convolution(lambda: ours(x))
    finally:
        torch.backends.mkldnn.enabled = True


def test_kernels_off_give_the_same_outputs_and_gradients(model, inputs, generator, monkeypatch):
    """The kernels switched off (`kernels.enabled(False)`) give the plain model: every kernel is only a faster way
    to the same numbers; the switch restores what held before the block."""
    from conftest import random_labels

    from hf_detr import kernels

    assert any(isinstance(m, kernels.OneDnnLinear) for m in model.modules())
    assert any(isinstance(m, kernels.FoldedBatchNormConv2d) for m in model.modules())
    labels = random_labels([3, 1], 5, generator)
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)  # every product through oneDNN when the kernels are on
    results = []
    calls = []
    original_fold = kernels.FoldedBatchNormConv2d.forward
    monkeypatch.setattr(kernels.FoldedBatchNormConv2d, "forward", lambda self, x: calls.append(kernels.active()) or original_fold(self, x))
    for enable in (True, False):
        with kernels.enabled(enable):
            assert kernels.is_enabled() == enable
            model.zero_grad()
            out = model.train()(**inputs, labels=[{k: v.clone() for k, v in t.items()} for t in labels])
            out.loss.backward()
        results.append((out.logits.detach(), out.loss.detach(), model.model.feature_levels.projections[0].weight.grad.clone()))
        assert calls and set(calls) == {enable}  # the kernels ran, or stepped aside, in the block
        calls.clear()
    assert kernels.is_enabled()  # as before the blocks
    (logits_on, loss_on, grad_on), (logits_off, loss_off, grad_off) = results
    torch.testing.assert_close(logits_on, logits_off, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_on, grad_off, rtol=1e-4, atol=1e-5)


def test_a_traced_model_keeps_the_padding_mask(model, inputs):
    """Traced on an unpadded batch, the graph still masks padding: the CPU shortcut that drops an
    all-true mask (and every other kernel) steps aside while tracing."""

    class Detections(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values, pixel_mask):
            output = self.model(pixel_values, pixel_mask)
            return output.logits, output.pred_boxes

    unpadded = torch.ones_like(inputs["pixel_mask"])
    with torch.no_grad():
        traced = torch.jit.trace(Detections(model), (inputs["pixel_values"], unpadded), check_trace=False)
        expected = Detections(model)(**inputs)
        actual = traced(**inputs)
    assert not torch.allclose(expected[0], Detections(model)(inputs["pixel_values"], unpadded)[0])  # padding matters here
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=1e-5)
