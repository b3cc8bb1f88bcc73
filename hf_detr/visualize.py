"""Pictures of an `Explanation` (hf_detr/explain.py) with matplotlib, and the HTML page that holds them.
Training side: never imported by the model surface.

Each plot function writes one PNG and returns what it drew (query indices, matched pairs), so that a
test can hold the picture to the model's own numbers.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .explain import Explanation, QueryStatistics  # noqa: E402

_COLOURS = plt.get_cmap("tab20").colors


def _colour(query: int):
    return _COLOURS[query % len(_COLOURS)]


def _panels(count: int, size: float = 3.2):
    columns = min(count, 6)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return figure, list(axes.flat)


def _show(ax, explanation: Explanation, title: str):
    ax.imshow(explanation.image)
    width, height = explanation.image.size
    ax.set_xlim(0, width), ax.set_ylim(height, 0)  # boxes reaching outside the image are cut at its edge
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _box(ax, xyxy, colour, label: str | None = None, dashed: bool = False):
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.6, linestyle="--" if dashed else "-"))
    if label:
        ax.text(x0, y0, label, fontsize=7, color="white", va="bottom", bbox=dict(facecolor=colour, alpha=0.8, pad=1, linewidth=0))


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_layers(explanation: Explanation, path: str | Path) -> list[list[int]]:
    """One panel per decoder layer: the boxes of that layer's confident queries (its own scores and
    boxes), labelled by query index and class. -> per layer, the queries drawn."""
    figure, axes = _panels(explanation.num_layers)
    drawn = []
    for layer, ax in enumerate(axes[: explanation.num_layers]):
        _show(ax, explanation, f"decoder layer {layer + 1}")
        scores, classes = explanation.scores[layer].max(-1)
        queries = explanation.detections(layer).tolist()
        for query, xyxy in zip(queries, explanation.boxes_in_pixels(explanation.boxes[layer, queries])):
            name = explanation.names.get(int(classes[query]), str(int(classes[query])))
            _box(ax, xyxy, _colour(query), f"q{query} {name} {scores[query]:.2f}")
        drawn.append(queries)
    _save(figure, Path(path))
    return drawn


def plot_matching(explanation: Explanation, path: str | Path) -> list[list[tuple[int, int]]]:
    """One panel per decoder layer: the ground truth (dashed, white), each matched query's box and a
    line from it to its object; the title names the queries whose assignment changed since the layer
    before. -> per layer, the (query, target) pairs drawn."""
    if explanation.matches is None:
        raise ValueError("plot_matching needs an explanation made with labels")
    targets = explanation.boxes_in_pixels(explanation.labels["boxes"])
    changed = [[]] + explanation.changed_assignments()
    figure, axes = _panels(explanation.num_layers)
    drawn = []
    for layer, ax in enumerate(axes[: explanation.num_layers]):
        title = f"layer {layer + 1}: matching" + (f" (changed: {', '.join(f'q{q}' for q in changed[layer])})" if changed[layer] else "")
        _show(ax, explanation, title)
        for target, xyxy in enumerate(targets):
            _box(ax, xyxy, "white", f"t{target}", dashed=True)
        pairs = list(zip(*(indices.tolist() for indices in explanation.matches[layer])))
        boxes = explanation.boxes_in_pixels(explanation.boxes[layer])
        for query, target in pairs:
            _box(ax, boxes[query], _colour(query), f"q{query}")
            start, end = (boxes[query, :2] + boxes[query, 2:]) / 2, (targets[target, :2] + targets[target, 2:]) / 2
            ax.plot([float(start[0]), float(end[0])], [float(start[1]), float(end[1])], color=_colour(query), linewidth=1.2)
        drawn.append(pairs)
    _save(figure, Path(path))
    return drawn


def _attention_image(ax, explanation: Explanation, attention: torch.Tensor):
    """A [h, w] attention map over the feature map, its image part stretched over the image."""
    rows, columns = int(explanation.feature_mask.any(1).sum()), int(explanation.feature_mask.any(0).sum())
    width, height = explanation.image.size
    ax.imshow(attention[:rows, :columns].numpy(), extent=(0, width, height, 0), cmap="inferno", alpha=0.6, interpolation="nearest")


def plot_cross_attention(explanation: Explanation, path: str | Path, max_detections: int = 6) -> list[int]:
    """The final layer's cross-attention of each detection over the image, averaged over heads (DETR's
    figure 6). -> the queries drawn."""
    queries = explanation.detections()[:max_detections].tolist() or explanation.scores[-1].max(-1).values.argsort(descending=True)[:1].tolist()
    figure, axes = _panels(len(queries))
    boxes = explanation.boxes_in_pixels(explanation.boxes[-1])
    for query, ax in zip(queries, axes):
        score, label = explanation.scores[-1, query].max(-1)
        _show(ax, explanation, f"q{query} {explanation.names.get(int(label), int(label))} {score:.2f}: cross-attention")
        _attention_image(ax, explanation, explanation.cross_attention[-1, :, query].mean(0))
        _box(ax, boxes[query], _colour(query))
    _save(figure, Path(path))
    return queries


def plot_encoder_attention(explanation: Explanation, path: str | Path) -> int:
    """The last encoder layer's self-attention from each of the explanation's points, averaged over
    heads (DETR's figure 3). -> the number of points drawn."""
    points = explanation.encoder_points
    figure, axes = _panels(len(points))
    for index, ax in enumerate(axes[: len(points)]):
        x, y = (float(v) for v in points[index])
        _show(ax, explanation, f"encoder self-attention at ({x:.0f}, {y:.0f})")
        _attention_image(ax, explanation, explanation.encoder_attention[-1, :, index].mean(0))
        ax.plot([x], [y], marker="o", markersize=7, color="cyan", markeredgecolor="black")
    _save(figure, Path(path))
    return len(points)


def plot_sampling_points(explanation: Explanation, path: str | Path, max_detections: int = 4) -> list[tuple[int, int]]:
    """Deformable cross-attention: for each of a few detections (rows) and every decoder layer (columns), the
    points the query samples on every feature level (a colour per level) over the image, each dot's area
    proportional to its attention weight, and the layer's box. -> the (query, layer) panels drawn."""
    queries = explanation.detections()[:max_detections].tolist() or explanation.scores[-1].max(-1).values.argsort(descending=True)[:1].tolist()
    layers = explanation.num_layers
    figure, axes = plt.subplots(len(queries), layers, figsize=(3.0 * layers, 3.0 * len(queries)), squeeze=False)
    width, height = explanation.image.size
    # a level's (x, y) in 0..1 of its padded map -> image pixels: the image spans valid_ratios of the map
    scale = torch.tensor([width, height], dtype=torch.float32) / explanation.valid_ratios.float()  # [levels, 2]
    level_colours = plt.get_cmap("viridis")(torch.linspace(0, 0.9, len(explanation.level_shapes)).tolist())
    drawn = []
    for row, query in enumerate(queries):
        for layer in range(layers):
            ax = axes[row][layer]
            _show(ax, explanation, f"q{query}, layer {layer + 1}")
            pixels = explanation.sampling_locations[layer, query] * scale[None, :, None, :]  # [heads, levels, points, 2]
            weights = explanation.sampling_weights[layer, query]  # [heads, levels, points]
            for level, colour in enumerate(level_colours):
                xy, w = pixels[:, level].reshape(-1, 2), weights[:, level].reshape(-1)
                ax.scatter(xy[:, 0].numpy(), xy[:, 1].numpy(), s=(w * 400).numpy(), color=colour, alpha=0.7, linewidths=0)
            _box(ax, explanation.boxes_in_pixels(explanation.boxes[layer, query]), _colour(query))
            drawn.append((query, layer))
    _save(figure, Path(path))
    return drawn


def _cost_table(explanation: Explanation) -> str:
    rows = []
    for layer, ((queries, targets), costs) in enumerate(zip(explanation.matches, explanation.match_costs)):
        for i, (query, target) in enumerate(zip(queries.tolist(), targets.tolist())):
            label = int(explanation.labels["class_labels"][target])
            cells = [layer + 1, f"q{query}", f"t{target}", html.escape(str(explanation.names.get(label, label)))]
            cells += [f"{float(costs[key][i]):.3f}" for key in ("class", "l1", "giou", "total")]
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in ("layer", "query", "object", "class", "class cost", "L1", "GIoU", "total cost"))
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def write_report(explanation: Explanation, output_dir: str | Path, title: str = "Inside DETR") -> Path:
    """index.html with the per-layer predictions, the matching (with labels) and its costs, and the
    cross- and encoder attention, each a PNG beside it. -> the page's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    sections = [("layers.png", "Every decoder layer's confident predictions (the same heads on each layer's output)")]
    plot_layers(explanation, output_dir / "layers.png")
    table = ""
    if explanation.matches is not None:
        plot_matching(explanation, output_dir / "matching.png")
        sections.append(("matching.png", "The Hungarian matching per layer: each matched query's box, a line to its object"))
        table = "<h2>The cost of each matched pair</h2>" + _cost_table(explanation)
    plot_cross_attention(explanation, output_dir / "cross_attention.png")
    sections.append(("cross_attention.png", "Where each detection looks: the last decoder layer's cross-attention"))
    if explanation.sampling_locations is not None:
        plot_sampling_points(explanation, output_dir / "sampling_points.png")
        levels = len(explanation.level_shapes)
        sections.append(("sampling_points.png", f"Deformable attention: each layer's sampling points on the {levels} feature levels (a colour each), dot size = weight"))
    plot_encoder_attention(explanation, output_dir / "encoder_attention.png")
    sections.append(("encoder_attention.png", "The last encoder layer's self-attention at a few points"))
    layout = ""
    if explanation.num_groups > 1 or explanation.num_denoising:
        layout = f"<p>Training layout: {explanation.num_groups} query groups, {explanation.num_denoising} denoising queries.</p>"
    body = "".join(f"<h2>{html.escape(caption)}</h2><img src='{name}' style='max-width:100%'>" for name, caption in sections)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>{layout}{body}{table}</body></html>"
    )
    (output_dir / "index.html").write_text(page)
    return output_dir / "index.html"


def _size_colours(sizes: torch.Tensor):
    """DETR's figure 7 colours: green for small boxes, red for large wide ones, blue for large tall ones."""
    w, h = sizes[:, 0], sizes[:, 1]
    large = (w * h).sqrt().clamp(0, 1)
    wide = (w >= h).float()
    return torch.stack((large * wide, 1 - large, large * (1 - wide)), -1).clamp(0, 1).numpy()


