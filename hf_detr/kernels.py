"""Speed kernels, applied to a built model by `apply_speed_kernels(model)` (the models' `post_init` does).

They change how the math runs, never what is computed: the state dict keeps its keys and values, the
outputs agree with the plain model to float rounding (tested), and every kernel steps aside while the
model is traced, exported or compiled (`exporting()`), so an exported graph is the plain model's.

- `FoldedBatchNormConv2d`: a frozen batch norm folded into the convolution before it; on CPU a
  strided 1x1 convolution runs as a pixel subsample + a dense one.
- A convolutional backbone runs channels-last (NHWC, oneDNN's fastest CPU layout); a ResNet's ReLUs
  work in place.
- `OneDnnLinear`: on x86 CPUs, fp32 products of 12M multiply-adds and more go to oneDNN.
- `padding_mask_or_none`: no attention mask when nothing is padded (on CPU).

Switches, as timm's `set_exportable`: `hf_detr.kernels.set_enabled(False)` turns all of them off at run time,
`with hf_detr.kernels.enabled(False): ...` for a block (both work on models already built; `is_enabled()` says
which holds); `torch.backends.mkldnn.enabled = False` turns off the oneDNN products alone.

This file is part of the model surface (saved next to config.json): it imports only torch and
transformers.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

_ENABLED = True


def set_enabled(enable: bool) -> None:
    """Switch the speed kernels on or off for every model, from now on."""
    global _ENABLED
    _ENABLED = bool(enable)


def is_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def enabled(enable: bool = True):
    """The speed kernels on (or off) inside the block, as they were after it."""
    previous = _ENABLED
    set_enabled(enable)
    try:
        yield
    finally:
        set_enabled(previous)

# oneDNN runs fp32 products at the CPU's peak on x86 with AVX2 or AVX-512; see OneDnnLinear.
ONEDNN_PRODUCTS = torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability() in {"AVX2", "AVX512"}
ONEDNN_MIN_MACS = 12_000_000  # smaller products stay faster in sgemm (measured: 0.9x at 8.4M, 1.1x at 13M multiply-adds)


def exporting() -> bool:
    """True while the model is traced, exported (ONNX, torch.export) or compiled: kernels then step aside."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def active() -> bool:
    return _ENABLED and not exporting()


