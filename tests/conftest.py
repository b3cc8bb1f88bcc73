"""Shared tiny configs and inputs: everything here runs in seconds on 2 CPU cores."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the Hub
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_backbone_config(**overrides):
    from transformers import ResNetConfig

    kwargs = dict(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="bottleneck", out_features=["stage4"]
    )
    kwargs.update(overrides)
    return ResNetConfig(**kwargs)


# The transformer sizes shared by the tiny hf_detr configs and the tiny transformers DETR configs.
TINY_SIZES = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    num_queries=10,
    num_labels=5,
)


def tiny_config(**overrides):
    import hf_detr

    kwargs = dict(backbone_config=tiny_backbone_config(), **TINY_SIZES, dropout=0.0)
    kwargs.update(overrides)
    return hf_detr.HfDetrConfig(**kwargs)


def random_labels(batch_sizes, num_labels, generator=None):
    """One target dict per image with the given object counts: cxcywh boxes inside [0, 1]."""
    labels = []
    for n in batch_sizes:
        centers = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        labels.append({"class_labels": torch.randint(0, num_labels, (n,), generator=generator), "boxes": torch.cat([centers, sizes], -1)})
    return labels


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def inputs():
    """Two images, the second padded at the bottom and on the right."""
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 64, 96)
    pixel_mask = torch.ones(2, 64, 96, dtype=torch.long)
    pixel_mask[1, 40:] = 0
    pixel_mask[1, :, 64:] = 0
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}


ROOT = Path(__file__).resolve().parents[1]


def load_train_script():
    """scripts/train.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_detr_train_script", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
