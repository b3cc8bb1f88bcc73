"""Decoder query builders: what the decoder starts from, and what each of its layers is given. The
extension point for query variants (`QUERY_BUILDERS`, `HfDetrConfig.query_type`).

A builder is a `QueryBuilder`. The model calls it three ways:

- `builder(batch_size, memory, proposals, targets)` -> `DecoderQueries`: the decoder's start. Content
  queries [B, T, D] (the first layer's input hidden states), optional learned query positions
  [B, T, D], optional reference points or boxes [B, T, 2 | 4] (sigmoid space, cxcywh), an optional
  self-attention mask [T, T], and the layout of the T queries: denoising queries first (training with
  targets), then `num_groups` groups of `num_queries` (all groups in training, group 0 alone otherwise).
  `memory` is the encoder's `EncoderMemory`, `proposals` the two-stage `Proposals` (or None), `targets`
  the batch's `Targets` in training (or None).
- `builder.layer_positions(layer, hidden_states, queries, reference)` before each decoder layer ->
  (query position [B, T, D], spatial query [B, T, D] or None). The decoder's layers add the query
  position to queries and self-attention keys; builders made with `spatial_query` (for Conditional
  DETR's cross-attention, config.decoder_cross_attention "spatial") also give a spatial query, which that
  cross-attention concatenates to the content query per head. The builder never picks the attention.
- `builder.refine(layer, hidden_states, reference, box_head)` after each layer, with that layer's box
  head -> (the reference for the next layer, the reference the next layer's boxes are predicted relative to).

A builder owns its parameters' initialisation through the modules it is made of (the model's
`_init_weights` calls each module's own `reset_parameters`). A new variant is a subclass here, one entry
in `QUERY_BUILDERS`, and one value of `HfDetrConfig.query_type`; `from_config` is its adapter from the
config to explicit arguments.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from .box_ops import inverse_sigmoid
from .layers import MLP
from .targets import Targets


@dataclass
class DenoisingPairs:
    """Which denoising query reconstructs which target (DN-DETR): flat indices [M] of one layer's
    [B, T] queries, one entry per (denoising group, target). With contrastive denoising (DINO), the
    negatives too: queries [M] of the same images, each to learn "no object"."""

    image_idx: torch.Tensor
    query_idx: torch.Tensor
    target_idx: torch.Tensor
    num_groups: int  # denoising groups; each holds one noised copy (two: contrastive) of every target of the batch
    negative_image_idx: torch.Tensor | None = None
    negative_query_idx: torch.Tensor | None = None


@dataclass
class DecoderQueries:
    """The decoder's start. T = num_denoising + num_groups * num_queries."""

    content: torch.Tensor  # [B, T, D] the first decoder layer's input
    position: torch.Tensor | None = None  # [B, T, D] learned query positions, or None if derived per layer
    reference: torch.Tensor | None = None  # [B, T, 2 | 4] reference points / boxes, sigmoid space, cxcywh
    self_attention_mask: torch.Tensor | None = None  # [T, T] bool, True where a query may attend to a query
    num_queries: int = 0  # queries per group
    num_groups: int = 1
    num_denoising: int = 0
    denoising: DenoisingPairs | None = None

    @property
    def prediction_slice(self) -> slice:
        """The queries the model predicts with: group 0, after any denoising queries."""
        return slice(self.num_denoising, self.num_denoising + self.num_queries)

    @property
    def matching_slice(self) -> slice:
        """The queries matched to the targets: every group, after any denoising queries."""
        return slice(self.num_denoising, None)

    @property
    def denoising_slice(self) -> slice:
        return slice(0, self.num_denoising)


def box_sine_embedding(coords: torch.Tensor, num_features: int, temperature: int = 10000) -> torch.Tensor:
    """Sine embedding of normalised coordinates, as DETR embeds feature-map positions.

    coords [..., n] in 0..1 (cx, cy or cx, cy, w, h) -> [..., n * num_features]: every coordinate c as
    interleaved sin/cos of c * 2pi / temperature^(2 floor(i / 2) / num_features), in the order
    (y, x[, w, h]), the order of the feature map's own embedding (y first)."""
    dim_t = torch.arange(num_features, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_features)
    angles = coords[..., None].float() * (2 * math.pi) / dim_t  # [..., n, F]
    embedding = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
    if coords.shape[-1] >= 2:
        embedding = torch.cat((embedding[..., 1:2, :], embedding[..., 0:1, :], embedding[..., 2:, :]), dim=-2)
    return embedding.flatten(-2).to(coords.dtype)


