"""See inside a DETR: every decoder layer's predictions, the Hungarian matching with its cost terms, and
the attention, for one image (`explain`) or over a split (`query_statistics`).

Everything comes from the model itself: its decoder's per-layer hidden states through its own heads
(`model.model.heads`, what its loss uses), its attention (`output_attentions`: probabilities of dense
attention, sampling points and weights of deformable attention), and its loss's own matcher. Training
side: never imported by the model surface.

    explanation = hf_detr.explain(model, "photo.jpg", image_processor=processor)
    explanation.scores[-1]          # [Q, K] the final layer's class probabilities
    explanation.cross_attention     # [L, heads, Q, h, w] where each query looked, per decoder layer
    explanation.sampling_locations  # deformable cross-attention: [L, Q, heads, levels, points, 2] per layer
    hf_detr.visualize.write_report(explanation, "out/")   # the HTML page and its PNGs
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .box_ops import cxcywh_to_xyxy
from .image_processing import image_processor_for
from .images import decode_image, displayed_size


@dataclass
class Explanation:
    """One image through a DETR. L decoder layers, Q queries (group 0: those the model predicts with),
    K classes, a feature map of h x w cells; boxes are cxcywh normalised to the image (0..1).

    image: the image (PIL, RGB, EXIF-applied). names: class label -> name.
    scores [L, Q, K]: each layer's class probabilities ("no object" left out for the softmax loss).
    boxes [L, Q, 4]; references [L, Q, 2 | 4] or None: what each layer's boxes are predicted relative to.
    level_shapes: (h_l, w_l) of each feature level, the finest first (one level in DETR: h x w).
    feature_mask [h, w]: True on cells of the image, False on padding (of the finest level).
    cross_attention [L, heads, Q, h, w]: each query's attention over the image, per decoder layer, on the
        finest level's grid: the attention weight of every cell of every level (dense attention's
        probabilities; deformable attention's weights at the cells its sampling points fall in), a coarser
        cell's weight shared equally by the finest cells it covers. It sums to 1 per query for dense
        attention, to the weight of the points inside the maps for deformable attention.
    sampling_locations [L, Q, heads, levels, points, 2], sampling_weights [L, Q, heads, levels, points]:
        deformable cross-attention only (else None): where each query samples on every level ((x, y) in 0..1
        of the level's padded map, which the image's real part spans to valid_ratios) and how much each
        sample weighs; valid_ratios [levels, 2] (width, height).
    encoder_points [P, 2]: (x, y) pixels of the encoder attention maps; encoder_attention [E, heads, P, h, w].
    labels: the ground truth given ({"class_labels" [N], "boxes" [N, 4]}), or None. With it:
    matches: per layer (query_idx [M], target_idx [M]), the model's matcher's assignment;
    match_costs: per layer {"class", "l1", "giou", "total"} [M], each pair's cost terms (`pair_costs`).
    training_queries: with `training_queries=True`, the whole training layout of the decoder (every
    query group, and with labels the denoising queries first): all_scores [L, T, K], all_boxes [L, T, 4],
    num_groups, num_denoising; otherwise T = Q and those repeat scores and boxes."""

    image: Any
    names: dict[int, str]
    threshold: float
    scores: torch.Tensor
    boxes: torch.Tensor
    references: torch.Tensor | None
    feature_mask: torch.Tensor
    cross_attention: torch.Tensor
    encoder_points: torch.Tensor
    encoder_attention: torch.Tensor
    all_scores: torch.Tensor
    all_boxes: torch.Tensor
    level_shapes: list[tuple[int, int]] | None = None
    sampling_locations: torch.Tensor | None = None
    sampling_weights: torch.Tensor | None = None
    valid_ratios: torch.Tensor | None = None
    num_groups: int = 1
    num_denoising: int = 0
    labels: dict | None = None
    matches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    match_costs: list[dict[str, torch.Tensor]] | None = None

    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    def detections(self, layer: int = -1) -> torch.Tensor:
        """Query indices whose best class score reaches the threshold in `layer`, best first."""
        best = self.scores[layer].max(-1).values
        keep = (best >= self.threshold).nonzero().flatten()
        return keep[best[keep].argsort(descending=True)]

    def boxes_in_pixels(self, boxes: torch.Tensor) -> torch.Tensor:
        """[..., 4] cxcywh normalised -> [..., 4] xyxy in the image's pixels."""
        width, height = self.image.size
        return cxcywh_to_xyxy(boxes) * torch.tensor([width, height, width, height], dtype=boxes.dtype)

    def assignment(self, layer: int) -> dict[int, int]:
        """query -> target of the matcher in `layer` (with labels)."""
        query_idx, target_idx = self.matches[layer]
        return dict(zip(query_idx.tolist(), target_idx.tolist()))

    def changed_assignments(self) -> list[list[int]]:
        """Per layer after the first: the queries whose matched target differs from the layer before
        (matched then, or now, or to another target)."""
        changed = []
        for layer in range(1, self.num_layers):
            before, now = self.assignment(layer - 1), self.assignment(layer)
            changed.append(sorted(q for q in set(before) | set(now) if before.get(q) != now.get(q)))
        return changed


