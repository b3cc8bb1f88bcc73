"""hf_detr.deformable: the sampling op and the layer against transformers' Deformable DETR (same weights,
same inputs, outputs and gradients), its sampling semantics, its initialisation, and export."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_detr import deformable
from hf_detr.deformable import MultiScaleDeformableAttention, multi_scale_deformable_attention

SPATIAL_SHAPES = torch.tensor([[5, 7], [3, 4], [1, 3]])  # odd sizes, a one-row level


def assert_close(actual, expected, tol=1e-5):
    """Largest difference within tol, relative to the larger of 1 and the expected tensor's largest entry."""
    scale = max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max().item() <= tol * scale, (actual - expected).abs().max().item()


def transformers_op(value, spatial_shapes, sampling_locations, attention_weights):
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention as Reference

    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    shapes_list = [tuple(shape) for shape in spatial_shapes.tolist()]
    return Reference()(value, spatial_shapes, shapes_list, areas.cumsum(0) - areas, sampling_locations, attention_weights, 64)


def random_op_inputs(batch=2, queries=6, heads=3, head_dim=4, points=2, dtype=torch.float32, seed=0):
    """value, locations (a fifth of them off the map) and attention weights, all requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    length = int((SPATIAL_SHAPES[:, 0] * SPATIAL_SHAPES[:, 1]).sum())
    levels = len(SPATIAL_SHAPES)
    value = torch.randn(batch, length, heads, head_dim, generator=generator, dtype=dtype)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=dtype)
    return [t.requires_grad_() for t in (value, locations, weights)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_matches_transformers_forward_and_gradients(dtype):
    inputs = random_op_inputs(dtype=dtype)
    expected = transformers_op(inputs[0], SPATIAL_SHAPES, *inputs[1:])
    actual = multi_scale_deformable_attention(inputs[0], SPATIAL_SHAPES, *inputs[1:])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert actual.shape == expected.shape == (2, 6, 3 * 4)
    assert_close(actual, expected, tol)
    grad = torch.randn_like(expected)
    for ours, theirs in zip(torch.autograd.grad(actual, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        assert_close(ours, theirs, tol)
    with torch.no_grad():  # the inference path (no autograd.Function)
        assert_close(multi_scale_deformable_attention(inputs[0], SPATIAL_SHAPES, *inputs[1:]), expected, tol)


def test_chunks_split_anywhere(monkeypatch):
    """Chunks of 3 (batch, query) rows cut through the batch boundary: same output and gradients as one chunk."""
    inputs = random_op_inputs(queries=5, seed=1)
    grad = torch.randn(2, 5, 12)
    whole = multi_scale_deformable_attention(inputs[0], SPATIAL_SHAPES, *inputs[1:])
    whole_grads = torch.autograd.grad(whole, inputs, grad)
    corners_per_row = 4 * 3 * len(SPATIAL_SHAPES) * 2
    monkeypatch.setattr(deformable, "CHUNK_CORNERS", 3 * corners_per_row)
    monkeypatch.setattr(deformable, "SCATTER_CORNERS", 2 * 4 * len(SPATIAL_SHAPES) * 2)  # 2 bags
    chunked = multi_scale_deformable_attention(inputs[0], SPATIAL_SHAPES, *inputs[1:])
    assert_close(chunked, whole, 1e-6)
    for ours, theirs in zip(torch.autograd.grad(chunked, inputs, grad), whole_grads):
        assert_close(ours, theirs, 1e-6)


def test_op_samples_pixel_centres_and_zero_outside():
    """Pixel i of a w-wide level is at (i + 0.5) / w; half a pixel off the map reads half the edge pixel; further off, 0."""
    shapes = torch.tensor([[2, 4], [1, 2]])
    value = torch.arange(10.0).view(1, 10, 1, 1)  # level 0: 0..7 (row-major), level 1: 8, 9
    points = torch.tensor([
        [[(2 + 0.5) / 4, (1 + 0.5) / 2], [(1 + 0.5) / 2, 0.5]],  # pixel (x 2, y 1) = 6, pixel (x 1, y 0) of level 1 = 9
        [[0.0, 0.25], [1.5, 0.5]],  # on the left edge of pixel (0, 0): half of 0, fully off level 1
        [[0.0, 0.75], [-0.5, 2.0]],  # on the left edge of pixel (0, 1) = 4: half of it
    ])  # fmt: skip
    locations = points.view(1, 3, 1, 2, 1, 2)
    weights = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]).view(1, 3, 1, 2, 1)
    output = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert output.flatten().tolist() == [6.0 + 9.0, 0.0, 2.0]


# ----------------------------------------------------------------------------------------- the layer


def reference_layer():
    from transformers import DeformableDetrConfig
    from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrMultiscaleDeformableAttention

    config = DeformableDetrConfig(d_model=32, encoder_attention_heads=4, num_feature_levels=3, encoder_n_points=2)
    return DeformableDetrMultiscaleDeformableAttention(config, num_heads=4, n_points=2)


def padded_memory(generator):
    """Two images on a padded canvas: the levels of SPATIAL_SHAPES, the second image real only in the
    top-left (h, w) below. -> memory [2, S, 32], value_mask [2, S], valid_ratios [2, L, 2] (w, h)."""
    real = [(5, 7), (3, 4), (1, 3)], [(3, 5), (2, 3), (1, 2)]
    length = int((SPATIAL_SHAPES[:, 0] * SPATIAL_SHAPES[:, 1]).sum())
    masks, ratios = [], []
    for sizes in real:
        level_masks = []
        for (height, width), (real_h, real_w) in zip(SPATIAL_SHAPES.tolist(), sizes):
            mask = torch.zeros(height, width, dtype=torch.bool)
            mask[:real_h, :real_w] = True
            level_masks.append(mask.flatten())
        masks.append(torch.cat(level_masks))
        ratios.append([[w / width, h / height] for (height, width), (h, w) in zip(SPATIAL_SHAPES.tolist(), sizes)])
    return torch.randn(2, length, 32, generator=generator), torch.stack(masks), torch.tensor(ratios)


def encoder_reference_points(valid_ratios):
    """Deformable DETR's encoder references: each position's pixel centre over its image's real region,
    then scaled by every level's valid ratio. -> [B, S, L, 2]."""
    points = []
    for level, (height, width) in enumerate(SPATIAL_SHAPES.tolist()):
        y, x = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
        x = x.flatten()[None] / (valid_ratios[:, None, level, 0] * width)
        y = y.flatten()[None] / (valid_ratios[:, None, level, 1] * height)
        points.append(torch.stack([x, y], -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


@pytest.mark.parametrize("references", ["2-D, encoder", "4-D, decoder", "2-D, no mask"])
def test_layer_matches_transformers(references):
    generator = torch.Generator().manual_seed(2)
    theirs = reference_layer()
    with torch.no_grad():  # off any initialisation, so that a mix-up of weights would show
        for parameter in theirs.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    ours = MultiScaleDeformableAttention(d_model=32, num_heads=4, num_levels=3, num_points=2)
    ours.load_state_dict(theirs.state_dict())

    memory, value_mask, valid_ratios = padded_memory(generator)
    if references.startswith("4-D"):
        boxes = torch.cat([torch.rand(2, 5, 2, generator=generator), torch.rand(2, 5, 2, generator=generator) * 0.5], -1)
        reference_points = boxes[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        query = torch.randn(2, 5, 32, generator=generator)
    else:
        reference_points = encoder_reference_points(valid_ratios)
        query = memory + torch.randn(memory.shape, generator=generator)  # "+ position embedding"
    if references.endswith("no mask"):
        value_mask = None
    query, memory, reference_points = (t.clone().requires_grad_() for t in (query, memory, reference_points))

    shapes_list = [tuple(shape) for shape in SPATIAL_SHAPES.tolist()]
    areas = SPATIAL_SHAPES[:, 0] * SPATIAL_SHAPES[:, 1]
    expected, expected_weights = theirs(
        hidden_states=query, attention_mask=value_mask, encoder_hidden_states=memory, reference_points=reference_points,
        spatial_shapes=SPATIAL_SHAPES, spatial_shapes_list=shapes_list, level_start_index=areas.cumsum(0) - areas,
    )  # fmt: skip
    actual, (locations, weights) = ours(query, reference_points, memory, value_mask, SPATIAL_SHAPES, output_sampling=True)
    assert actual.shape == expected.shape == query.shape
    assert_close(actual, expected)
    assert_close(weights, expected_weights)
    assert locations.shape == (*query.shape[:2], 4, 3, 2, 2)

    grad = torch.randn(expected.shape, generator=generator)
    inputs = [query, memory, reference_points]
    for ours_grad, theirs_grad in zip(torch.autograd.grad(actual, inputs + list(ours.parameters()), grad),
                                      torch.autograd.grad(expected, inputs + list(theirs.parameters()), grad)):  # fmt: skip
        assert_close(ours_grad, theirs_grad)


def test_sampling_is_returned_only_on_request():
    layer = MultiScaleDeformableAttention(d_model=8, num_heads=2, num_levels=3, num_points=2)
    memory = torch.randn(1, 35 + 12 + 3, 8)
    output, sampling = layer(memory[:, :4], torch.rand(1, 4, 3, 2), memory, None, SPATIAL_SHAPES)
    assert output.shape == (1, 4, 8) and sampling is None
    with pytest.raises(ValueError, match="end in 2"):
        layer(memory[:, :4], torch.rand(1, 4, 3, 3), memory, None, SPATIAL_SHAPES)


def test_reset_parameters_is_deformable_detrs_init():
    heads, levels, points = 8, 3, 4
    layer = MultiScaleDeformableAttention(d_model=16, num_heads=heads, num_levels=levels, num_points=points)
    query = torch.randn(2, 5, 16)  # any query: the offsets start independent of it
    memory = torch.randn(2, 35 + 12 + 3, 16)
    centres = torch.rand(2, 5, levels, 2)
    _, (locations, weights) = layer(query, centres, memory, None, SPATIAL_SHAPES, output_sampling=True)

    # 2-D references: point k of head h is k + 1 pixels (max-norm) from the reference, on every level,
    # in the direction at angle 2 pi h / H
    pixels = (locations - centres[:, :, None, :, None]) * SPATIAL_SHAPES.flip(-1)[:, None].float()
    steps = pixels / torch.arange(1, points + 1)[:, None]  # [B, Q, H, L, P, 2]
    assert_close(steps, steps[:1, :1, :, :1, :1].expand_as(steps), 1e-5)
    directions = steps[0, 0, :, 0, 0]  # [H, 2]
    assert_close(directions.abs().amax(-1), torch.ones(heads))
    angles = torch.atan2(directions[:, 1], directions[:, 0]) % (2 * math.pi)
    assert_close(angles, torch.arange(heads) * (2 * math.pi / heads), 1e-5)
    assert_close(weights, torch.full_like(weights, 1 / (levels * points)))  # uniform over levels and points

    # 4-D references: the last point reaches the box's edge
    boxes = torch.cat([centres, torch.full_like(centres, 0.2)], -1)
    _, (locations, _) = layer(query, boxes, memory, None, SPATIAL_SHAPES, output_sampling=True)
    reach = ((locations - centres[:, :, None, :, None]) / 0.1).abs().amax(-1)  # in half box sizes
    assert_close(reach, (torch.arange(1, points + 1) / points).expand_as(reach))

    for projection in (layer.value_proj, layer.output_proj):
        bound = math.sqrt(6 / (projection.in_features + projection.out_features))  # Xavier-uniform
        assert projection.weight.abs().max() <= bound and projection.weight.std() > bound / 3
        assert not projection.bias.any()


# ------------------------------------------------------------------------------------------- export


class TinyEncoderLayer(nn.Module):
    """The op inside a model as a real one uses it: two levels (strides 1 and 2) of an input feature
    map, their shapes and reference points built inside forward from the maps' (dynamic) sizes."""

    def __init__(self, channels=8):
        super().__init__()
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.attention = MultiScaleDeformableAttention(channels, num_heads=2, num_levels=2, num_points=2)

    def forward(self, features):  # [B, C, H, W]
        levels = [features, self.down(features)]
        spatial_shapes = torch.tensor([list(level.shape[-2:]) for level in levels], device=features.device)
        memory = torch.cat([level.flatten(2).transpose(1, 2) for level in levels], 1)
        centres = []
        for level in levels:
            height, width = level.shape[-2:]
            y, x = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij")
            centres.append(torch.stack([x.flatten(), y.flatten()], -1))
        reference_points = torch.cat(centres)[None, :, None].expand(memory.shape[0], -1, len(levels), -1)
        return self.attention(memory, reference_points, memory, None, spatial_shapes)[0]


@pytest.fixture(scope="module")
def exported():
    """(model, torch.export program with dynamic batch, height and width, an input of another size)."""
    torch.manual_seed(3)
    model = TinyEncoderLayer().eval()
    with torch.no_grad():  # spread the samples (the init would put them on a regular ring)
        model.attention.sampling_offsets.weight.normal_(0, 0.5)
        model.attention.attention_weights.weight.normal_(0, 0.5)
    dims = [torch.export.Dim(name, min=4, max=64) for name in ("height", "width")]  # min 4: a stride-2 level of 2+ rows
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=8), 2: dims[0], 3: dims[1]},)
    program = torch.export.export(model, (torch.randn(2, 8, 9, 11),), dynamic_shapes=dynamic_shapes, strict=False)
    return model, program, torch.randn(3, 8, 6, 14)


def test_torch_export_keeps_batch_height_and_width_dynamic(exported):
    model, program, other = exported
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("embedding_bag" in target for target in targets), targets  # the export path: Gather + MatMul
    with torch.no_grad():
        assert_close(program.module()(other), model(other))


def test_onnx_export_runs_in_onnxruntime_at_another_size(exported):
    import onnxruntime

    model, program, other = exported
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    ops = {(node.domain, node.op_type) for node in onnx_program.model_proto.graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops  # no custom op
    assert ("", "Loop") not in ops, ops
    session = onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        expected = model(other)
    assert output.shape == (3, 6 * 14 + 3 * 7, 8)
    assert_close(torch.from_numpy(output), expected, 1e-4)