def group_attention_mask(
    num_groups: int, num_queries: int, num_denoising_groups: int = 0, denoising_group_size: int = 0, device=None
) -> torch.Tensor | None:
    """[T, T] bool self-attention mask (True = may attend) for T = num_denoising_groups *
    denoising_group_size + num_groups * num_queries queries, denoising queries first.

    Each group of matching queries attends only within itself (Group DETR); each denoising group
    attends within itself and to matching group 0, and no matching query attends to a denoising one
    (DN-DETR: what the matching queries see must not carry the ground truth). None when that is everything."""
    if num_groups == 1 and num_denoising_groups == 0:
        return None
    group = torch.cat((
        torch.arange(num_denoising_groups, device=device).repeat_interleave(denoising_group_size),
        torch.arange(num_groups, device=device).repeat_interleave(num_queries) + num_denoising_groups,
    ))  # fmt: skip
    mask = group[:, None] == group[None, :]
    num_denoising = num_denoising_groups * denoising_group_size
    mask[:num_denoising, num_denoising : num_denoising + num_queries] = True  # denoising -> matching group 0
    return mask


class QueryBuilder(nn.Module):
    """Base of the builders: the group layout and the default per-layer behaviour (a fixed position,
    no spatial query, no refinement)."""

    reference_size = 0  # coordinates of the reference (0: none, 2: points, 4: boxes)

    def __init__(self, num_queries: int, num_groups: int = 1):
        super().__init__()
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.num_queries, self.num_groups = num_queries, num_groups
        self.spatial_query = False  # whether layer_positions gives a spatial query

    @classmethod
    def from_config(cls, config) -> "QueryBuilder":
        return cls(num_queries=config.num_queries, d_model=config.d_model, num_groups=config.num_query_groups)

    def reset_parameters(self) -> None:
        """A builder's own init, after its modules' default one (none by default)."""

    def groups_in_pass(self) -> int:
        """All groups while training (Group DETR's one-to-many supervision), group 0 alone otherwise."""
        return self.num_groups if self.training else 1

    def forward(self, batch_size: int, memory=None, proposals=None, targets: Targets | None = None) -> DecoderQueries:
        raise NotImplementedError

    def layer_positions(self, layer: int, hidden_states, queries: DecoderQueries, reference):
        """-> (query position [B, T, D], spatial query [B, T, D] or None) for decoder layer `layer`."""
        return queries.position, None

    def refine(self, layer: int, hidden_states, reference, box_head):
        """-> (reference for the next layer, reference its boxes are predicted relative to)."""
        return reference, reference


class DetrQueries(QueryBuilder):
    """Vanilla DETR (Carion et al., 2020, sec. 3.2): the content queries start as zeros, so everything
    that tells one detection slot from another is its learned position embedding ("object query"),
    `nn.Embedding(num_queries, d_model)`, which the decoder adds again at every layer. With groups,
    `num_groups * num_queries` rows, group g's slots at rows g * num_queries ... ."""

    def __init__(self, num_queries: int, d_model: int, num_groups: int = 1):
        super().__init__(num_queries, num_groups)
        self.position_embeddings = nn.Embedding(num_groups * num_queries, d_model)

    def forward(self, batch_size: int, memory=None, proposals=None, targets=None) -> DecoderQueries:
        groups = self.groups_in_pass()
        weight = self.position_embeddings.weight
        position = weight[: groups * self.num_queries].unsqueeze(0).expand(batch_size, -1, -1)
        return DecoderQueries(
            content=torch.zeros_like(position),
            position=position,
            self_attention_mask=group_attention_mask(groups, self.num_queries, device=weight.device),
            num_queries=self.num_queries,
            num_groups=groups,
        )