def _inputs(image, image_processor) -> tuple[Any, dict[str, torch.Tensor]]:
    """An image (path, PIL) -> (the RGB image, {"pixel_values", "pixel_mask"}); or pre-made inputs
    {"image": PIL, "pixel_values": [1, 3, H, W], "pixel_mask": [1, H, W]} (e.g. a padded batch of one)."""
    if isinstance(image, Mapping) and "pixel_values" in image:
        return image["image"], {"pixel_values": image["pixel_values"], "pixel_mask": image.get("pixel_mask")}
    image = decode_image(image)
    encoded = image_processor(images=[image], return_tensors="pt")
    return image, {"pixel_values": encoded["pixel_values"], "pixel_mask": encoded.get("pixel_mask")}


def _attention_on_finest_grid(attention, rows, level_shapes: list[tuple[int, int]]) -> torch.Tensor:
    """One layer's attention of image 0 -> [heads, T', h0, w0] on the finest level's grid, for the queries `rows`.

    attention: dense probabilities [1, heads, T, S], or deformable (sampling_locations [1, T, heads, levels,
    points, 2], weights [1, T, heads, levels, points]), whose weights go to the cells their points fall in
    (points outside a map read nothing and count for nothing). A coarser level's cell's weight is shared
    equally by the finest cells nearest to it, so the total weight stays what it was."""
    if isinstance(attention, tuple):
        locations, weights = attention[0][0, rows], attention[1][0, rows]  # [T', heads, levels, points, 2], [..]
        per_level = []
        for level, (h, w) in enumerate(level_shapes):
            x, y = locations[..., level, :, 0], locations[..., level, :, 1]
            inside = (x >= 0) & (x < 1) & (y >= 0) & (y < 1)
            cell = (y * h).long().clamp(0, h - 1) * w + (x * w).long().clamp(0, w - 1)  # [T', heads, points]
            grid = torch.zeros(*cell.shape[:-1], h * w).scatter_add_(-1, cell, weights[..., level, :] * inside)
            per_level.append(grid)
        flat = torch.cat(per_level, -1).transpose(0, 1)  # [heads, T', S]
    else:
        flat = attention[0][:, rows]  # [heads, T', S]
    height, width = level_shapes[0]
    finest = torch.zeros(*flat.shape[:-1], height * width)
    start = 0
    for h, w in level_shapes:
        level = flat[..., start : start + h * w]
        start += h * w
        # each finest cell's nearest cell of this level, and how many finest cells share it
        source = ((torch.arange(height) * h // height)[:, None] * w + (torch.arange(width) * w // width)[None, :]).flatten()
        share = torch.bincount(source, minlength=h * w).clamp(min=1)
        finest += (level / share)[..., source]
    return finest.unflatten(-1, (height, width))


def _probabilities(model, logits: torch.Tensor) -> torch.Tensor:
    """Class logits -> probabilities of the real classes, as the model's class loss defines them."""
    if model.criterion.class_loss.sigmoid:
        return logits.sigmoid()
    return logits.softmax(-1)[..., :-1]


@torch.no_grad()
def explain(
    model,
    image,
    labels: dict | None = None,
    threshold: float = 0.5,
    image_processor=None,
    encoder_points: Iterable[tuple[float, float]] | None = None,
    training_queries: bool = False,
) -> Explanation:
    """Run `image` through `model` (an HfDetrForObjectDetection, put in eval mode) and collect what
    every decoder layer predicts, how the matcher pairs it with `labels`, and where it attends.

    image: a path, a PIL image, or {"image", "pixel_values", "pixel_mask"} already made.
    labels: the image's ground truth {"class_labels": Long[N], "boxes": Float[N, 4] cxcywh 0..1}, or None.
    threshold: the score from which a query counts as a detection (`Explanation.detections`).
    image_processor: what turns the image into pixel values (default: `image_processor_for(model.config)`;
        pass the checkpoint's own, which knows the size it was trained at).
    encoder_points: (x, y) pixels whose encoder self-attention to collect (default: the centres of up
        to 4 final detections, else the image centre).
    training_queries: build the decoder's training layout (every query group; denoising queries too
        when labels are given): only the query builder is put in training mode, dropout stays off.
    """
    model.eval()
    image, inputs = _inputs(image, image_processor or image_processor_for(model.config))
    captured = {}
    hook = model.model.feature_levels.register_forward_hook(lambda module, args, output: captured.update(memory=output))
    builder = model.model.queries
    builder.train(training_queries)
    try:
        outputs = model.model(
            inputs["pixel_values"], inputs["pixel_mask"], output_attentions=True,
            labels=[labels] if labels is not None and training_queries else None,
            output_intermediate_hidden_states=True, output_decoder_queries=True,
        )  # fmt: skip
    finally:
        hook.remove()
        builder.eval()
    logits, boxes = model.model.heads(outputs.intermediate_hidden_states, outputs.reference_boxes)
    layout = outputs.decoder_queries
    group_0 = layout.prediction_slice
    memory = captured["memory"]
    level_shapes = [tuple(int(v) for v in shape) for shape in memory.level_shapes]
    height, width = level_shapes[0]
    feature_mask = torch.ones(height, width, dtype=torch.bool) if memory.mask is None else memory.mask[0, : height * width].view(height, width)

    def maps(attentions, rows):  # per layer: probabilities [1, heads, T, S] or deformable sampling -> [layers, heads, T', h, w]
        return torch.stack([_attention_on_finest_grid(a, rows, level_shapes) for a in attentions])

    scores = _probabilities(model, logits[:, 0])
    deformable = isinstance(outputs.cross_attentions[0], tuple)
    explanation = Explanation(
        image=image,
        names=dict(model.config.id2label),
        threshold=threshold,
        scores=scores[:, group_0],
        boxes=boxes[:, 0, group_0],
        references=None if outputs.reference_boxes is None else outputs.reference_boxes[:, 0, group_0],
        feature_mask=feature_mask,
        cross_attention=maps(outputs.cross_attentions, group_0),
        encoder_points=torch.zeros(0, 2),
        encoder_attention=torch.zeros(0),
        all_scores=scores,
        all_boxes=boxes[:, 0],
        level_shapes=level_shapes,
        sampling_locations=torch.stack([a[0][0, group_0] for a in outputs.cross_attentions]) if deformable else None,
        sampling_weights=torch.stack([a[1][0, group_0] for a in outputs.cross_attentions]) if deformable else None,
        valid_ratios=memory.valid_ratios[0],
        num_groups=layout.num_groups,
        num_denoising=layout.num_denoising,
        labels=labels,
    )

    # the encoder's self-attention at the points' cells of the finest level (the image's real cells span the mask)
    if encoder_points is None:
        centres = explanation.boxes_in_pixels(explanation.boxes[-1, explanation.detections()[:4]])
        encoder_points = ((centres[:, :2] + centres[:, 2:]) / 2).tolist() or [(image.width / 2, image.height / 2)]
    points = torch.tensor(list(encoder_points), dtype=torch.float32).reshape(-1, 2)
    real_h, real_w = int(feature_mask.any(1).sum()), int(feature_mask.any(0).sum())
    columns = (points[:, 0] / image.width * real_w).long().clamp(0, real_w - 1)
    rows = (points[:, 1] / image.height * real_h).long().clamp(0, real_h - 1)
    explanation.encoder_points = points
    explanation.encoder_attention = maps(outputs.encoder_attentions, rows * width + columns)

    if labels is not None:
        matcher = model.criterion.matcher
        per_layer = matcher.match_layers(logits[:, :, group_0], boxes[:, :, group_0], [labels])
        explanation.matches = [pairs[0] for pairs in per_layer]
        explanation.match_costs = [
            matcher.pair_costs(logits[layer, 0, group_0], boxes[layer, 0, group_0], labels, *explanation.matches[layer])
            for layer in range(explanation.num_layers)
        ]
    return explanation


@dataclass
class QueryStatistics:
    """Where each query slot predicts over a split (DETR's figure 7) and how often it is matched.

    centres [I, Q, 2], sizes [I, Q, 2]: every image's final-layer box centre and (w, h), normalised;
    scores [I, Q]: each prediction's best class score; match_counts [Q, K]: how often the matcher paired
    slot q with an object of class k over the split (final layer); names: label -> name."""

    centres: torch.Tensor
    sizes: torch.Tensor
    scores: torch.Tensor
    match_counts: torch.Tensor
    names: dict[int, str]


@torch.no_grad()
def query_statistics(model, examples: Iterable[Mapping], image_processor=None, batch_size: int = 8) -> QueryStatistics:
    """Every final-layer prediction of every query slot over `examples` (Hub-schema rows: "image", and
    "objects" with "bbox" COCO xywh pixels and "category" dataset ids mapped by `model.config.category_ids`,
    crowd objects left out), and how often the model's matcher pairs each slot with each class."""
    model.eval()
    image_processor = image_processor or image_processor_for(model.config)
    category_ids = model.config.category_ids or list(range(model.config.num_labels))
    to_label = {int(c): i for i, c in enumerate(category_ids)}
    centres, sizes, scores = [], [], []
    counts = torch.zeros(model.config.num_queries, model.config.num_labels, dtype=torch.long)
    batch: list[Mapping] = []

    def run(batch):
        images = [decode_image(example["image"]) for example in batch]
        encoded = image_processor(images=images, return_tensors="pt")
        output = model(pixel_values=encoded["pixel_values"], pixel_mask=encoded.get("pixel_mask"))
        centres.append(output.pred_boxes[..., :2]), sizes.append(output.pred_boxes[..., 2:])
        scores.append(_probabilities(model, output.logits).max(-1).values)
        labels = [_labels(example, image, to_label) for example, image in zip(batch, images)]
        for (query_idx, target_idx), target in zip(model.criterion.matcher(output.logits, output.pred_boxes, labels), labels):
            counts.index_put_((query_idx, target["class_labels"][target_idx]), torch.ones_like(query_idx), accumulate=True)

    for example in examples:
        batch.append(example)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    return QueryStatistics(torch.cat(centres), torch.cat(sizes), torch.cat(scores), counts, dict(model.config.id2label))


def _labels(example: Mapping, image, to_label: dict[int, int]) -> dict[str, torch.Tensor]:
    """A Hub-schema row's non-crowd objects -> {"class_labels", "boxes" cxcywh normalised to the image}."""
    objects = example["objects"]
    rows = [dict(zip(objects, values)) for values in zip(*objects.values())] if isinstance(objects, Mapping) else list(objects)
    rows = [row for row in rows if not row.get("iscrowd")]
    width, height = image.size
    boxes = torch.tensor([row["bbox"] for row in rows], dtype=torch.float32).reshape(-1, 4)
    boxes = torch.cat((boxes[:, :2] + boxes[:, 2:] / 2, boxes[:, 2:]), -1) / torch.tensor([width, height, width, height])
    classes = torch.tensor([to_label[int(row["category"])] for row in rows], dtype=torch.long)
    return {"class_labels": classes, "boxes": boxes.clamp(0, 1)}


def coco_image_of(coco: Mapping, image: str | Path, image_id: int | None = None, annotations: str = "the annotation file") -> dict:
    """The entry of a COCO json's ``images`` that describes the image file ``image``: the one whose
    ``file_name`` ends its path, or, with ``image_id``, that id's entry, checked to be that file. Its
    ``width`` x ``height`` must be the image's (EXIF orientation applied). Anything else is a ValueError
    naming the file, the id and ``annotations``: another image's boxes would be drawn without a word."""
    parts = Path(image).parts

    def is_this_file(entry: Mapping) -> bool:
        name = Path(os.path.normpath(str(entry["file_name"]))).parts
        return len(name) <= len(parts) and parts[len(parts) - len(name) :] == name

    same_file = [entry for entry in coco["images"] if is_this_file(entry)]
    ids_of_file = [entry["id"] for entry in same_file]
    if image_id is None:
        if len(same_file) != 1:
            found = f"several ({ids_of_file})" if same_file else "none"
            raise ValueError(f"{annotations}: {found} of its images has the file name of {image}; name the image with --image_id")
        entry = same_file[0]
    else:
        entries = [entry for entry in coco["images"] if entry["id"] == image_id]
        if not entries:
            raise ValueError(f"image id {image_id} is not in {annotations}'s images")
        entry = entries[0]
        if not is_this_file(entry):
            theirs = f"its id there is {ids_of_file[0]}" if len(ids_of_file) == 1 else f"ids with its file name: {ids_of_file}"
            raise ValueError(f"image id {image_id} is {entry['file_name']!r} in {annotations}, not {image} ({theirs})")
    size = displayed_size(str(image))
    if size != (entry["width"], entry["height"]):
        raise ValueError(
            f"{image} is {size[0]}x{size[1]}, but image {entry['id']} of {annotations} is {entry['width']}x{entry['height']}: "
            "its boxes are not this image's"
        )
    return entry


def labels_from_coco(coco: Mapping, image_id: int, category_ids: list[int] | None) -> dict[str, torch.Tensor]:
    """A COCO json's annotations of one image (crowd left out) -> labels for `explain`, in the label
    order of `category_ids` (the checkpoint's `config.category_ids`; None: ids are the labels)."""
    images = [im for im in coco["images"] if im["id"] == image_id]
    if not images:
        raise ValueError(f"image id {image_id} is not in the annotation file's images")
    width, height = images[0]["width"], images[0]["height"]
    to_label = {int(c): i for i, c in enumerate(category_ids)} if category_ids else None
    objects = [a for a in coco.get("annotations", ()) if a["image_id"] == image_id and not a.get("iscrowd")]
    classes, boxes = [], []
    for annotation in objects:
        category = int(annotation["category_id"])
        if to_label is not None and category not in to_label:
            raise ValueError(f"annotation {annotation['id']} (image {image_id}): category id {category} is not one of the model's {category_ids}")
        classes.append(to_label[category] if to_label else category)
        x, y, w, h = annotation["bbox"]
        boxes.append([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height])
    return {"class_labels": torch.tensor(classes, dtype=torch.long), "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)}


__all__ = ["Explanation", "explain", "QueryStatistics", "query_statistics", "coco_image_of", "labels_from_coco"]
