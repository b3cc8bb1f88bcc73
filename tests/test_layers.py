"""The transformer layers: attention through transformers' attention interface (the implementation the config
reports is the one that runs), gradient checkpointing through transformers' GradientCheckpointingLayer."""

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_detr
import hf_detr.layers
from conftest import random_labels, tiny_config


def attention_calls(monkeypatch):
    """Count the calls that reach transformers' sdpa function and hf_detr's eager one."""
    calls = {"sdpa": 0, "eager": 0}
    sdpa, eager = ALL_ATTENTION_FUNCTIONS["sdpa"], hf_detr.layers.eager_attention

    def counting(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return call

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", counting("sdpa", sdpa))
    monkeypatch.setattr(hf_detr.layers, "eager_attention", counting("eager", eager))
    return calls


@pytest.mark.parametrize("query_type", sorted(hf_detr.QUERY_BUILDERS))
def test_the_attention_the_config_reports_is_the_one_that_runs(query_type, inputs, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(tiny_config(query_type=query_type)).eval()
    config = model.config
    num_attentions = sum(isinstance(m, hf_detr.layers.HfDetrAttention) for m in model.modules())  # the dense ones
    assert num_attentions == config.encoder_layers + config.decoder_layers * (1 if config.decoder_cross_attention == "deformable" else 2)
    assert config._attn_implementation == "sdpa"  # transformers' default for a model that supports it
    calls = attention_calls(monkeypatch)
    with torch.no_grad():
        sdpa_logits = model(**inputs).logits
    assert calls == {"sdpa": num_attentions, "eager": 0}

    model.save_pretrained(tmp_path)
    eager_model = hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager_model.config._attn_implementation == "eager"
    assert all(m.config._attn_implementation == "eager" for m in eager_model.modules() if isinstance(m, hf_detr.layers.HfDetrAttention))
    calls.update(sdpa=0, eager=0)
    with torch.no_grad():
        eager_logits = eager_model(**inputs).logits
    assert calls == {"sdpa": 0, "eager": num_attentions}
    torch.testing.assert_close(eager_logits, sdpa_logits, rtol=1e-4, atol=1e-5)

    # asked for by name (transformers' DETR refuses attn_implementation="sdpa": its ResNet backbone has no SDPA;
    # hf_detr's backbone keeps its own setting)
    sdpa_model = hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert sdpa_model.config._attn_implementation == "sdpa"
    calls.update(sdpa=0, eager=0)
    with torch.no_grad():
        torch.testing.assert_close(sdpa_model(**inputs).logits, sdpa_logits, rtol=0, atol=0)
    assert calls == {"sdpa": num_attentions, "eager": 0}

    # switched at run time
    eager_model.set_attn_implementation("sdpa")
    assert eager_model.config._attn_implementation == "sdpa"
    calls.update(sdpa=0, eager=0)
    with torch.no_grad():
        eager_model(**inputs)
    assert calls == {"sdpa": num_attentions, "eager": 0}

    # the probabilities come from the eager path, whatever the config says
    calls.update(sdpa=0, eager=0)
    with torch.no_grad():
        with_attentions = model(**inputs, output_attentions=True)
    assert calls == {"sdpa": 0, "eager": num_attentions} and len(with_attentions.cross_attentions) == config.decoder_layers
    torch.testing.assert_close(with_attentions.logits, sdpa_logits, rtol=1e-4, atol=1e-5)


def loss_and_gradients(model, inputs, labels):
    model.zero_grad()
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("query_type", sorted(hf_detr.QUERY_BUILDERS))
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(query_type, inputs, generator):
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(tiny_config(query_type=query_type, freeze_backbone_stages=0)).train()
    labels = random_labels([3, 1], model.config.num_labels, generator)
    loss, gradients = loss_and_gradients(model, inputs, labels)

    layer_calls = []  # the FFN of each layer, inside the checkpointed forward
    for layer in (*model.model.encoder.layers, *model.model.decoder.layers):
        layer.mlp.register_forward_pre_hook(lambda module, args: layer_calls.append(module))
    assert model.supports_gradient_checkpointing
    with pytest.warns(FutureWarning):  # transformers' older name, deprecated for activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    assert model.is_activation_checkpointing
    model.activation_checkpointing_disable()
    model.activation_checkpointing_enable()
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(model, inputs, labels)
    # every layer ran twice: once in the forward, once more in the backward (recomputed, not stored)
    num_layers = model.config.encoder_layers + model.config.decoder_layers
    assert len(layer_calls) == 2 * num_layers and len(set(map(id, layer_calls))) == num_layers

    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-6, atol=1e-7)
    assert checkpointed_gradients.keys() == gradients.keys() and len(gradients) > 50
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, rtol=1e-5, atol=1e-7, msg=name)

    model.activation_checkpointing_disable()
    layer_calls.clear()
    loss_and_gradients(model, inputs, labels)
    assert len(layer_calls) == num_layers


def test_reentrant_gradient_checkpointing_of_a_multi_scale_two_stage_model(inputs, generator):
    """Reentrant checkpointing passes gradients through a layer's tensor arguments only: the decoder layers get
    the memory's features and positions as tensors (not only inside the EncoderMemory), or their gradients
    would be lost or computed twice."""
    from conftest import tiny_backbone_config

    torch.manual_seed(0)
    config = tiny_config(
        query_type="deformable", encoder_attention="deformable", with_box_refine=True, two_stage=True, class_loss="focal",
        num_feature_levels=4, backbone_config=tiny_backbone_config(out_features=["stage2", "stage3", "stage4"]), freeze_backbone_stages=0,
    )  # fmt: skip
    model = hf_detr.HfDetrForObjectDetection(config).train()
    labels = random_labels([3, 1], model.config.num_labels, generator)
    loss, gradients = loss_and_gradients(model, inputs, labels)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(model, inputs, labels)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-6, atol=1e-7)
    assert checkpointed_gradients.keys() == gradients.keys() and "model.feature_levels.level_embed" in gradients
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
