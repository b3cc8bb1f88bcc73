"""An exponential moving average of a model's weights, as RT-DETR, D-FINE and RF-DETR train with: evaluations,
the best model and the final model use the average, which is smoother than the last step's weights. Training
side: never imported by the model surface.

    ema = hf_detr.ema.ExponentialMovingAverage(model, decay=0.9999, warmup_steps=2000)
    ... after each optimizer step: ema.update(model)
    ema.module                       # an HfDetrForObjectDetection with the averaged weights (and buffers)

torch's `AveragedModel` keeps the copy and its update count (`n_averaged`, in its state dict: a checkpoint
restores the average exactly); this file adds RT-DETR's warm-up of the decay, which lets the average follow the
fast early changes: decay_t = decay * (1 - exp(-t / warmup_steps)) at the t-th update.
"""

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class ExponentialMovingAverage(AveragedModel):
    """`module`: the averaged copy of the model. The first update copies the weights; the t-th after it moves
    every floating-point weight and buffer a fraction 1 - decay_t towards the model's (other buffers: copied)."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 2000):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the EMA decay must be in [0, 1), got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"the EMA warm-up must be >= 0 steps, got {warmup_steps}")
        self.decay, self.warmup_steps = decay, warmup_steps
        super().__init__(model, multi_avg_fn=self._average, use_buffers=True)
        self.module.eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    def decay_at(self, update: int) -> float:
        """The decay of the `update`-th update after the first (the average's update count - 1)."""
        return self.decay * (1 - math.exp(-update / self.warmup_steps)) if self.warmup_steps else self.decay

    @torch.no_grad()
    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        weight = 1 - self.decay_at(int(num_averaged))
        floating = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floating:
            torch._foreach_lerp_([a for a, _ in floating], [c for _, c in floating], weight)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)

    def update(self, model: nn.Module) -> None:
        """After an optimizer step of `model` (unwrapped from DDP / accelerate)."""
        self.update_parameters(model)


__all__ = ["ExponentialMovingAverage"]
