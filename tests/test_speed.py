import pytest
import torch

import hf_detr
from conftest import tiny_config
from hf_detr.speed import enable_fast_mode


@pytest.fixture
def model():
    torch.manual_seed(0)
    return hf_detr.HfDetrForObjectDetection(tiny_config()).eval()


@pytest.fixture
def pixel_values():
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))


def test_bf16_autocast_is_close_and_keeps_the_state_dict(model, pixel_values):
    with torch.no_grad():
        expected = model(pixel_values)
    keys = list(model.state_dict())
    enable_fast_mode(model, bf16=True)
    with torch.no_grad():
        out = model(pixel_values)
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits.float(), expected.logits, rtol=0, atol=0.1)
    torch.testing.assert_close(out.pred_boxes.float(), expected.pred_boxes, rtol=0, atol=0.05)
    assert list(model.state_dict()) == keys


def test_bf16_training_step_has_fp32_loss_and_gradients(model, pixel_values):
    from conftest import random_labels

    enable_fast_mode(model.train(), bf16=True)
    out = model(pixel_values, labels=random_labels([2, 1], 5, torch.Generator().manual_seed(2)))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.class_labels_classifier.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_sdpa_backend_choice_gives_the_same_outputs(model, pixel_values, backend):
    with torch.no_grad():
        expected = model(pixel_values).logits
        out = enable_fast_mode(model, sdpa_backend=backend)(pixel_values).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_unknown_sdpa_backend_is_rejected(model):
    with pytest.raises(ValueError, match="sdpa_backend"):
        enable_fast_mode(model, sdpa_backend="fastest")


def ran_convolution(fn) -> bool:
    with torch.profiler.profile() as profile:
        fn()
    return any(event.key == "aten::convolution" for event in profile.key_averages())


def test_linear_matches_nn_linear_in_forward_and_backward():
    from hf_detr.modeling_hf_detr import _ONEDNN_PRODUCTS, Linear

    torch.manual_seed(0)
    reference, ours = torch.nn.Linear(256, 128), Linear(256, 128)  # 512 x 256 x 128 products: the oneDNN path
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
    assert ran_convolution(lambda: ours(x)) == _ONEDNN_PRODUCTS
    assert not ran_convolution(lambda: ours(x[:, :8]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ran_convolution(lambda: ours(x))
    torch.backends.mkldnn.enabled = False
    try:
        assert not ran_convolution(lambda: ours(x))
    finally:
        torch.backends.mkldnn.enabled = True