class FoldedBatchNormConv2d(nn.Conv2d):
    """A convolution that also applies the frozen batch norm after it, folded into its weight and bias:
    conv(x, w) * scale + shift == conv(x, w * scale) + shift (up to float rounding). One pass over the
    feature map instead of three (conv, multiply, add), and no normalisation pass in the backward.

    The batch norm keeps its buffers (the stored truth, under their state-dict keys), passes its input
    through (`folded`), and this module only refers to it. The fold is recomputed on every call, a pass
    over the weights only (about 3% of a ResNet-50 forward at 800 pixels), so that it can never go stale,
    however weights or statistics change (loading, `.to()`, optimiser steps, in-place edits), and the
    gradient reaches `weight`. While exporting it runs the plain convolution, then the norm's affine map."""

    @classmethod
    def fold(cls, conv: nn.Conv2d, norm: nn.Module) -> "FoldedBatchNormConv2d":
        """conv: a plain nn.Conv2d; norm: a frozen batch norm with `scale_and_shift()` and a `folded` flag."""
        folded = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
        )  # fmt: skip
        folded.weight, folded.bias = conv.weight, conv.bias  # the same parameters, not copies
        folded._norm = (norm,)  # a tuple: referenced, not registered (its buffers stay under its own keys)
        norm.folded = True
        return keep_init_state(conv, folded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self._norm[0].scale_and_shift()
        if not active():
            out = self._conv_forward(x, self.weight, self.bias)
            return out * scale[:, None, None] + shift[:, None, None]
        weight = self.weight * scale.to(self.weight.dtype)[:, None, None, None]
        bias = (shift if self.bias is None else shift + self.bias * scale).to(weight.dtype)
        if self.kernel_size == (1, 1) and self.stride != (1, 1) and self.padding == (0, 0) and x.device.type == "cpu":
            # A strided 1x1 convolution (the ResNet shortcuts) reads every s-th pixel: take those
            # first and run a dense one, the same sums. oneDNN's strided 1x1 kernels run at under half
            # the speed of its dense ones on CPU (stage-2 shortcut forward + backward: 33 -> 14 ms);
            # on GPU the strided kernel is left alone (not measured there).
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
            return F.conv2d(x, weight, bias, 1, 0, self.dilation, self.groups)
        return self._conv_forward(x, weight, bias)


def keep_init_state(module: nn.Module, replacement: nn.Module) -> nn.Module:
    """The replacement holds the same parameters, so it carries the module's transformers init flag: a model
    built inside another (HfDetrModel in HfDetrForObjectDetection) gets its kernels at its own `post_init`,
    and the outer model's init pass must skip what the inner one initialised (DETR's xavier attention and
    FFN weights), as it skips the original modules."""
    if getattr(module, "_is_hf_initialized", False):
        replacement._is_hf_initialized = True
    return replacement


def fold_frozen_batch_norm(module: nn.Module) -> int:
    """Fold each frozen batch norm into the convolution it follows, for the conv + norm pairs of
    transformers' CNN backbones (a module with children `convolution` and `normalization`, applied in
    that order). The state dict keeps its keys and values. Returns the number of folded pairs."""
    count = 0
    for parent in list(module.modules()):
        conv, norm = getattr(parent, "convolution", None), getattr(parent, "normalization", None)
        if type(conv) is nn.Conv2d and hasattr(norm, "scale_and_shift") and not norm.folded:
            parent.convolution = FoldedBatchNormConv2d.fold(conv, norm)
            count += 1
    return count


def _channels_last_input(module: nn.Module, args: tuple):
    if active() and args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


class OneDnnLinear(nn.Linear):
    """nn.Linear (the same parameters, state-dict keys and initialisation) whose fp32 product on an
    x86 CPU runs through oneDNN, as a 1x1 convolution over a channels-last [1, in, 1, N] view of the
    N input rows. torch gives fp32 matmuls to MKL's sgemm, which on the AMD EPYC (Zen 5) we measure
    on runs at ~215 GFLOP/s on this model's shapes, against ~460 for oneDNN on the same products
    (fp32 arithmetic both, summed in another order: outputs agree to ~1e-7 relative). Forward and
    backward both take the oneDNN path: 1.7-2.1x on the encoder's and FFNs' products. Products under
    12M multiply-adds, where sgemm is as fast or faster, and everything else (GPU, autocast, other
    CPUs, `torch.backends.mkldnn.enabled = False`, exporting) use nn.Linear."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "OneDnnLinear":
        wrapped = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        wrapped.weight, wrapped.bias = linear.weight, linear.bias  # the same parameters, not copies
        return keep_init_state(linear, wrapped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            ONEDNN_PRODUCTS
            and active()
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and x.numel() * self.out_features >= ONEDNN_MIN_MACS
            and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu")
        ):
            return super().forward(x)
        rows = x.reshape(1, 1, -1, self.in_features).permute(0, 3, 1, 2)  # [1, in, 1, N], channels-last
        out = F.conv2d(rows, self.weight[:, :, None, None], self.bias)  # [1, out, 1, N], channels-last
        return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], self.out_features)


def padding_mask_or_none(mask: torch.Tensor) -> torch.Tensor | None:
    """[B, S] key padding mask (True = real) -> itself, or None when nothing is padded: SDPA's unmasked
    kernel is faster and gives the same result. Checked on CPU only (on a GPU the check would wait for
    it), and never while exporting, where the graph must keep the mask for padded inputs."""
    if mask.device.type == "cpu" and active() and bool(mask.all()):
        return None
    return mask


def apply_speed_kernels(model: nn.Module) -> nn.Module:
    """Switch the kernels on for a built model, in place (idempotent); returns the model."""
    fold_frozen_batch_norm(model)
    for module in model.modules():
        # a transformers backbone (BackboneMixin: `channels`, `out_features`) made of convolutions
        is_backbone = isinstance(module, PreTrainedModel) and hasattr(module, "channels") and hasattr(module, "out_features")
        if is_backbone and any(isinstance(m, nn.Conv2d) for m in module.modules()):
            if not getattr(module, "_channels_last_hook", None):
                module._channels_last_hook = module.register_forward_pre_hook(_channels_last_input)
            if type(module).__name__ == "ResNetBackbone":
                # each ReLU follows a convolution, a batch norm or a residual sum, none of which needs
                # its output for the backward: one feature-map allocation less each
                for relu in module.modules():
                    if type(relu) is nn.ReLU:
                        relu.inplace = True
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, OneDnnLinear.wrap(child))
    return model


__all__ = [
    "apply_speed_kernels", "FoldedBatchNormConv2d", "OneDnnLinear", "padding_mask_or_none", "exporting", "set_enabled", "is_enabled", "enabled",
]  # fmt: skip