def plot_query_slots(statistics: QueryStatistics, path: str | Path, num_slots: int = 20) -> list[int]:
    """For the most matched slots, every prediction's box centre over the split in the unit square,
    coloured by box size (DETR's figure 7). -> the slots drawn."""
    slots = statistics.match_counts.sum(1).argsort(descending=True)[:num_slots].tolist()
    figure, axes = _panels(len(slots), size=2.4)
    for slot, ax in zip(slots, axes):
        ax.axis("on")
        ax.set_xlim(0, 1), ax.set_ylim(1, 0), ax.set_xticks([]), ax.set_yticks([]), ax.set_aspect("equal")
        ax.scatter(statistics.centres[:, slot, 0], statistics.centres[:, slot, 1], s=4, c=_size_colours(statistics.sizes[:, slot]))
        ax.set_title(f"slot {slot} (matched {int(statistics.match_counts[slot].sum())}x)", fontsize=8)
    _save(figure, Path(path))
    return slots


def plot_slot_matches(statistics: QueryStatistics, path: str | Path) -> None:
    """How often the matcher paired each slot with each class over the split."""
    counts = statistics.match_counts.float()
    figure, ax = plt.subplots(figsize=(1.2 + 0.5 * counts.shape[1], 1.5 + 0.22 * counts.shape[0]))
    image = ax.imshow(counts.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(counts.shape[1]), [statistics.names.get(k, str(k)) for k in range(counts.shape[1])], rotation=45, ha="right")
    ax.set_ylabel("query slot"), ax.set_title("matches per slot and class")
    figure.colorbar(image, ax=ax)
    _save(figure, Path(path))


def write_dataset_report(statistics: QueryStatistics, output_dir: str | Path, title: str = "DETR's query slots") -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_query_slots(statistics, output_dir / "query_slots.png")
    plot_slot_matches(statistics, output_dir / "slot_matches.png")
    images = len(statistics.centres)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{images} images.</p>"
        "<h2>Where each slot predicts (box centres; green small, red large wide, blue large tall boxes)</h2>"
        "<img src='query_slots.png' style='max-width:100%'><h2>How often each slot is matched, per class</h2>"
        "<img src='slot_matches.png' style='max-width:100%'></body></html>"
    )
    (output_dir / "index.html").write_text(page)
    return output_dir / "index.html"


__all__ = [
    "plot_layers", "plot_matching", "plot_cross_attention", "plot_sampling_points", "plot_encoder_attention", "write_report",
    "plot_query_slots", "plot_slot_matches", "write_dataset_report",
]  # fmt: skip
