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
    assert model.model.heads.class_heads[0].weight.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_sdpa_backend_choice_gives_the_same_outputs(model, pixel_values, backend):
    with torch.no_grad():
        expected = model(pixel_values).logits
        out = enable_fast_mode(model, sdpa_backend=backend)(pixel_values).logits
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_unknown_sdpa_backend_is_rejected(model):
    with pytest.raises(ValueError, match="sdpa_backend"):
        enable_fast_mode(model, sdpa_backend="fastest")
