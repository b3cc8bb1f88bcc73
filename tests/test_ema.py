"""hf_detr.ema: the average RT-DETR's warm-up formula gives, over weights and buffers, restored exactly from its state."""

import math

import pytest
import torch
from torch import nn

import hf_detr
from conftest import tiny_config
from hf_detr.ema import ExponentialMovingAverage


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)  # a float buffer (running_mean) and an integer one (num_batches_tracked)


def test_the_average_follows_rt_detrs_warmed_up_decay_over_weights_and_buffers():
    model = Tiny()
    ema = ExponentialMovingAverage(model, decay=0.9, warmup_steps=2)
    history = []
    for update in range(4):
        with torch.no_grad():
            model.linear.weight.add_(1.0)
            model.norm.running_mean.add_(2.0)
            model.norm.num_batches_tracked += 1
        history.append((model.linear.weight.clone(), model.norm.running_mean.clone()))
        ema.update(model)
    # by hand: the first update copies; the t-th after it moves 1 - 0.9 (1 - exp(-t / 2)) of the way
    weight, running_mean = history[0]
    for t, (w, m) in enumerate(history[1:], start=1):
        step = 1 - 0.9 * (1 - math.exp(-t / 2))
        weight, running_mean = weight + step * (w - weight), running_mean + step * (m - running_mean)
    torch.testing.assert_close(ema.module.linear.weight, weight)
    torch.testing.assert_close(ema.module.norm.running_mean, running_mean)
    assert ema.module.norm.num_batches_tracked == 4  # integers are copied
    assert int(ema.n_averaged) == 4 and not any(p.requires_grad for p in ema.module.parameters())
    assert ema.decay_at(0) == 0.0 and ema.decay_at(10**6) == pytest.approx(0.9)
    assert ExponentialMovingAverage(Tiny(), 0.5, warmup_steps=0).decay_at(1) == 0.5


def test_a_saved_average_restores_exactly_and_the_decay_is_checked():
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(tiny_config())
    ema = ExponentialMovingAverage(model, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.01)
        ema.update(model)
    restored = ExponentialMovingAverage(hf_detr.HfDetrForObjectDetection(tiny_config()), decay=0.99)
    restored.load_state_dict(ema.state_dict())
    assert int(restored.n_averaged) == 3
    for (name, a), b in zip(ema.module.state_dict().items(), restored.module.state_dict().values()):
        assert torch.equal(a, b), name
    for decay in (1.0, -0.1):
        with pytest.raises(ValueError, match="EMA decay"):
            ExponentialMovingAverage(Tiny(), decay)
