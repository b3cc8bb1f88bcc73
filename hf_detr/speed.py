"""Opt-in speed modes for training and evaluation scripts (training side: never imported by the model
surface, and nothing here changes weights, state-dict keys or the saved checkpoint).

    from hf_detr.speed import enable_fast_mode
    model = enable_fast_mode(model, bf16=True)             # bfloat16 autocast around forward
    model = enable_fast_mode(model, compile=True)          # torch.compile of backbone + transformer
    model = enable_fast_mode(model, sdpa_backend="math")   # pin the attention kernel

Measured effects (speed and largest output difference from fp32) are in BENCHMARKS.md, produced by
`scripts/benchmark.py --rows modes`. The default (none of these) is the fp32 eager model whose
outputs match transformers' DETR.
"""

import contextlib
import functools

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# names accepted by enable_fast_mode(sdpa_backend=...); on CPU only "math" and "flash" exist
SDPA_BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def enable_fast_mode(
    model: nn.Module,
    *,
    bf16: bool = False,
    compile: bool = False,
    sdpa_backend: str | None = None,
    compile_kwargs: dict | None = None,
) -> nn.Module:
    """Switch opt-in speed modes on for `model` (an HfDetrForObjectDetection or HfDetrModel), in place;
    returns the model.

    bf16: run forward under `torch.autocast(<the model's device>, dtype=torch.bfloat16)`. Matmuls and
        convolutions run in bfloat16, so logits and boxes come back in bfloat16 and differ from fp32
        (see BENCHMARKS.md); the matcher and the loss still compute in fp32. Worth it on CPUs with
        native bf16 (AVX512-BF16 / AMX) and on GPUs.
    compile: `torch.compile` the backbone + transformer (`HfDetrModel`) in place with `compile_kwargs`;
        the heads and the set criterion (scipy's Hungarian solver) stay eager. The first call of each
        new input shape compiles (minutes on a small CPU); the state-dict keys do not change.
    sdpa_backend: one of SDPA_BACKENDS, forced for every attention call in forward.
    """
    if sdpa_backend is not None and sdpa_backend not in SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend must be one of {sorted(SDPA_BACKENDS)}, got {sdpa_backend!r}")
    if compile:
        inner = getattr(model, "model", model)  # HfDetrForObjectDetection.model is the HfDetrModel
        inner.compile(**(compile_kwargs or {}))
    contexts = []
    if bf16:
        contexts.append(lambda: torch.autocast(_device_type(model), dtype=torch.bfloat16))
    if sdpa_backend is not None:
        contexts.append(lambda: sdpa_kernel(SDPA_BACKENDS[sdpa_backend]))
    if contexts:
        forward = model.forward

        @functools.wraps(forward)
        def fast_forward(*args, **kwargs):
            with contextlib.ExitStack() as stack:
                for context in contexts:
                    stack.enter_context(context())
                return forward(*args, **kwargs)

        model.forward = fast_forward
    return model


def _device_type(model: nn.Module) -> str:
    parameter = next(model.parameters(), None)
    return "cpu" if parameter is None else parameter.device.type


__all__ = ["enable_fast_mode", "SDPA_BACKENDS"]