class ConditionalQueries(DetrQueries):
    """Conditional DETR (Meng et al., 2021): DETR's zero content queries and learned positions, plus a
    2-D reference point per query, sigmoid(MLP(position)). With `spatial_query` (Conditional DETR's own
    cross-attention), a spatial query: the sine embedding of that point scaled element-wise by an MLP of the
    layer's input (identity at the first layer), which each head concatenates to its content query; boxes
    are predicted relative to the point (centre offsets in inverse-sigmoid space). Reference points are not
    refined."""

    reference_size = 2

    def __init__(self, num_queries: int, d_model: int, num_groups: int = 1, spatial_query: bool = True):
        super().__init__(num_queries, d_model, num_groups)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)
        self.spatial_query = spatial_query
        self.query_scale = MLP(d_model, d_model, d_model, 2) if spatial_query else None

    @classmethod
    def from_config(cls, config) -> "ConditionalQueries":
        spatial = config.decoder_cross_attention == "spatial"
        return cls(config.num_queries, config.d_model, config.num_query_groups, spatial_query=spatial)

    def forward(self, batch_size: int, memory=None, proposals=None, targets=None) -> DecoderQueries:
        queries = super().forward(batch_size)
        queries.reference = self.ref_point_head(queries.position).sigmoid()
        return queries

    def layer_positions(self, layer, hidden_states, queries, reference):
        if not self.spatial_query:
            return queries.position, None
        spatial = box_sine_embedding(reference, hidden_states.shape[-1] // 2)
        if layer > 0:
            spatial = spatial * self.query_scale(hidden_states)
        return queries.position, spatial


class AnchorQueries(QueryBuilder):
    """DAB-DETR (Liu et al., 2022): each query is a learned 4-D anchor box (cx, cy, w, h; stored in
    inverse-sigmoid space), zero content. Before every layer the anchor's sine embedding goes through an
    MLP to become the query position. With `spatial_query` (DAB-DETR's own cross-attention), the spatial
    query is the embedding of the anchor's centre scaled by an MLP of the layer's input, its x and y parts
    modulated by the ratio of a predicted width / height to the anchor's (width/height-modulated
    cross-attention). After every layer the layer's box head refines the anchor:
    sigmoid(box_head_delta + inverse_sigmoid(anchor)), detached for the next layer.

    look_forward_twice (DINO, Zhang et al., 2022): each layer's boxes are predicted relative to the
    previous layer's refined anchors before the detach, so a layer's box loss also trains the layer before.

    Denoising (DN-DETR, Li et al., 2022), in training with targets and `denoising`: noised copies of the
    ground truth go in as extra queries in front (see `Denoising`).

    two_stage (DINO's mixed query selection, Zhang et al., 2022): the anchors are the encoder's top-scoring
    proposal boxes, detached, instead of learned ones, while the content queries are learned and the same for
    every image (static): positions from the image, content from training."""

    reference_size = 4

    def __init__(
        self, num_queries: int, d_model: int, num_groups: int = 1, look_forward_twice: bool = False, denoising=None,
        spatial_query: bool = True, two_stage: bool = False,
    ):  # fmt: skip
        super().__init__(num_queries, num_groups)
        self.two_stage = two_stage
        if two_stage:
            self.content_embeddings = nn.Embedding(num_queries, d_model)
        else:
            self.anchor_embeddings = nn.Embedding(num_groups * num_queries, 4)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.spatial_query = spatial_query
        self.query_scale = MLP(d_model, d_model, d_model, 2) if spatial_query else None
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2) if spatial_query else None
        self.d_model, self.look_forward_twice, self.denoising = d_model, look_forward_twice, denoising

    @classmethod
    def from_config(cls, config) -> "AnchorQueries":
        denoising = None
        if config.num_denoising_queries:
            denoising = Denoising(
                config.num_labels, config.d_model, config.num_denoising_queries, label_noise=config.denoising_label_noise,
                box_noise=config.denoising_box_noise, contrastive=config.denoising_contrastive,
            )  # fmt: skip
        return cls(
            config.num_queries, config.d_model, config.num_query_groups, config.look_forward_twice, denoising,
            spatial_query=config.decoder_cross_attention == "spatial", two_stage=config.two_stage,
        )  # fmt: skip

    def forward(self, batch_size: int, memory=None, proposals=None, targets: Targets | None = None) -> DecoderQueries:
        groups = self.groups_in_pass()
        if self.two_stage:
            if proposals is None:
                raise ValueError("two-stage (mixed query selection) anchors come from the encoder's proposals; none were given")
            reference = proposals.selected_boxes  # [B, Q, 4], detached
            content = self.content_embeddings.weight.unsqueeze(0).expand(batch_size, -1, -1)
        else:
            reference = self.anchor_embeddings.weight[: groups * self.num_queries].sigmoid().unsqueeze(0).expand(batch_size, -1, -1)
            content = reference.new_zeros(batch_size, reference.shape[1], self.d_model)
        pairs = None
        if self.denoising is not None and self.training and targets is not None:
            dn_content, dn_anchors, pairs = self.denoising(targets, reference.device)
            content, reference = torch.cat((dn_content, content), 1), torch.cat((dn_anchors.sigmoid(), reference), 1)
        num_denoising = content.shape[1] - groups * self.num_queries
        num_denoising_groups = pairs.num_groups if pairs is not None else 0
        group_size = num_denoising // num_denoising_groups if num_denoising_groups else 0
        return DecoderQueries(
            content=content,
            reference=reference,
            self_attention_mask=group_attention_mask(groups, self.num_queries, num_denoising_groups, group_size, reference.device),
            num_queries=self.num_queries,
            num_groups=groups,
            num_denoising=num_denoising,
            denoising=pairs if num_denoising_groups else None,
        )

    def layer_positions(self, layer, hidden_states, queries, reference):
        d_model = hidden_states.shape[-1]
        embedding = box_sine_embedding(reference, d_model // 2)  # [B, T, 2D]: y, x, w, h
        position = self.ref_point_head(embedding)
        if not self.spatial_query:
            return position, None
        spatial = embedding[..., :d_model]  # y, x
        if layer > 0:
            spatial = spatial * self.query_scale(hidden_states)
        size = self.ref_anchor_head(hidden_states).sigmoid()  # [B, T, 2]: predicted (w, h)
        height_scale = (size[..., 1] / reference[..., 3]).unsqueeze(-1).expand(*spatial.shape[:-1], d_model // 2)
        width_scale = (size[..., 0] / reference[..., 2]).unsqueeze(-1).expand(*spatial.shape[:-1], d_model // 2)
        return position, spatial * torch.cat((height_scale, width_scale), -1)

    def refine(self, layer, hidden_states, reference, box_head):
        refined = box_head(hidden_states, reference)
        return refined.detach(), (refined if self.look_forward_twice else refined.detach())


class DeformableQueries(QueryBuilder):
    """Deformable DETR (Zhu et al., 2021): learned content queries next to learned positions (the paper's
    object query of 2 x d_model, split in two), and a 2-D reference point per query, sigmoid(Linear(position)),
    around which the deformable cross-attention samples. With `refine_boxes` (with_box_refine), each layer's
    box head refines the reference into a box for the next layer (detached), as DAB-DETR refines anchors.

    Two-stage (with the encoder's `proposals`): the top-scoring proposal boxes are the references, and their
    sine embedding, projected and normed, gives both the positions and the content queries."""

    def __init__(self, num_queries: int, d_model: int, num_groups: int = 1, refine_boxes: bool = False, two_stage: bool = False):
        super().__init__(num_queries, num_groups)
        self.refine_boxes, self.two_stage = refine_boxes, two_stage
        # the heads' first boxes around a reference point start with sides sigmoid(-2) = 0.12 (Deformable DETR's init)
        self.box_size_logit = 0.0 if two_stage else -2.0
        if two_stage:
            self.reference_size = 4
            self.proposal_projection = nn.Linear(2 * d_model, 2 * d_model)
            self.proposal_norm = nn.LayerNorm(2 * d_model)
        else:
            self.reference_size = 2
            self.position_embeddings = nn.Embedding(num_groups * num_queries, d_model)
            self.content_embeddings = nn.Embedding(num_groups * num_queries, d_model)
            self.reference_points = nn.Linear(d_model, 2)

    @classmethod
    def from_config(cls, config) -> "DeformableQueries":
        return cls(config.num_queries, config.d_model, config.num_query_groups, config.with_box_refine, config.two_stage)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's init of the reference-point layer (xavier-uniform, zero bias)."""
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)

    def forward(self, batch_size: int, memory=None, proposals=None, targets=None) -> DecoderQueries:
        if self.two_stage:
            if proposals is None:
                raise ValueError("two-stage queries are built from the encoder's proposals; none were given")
            reference = proposals.selected_boxes  # [B, Q, 4], detached
            embedding = box_sine_embedding(reference, self.proposal_norm.normalized_shape[0] // 4)  # [B, Q, 2 * D]
            position, content = self.proposal_norm(self.proposal_projection(embedding)).chunk(2, -1)
            return DecoderQueries(content=content, position=position, reference=reference, num_queries=reference.shape[1])
        groups = self.groups_in_pass()
        rows = groups * self.num_queries
        position = self.position_embeddings.weight[:rows].unsqueeze(0).expand(batch_size, -1, -1)
        content = self.content_embeddings.weight[:rows].unsqueeze(0).expand(batch_size, -1, -1)
        return DecoderQueries(
            content=content,
            position=position,
            reference=self.reference_points(position).sigmoid(),
            self_attention_mask=group_attention_mask(groups, self.num_queries, device=position.device),
            num_queries=self.num_queries,
            num_groups=groups,
        )

    def refine(self, layer, hidden_states, reference, box_head):
        if not self.refine_boxes:
            return reference, reference
        refined = box_head(hidden_states, reference).detach()
        return refined, refined


class Denoising(nn.Module):
    """DN-DETR's denoising queries (Li et al., 2022), for builders with anchor boxes, and DINO's contrastive ones.

    In training, every target of the batch is copied into `num_groups = max(1, num_queries // group_size)`
    groups (a group is `max_targets` queries per image, twice that with `contrastive`; images with fewer
    targets pad their group with unsupervised queries). Each copy's label is replaced by a random class with
    probability `label_noise` and embedded (`label_embeddings`) as its content query; its box is noised
    (centre moved by up to box_noise * size / 2, each side scaled by a factor in [1 - box_noise, 1 +
    box_noise]) and becomes its anchor. The loss asks each copy to reconstruct its target, without
    matching; the attention mask keeps the matching queries from seeing any of it.

    contrastive (DINO, Zhang et al., 2022): each group also holds a negative copy of every target, noised by
    between 1 and 2 x those amounts (centre and sides, in a random direction), which the loss asks for "no
    object": the decoder learns to reject an anchor near an object but not on it."""

    def __init__(
        self, num_labels: int, d_model: int, num_queries: int, label_noise: float = 0.2, box_noise: float = 0.4, contrastive: bool = False
    ):  # fmt: skip
        super().__init__()
        self.label_embeddings = nn.Embedding(num_labels, d_model)
        self.num_labels, self.num_queries = num_labels, num_queries
        self.label_noise, self.box_noise, self.contrastive = label_noise, box_noise, contrastive

    def forward(self, targets: Targets, device) -> tuple:
        """-> (content [B, N, D], anchors [B, N, 4] inverse-sigmoid, DenoisingPairs). A batch without targets makes
        N = 0 queries, cut from the label embeddings all the same: their gradient is then zero rather than none, so
        that every process of a distributed run (DDP) computes a gradient for the same parameters."""
        sizes = targets.sizes
        max_targets = max(sizes, default=0)
        if max_targets == 0:
            content = self.label_embeddings.weight[:0].unsqueeze(0).expand(targets.batch_size, -1, -1)
            empty = torch.empty(0, dtype=torch.long)
            return content, content.new_zeros(targets.batch_size, 0, 4), DenoisingPairs(empty, empty, empty, num_groups=0)
        copies = 2 if self.contrastive else 1  # positive (and negative) copies of each target per group
        group_size = copies * max_targets
        num_groups = max(1, self.num_queries // group_size)
        batch, count = targets.batch_size, copies * num_groups
        classes = targets.class_labels.to(device).repeat(count)  # [copies * G * N]: positives of every group, then negatives
        boxes = targets.boxes.to(device, torch.float32).repeat(count, 1)
        flip = torch.rand(classes.shape, device=device) < self.label_noise
        classes = torch.where(flip, torch.randint_like(classes, self.num_labels), classes)
        spread = torch.cat((boxes[:, 2:] / 2, boxes[:, 2:]), -1) * self.box_noise
        noise = torch.rand_like(boxes) * 2 - 1  # positives: up to 1 x the spread
        if self.contrastive:  # negatives: between 1 and 2 x, in a random direction
            negative = torch.arange(boxes.shape[0], device=device) >= boxes.shape[0] // 2
            far = (torch.rand_like(boxes) + 1) * (torch.randint_like(boxes, 2) * 2 - 1)
            noise = torch.where(negative[:, None], far, noise)
        boxes = (boxes + noise * spread).clamp(0.0, 1.0)
        # where each copy goes: image b, query g * group_size + c * max_targets + j for its j-th target, copy c of group g
        image_idx = targets.image_index.repeat(count)
        target_idx = torch.cat([torch.arange(n) for n in sizes]).repeat(count)
        group_idx = torch.arange(num_groups).repeat(copies).repeat_interleave(sum(sizes))
        copy_idx = torch.arange(copies).repeat_interleave(num_groups * sum(sizes))
        query_idx = group_idx * group_size + copy_idx * max_targets + target_idx
        d_model = self.label_embeddings.embedding_dim
        content = self.label_embeddings.weight.new_zeros(batch, num_groups * group_size, d_model)
        anchors = torch.zeros(batch, num_groups * group_size, 4, device=device, dtype=content.dtype)  # padding: centred boxes
        where = (image_idx.to(device), query_idx.to(device))
        content = content.index_put(where, self.label_embeddings(classes))
        anchors = anchors.index_put(where, inverse_sigmoid(boxes).to(content.dtype))
        positive = copy_idx == 0
        pairs = DenoisingPairs(image_idx[positive], query_idx[positive], target_idx[positive], num_groups)
        if self.contrastive:
            pairs.negative_image_idx, pairs.negative_query_idx = image_idx[~positive], query_idx[~positive]
        return content, anchors, pairs


QUERY_BUILDERS = {"detr": DetrQueries, "conditional": ConditionalQueries, "anchor": AnchorQueries, "deformable": DeformableQueries}
