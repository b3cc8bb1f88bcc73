"""Model card, eval results and Hub push for a finished checkpoint folder.

A checkpoint folder, as `scripts/train.py` leaves it in `--output_dir`:

    config.json (with auto_map), model.safetensors, configuration_hf_detr.py, modeling_hf_detr.py, ...
    preprocessor_config.json      image processor
    eval_results.json             `save_eval_results`: the COCO metrics dict
    README.md                     `write_model_card`: rendered from model_cards/README.md.jinja

`push_checkpoint` uploads that folder as it is (one `create_repo` + one `upload_folder`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

# The template lives at the repository's top level (ARCHITECTURE.md: model_cards/), next to the
# scripts that fill it in; pass `template_path` when running from elsewhere.
DEFAULT_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "README.md.jinja"

# Display names of the keys of `hf_detr.evaluation.COCO_METRIC_NAMES`, in COCOeval's order.
METRIC_LABELS = {
    "map": "mAP @[IoU=0.50:0.95]",
    "map_50": "mAP @[IoU=0.50]",
    "map_75": "mAP @[IoU=0.75]",
    "map_small": "mAP (small, < 32x32 px)",
    "map_medium": "mAP (medium)",
    "map_large": "mAP (large, > 96x96 px)",
    "mar_1": "mAR @1 detection",
    "mar_10": "mAR @10 detections",
    "mar_100": "mAR @100 detections",
    "mar_small": "mAR (small)",
    "mar_medium": "mAR (medium)",
    "mar_large": "mAR (large)",
}

# Config fields worth a line in the card, when the config has them.
ARCHITECTURE_FIELDS = (
    "d_model", "encoder_layers", "decoder_layers", "num_queries", "query_type", "num_feature_levels",
    "encoder_attention", "decoder_cross_attention", "num_labels",
)  # fmt: skip

# Files of an output dir that are not part of the final checkpoint: accelerate state checkpoints
# (`--checkpointing_steps`) and tracker logs.
DEFAULT_IGNORE_PATTERNS = ("step_*", "epoch_*", "checkpoint-*", "runs/*")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id ("user/name" or "name") and is no local path, else None."""
    if not name or os.path.exists(name) or not _HUB_ID.match(name):
        return None
    return name


def base_model_id(model_name_or_path: str | None, config: Any = None) -> str | None:
    """The Hub model a fine-tuned checkpoint's weights started from (its card's `base_model`):
    `model_name_or_path` when it is a Hub id, else the Hub checkpoint a local converted folder's config
    names (`converted_from`); None for a model trained from scratch."""
    if not model_name_or_path:
        return None
    return hub_id(model_name_or_path) or hub_id(getattr(config, "converted_from", None))


def _hub_dataset_id(dataset_name: str | None) -> str | None:
    """`dataset_name` when it names a Hub dataset, None for a local folder or the synthetic set."""
    return hub_id(dataset_name)


def framework_versions() -> dict[str, str]:
    """The versions of the libraries a checkpoint was trained with, as transformers' Trainer card lists them."""
    import importlib.metadata

    versions = {}
    for name, package in (("Transformers", "transformers"), ("PyTorch", "torch"), ("Accelerate", "accelerate"),
                          ("Datasets", "datasets"), ("hf_detr", "hf_detr")):  # fmt: skip
        try:
            versions[name] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _architecture(model_config: Any) -> dict[str, Any]:
    if model_config is None:
        return {}
    config = model_config if isinstance(model_config, Mapping) else model_config.to_dict()
    rows = {}
    backbone = config.get("backbone_config")
    if isinstance(backbone, Mapping) and backbone.get("model_type"):
        rows["backbone"] = backbone["model_type"]
    rows.update({key: config[key] for key in ARCHITECTURE_FIELDS if config.get(key) is not None})
    if "num_labels" not in rows and config.get("id2label"):  # v5 configs store id2label, not num_labels
        rows["num_labels"] = len(config["id2label"])
    return rows


def render_model_card(
    metrics: Mapping[str, float],
    dataset_name: str | None,
    training_args: Mapping[str, Any] | None = None,
    model_id: str | None = None,
    *,
    dataset_split: str = "validation",
    base_model: str | None = None,
    model_config: Any = None,
    license: str = "apache-2.0",
    template_path: str | os.PathLike | None = None,
    versions: Mapping[str, str] | None = None,
) -> str:
    """Render the model card (README.md text) of a checkpoint.

    Args:
        metrics: COCO metrics, keys as `hf_detr.evaluation.COCO_METRIC_NAMES` (0..1, -1 = undefined).
        dataset_name: Hub dataset id, local COCO folder, or None for the built-in synthetic data.
            Only a Hub id goes into the `datasets:` metadata.
        training_args: e.g. `vars(args)` of train.py; keys containing "token" are never written.
        model_id: Hub repo id used in the usage snippets; None -> a local-path placeholder.
        dataset_split: split the metrics were computed on.
        base_model: Hub id the weights started from (e.g. a converted `facebook/detr-resnet-50`).
        model_config: the model's config (or its dict): backbone, sizes and queries go in a table.
        template_path: jinja2 template; default `model_cards/README.md.jinja`.
        versions: library -> version for the "Framework versions" list; default `framework_versions()`.

    Returns:
        Markdown with YAML front matter: library_name, tags, datasets, pipeline_tag, license and a
        model-index holding the defined (>= 0) metrics.
    """
    dataset_id = _hub_dataset_id(dataset_name)
    if dataset_name is None:
        dataset_display = "the built-in synthetic dataset"
    else:
        dataset_display = dataset_id or f"a local COCO-format dataset ({Path(dataset_name).name})"
    model_name = model_id.split("/")[-1] if model_id else "hf_detr model"

    defined = [key for key in METRIC_LABELS if key in metrics and metrics[key] >= 0]
    eval_results = [
        EvalResult(
            task_type="object-detection",
            dataset_type=dataset_id or ("synthetic" if dataset_name is None else Path(dataset_name).name),
            dataset_name=dataset_id or dataset_display,
            dataset_split=dataset_split,
            metric_type=key,
            metric_name=METRIC_LABELS[key],
            metric_value=round(float(metrics[key]), 4),
        )
        for key in defined
    ]
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=["object-detection", "detr", "hf_detr", "vision"],
        datasets=[dataset_id] if dataset_id else None,
        pipeline_tag="object-detection",
        base_model=base_model,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    training_rows = [
        # A hub token passed on the command line must not end up in a public README.
        (key, value)
        for key, value in (training_args or {}).items()
        if "token" not in key.lower()
    ]
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or DEFAULT_TEMPLATE),
        model_name=model_name,
        model_ref=model_id or "path/to/checkpoint",
        dataset_id=dataset_id,
        dataset_display=dataset_display,
        dataset_split=dataset_split,
        # COCO metrics first in COCOeval's order, then any other numbers (e.g. a final loss).
        metric_rows=[
            (METRIC_LABELS.get(key, key), f"{float(metrics[key]):.4f}")
            for key in [*(k for k in METRIC_LABELS if k in metrics), *(k for k in metrics if k not in METRIC_LABELS)]
            if isinstance(metrics[key], (int, float)) and not isinstance(metrics[key], bool)
        ],
        training_rows=training_rows,
        ema_decay=(training_args or {}).get("ema_decay"),
        ema_warmup_steps=(training_args or {}).get("ema_warmup_steps"),
        architecture=_architecture(model_config),
        num_queries=_architecture(model_config).get("num_queries"),
        framework_versions=framework_versions() if versions is None else dict(versions),
    )
    return str(card)


def write_model_card(folder: str | os.PathLike, *args: Any, **kwargs: Any) -> Path:
    """`render_model_card(*args, **kwargs)` written to `folder/README.md`; returns that path."""
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(*args, **kwargs), encoding="utf-8")
    return path


def save_eval_results(folder: str | os.PathLike, metrics: Mapping[str, float]) -> Path:
    """Write the metrics dict (keys `map`, `map_50`, ..., plus any JSON-able extras) to
    `folder/eval_results.json`."""
    path = Path(folder) / "eval_results.json"
    path.write_text(json.dumps(dict(metrics), indent=2) + "\n", encoding="utf-8")
    return path


def push_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload hf_detr checkpoint",
    *,
    endpoint: str | None = None,
    revision: str | None = None,
    ignore_patterns: Iterable[str] = DEFAULT_IGNORE_PATTERNS,
) -> str:
    """Create `repo_id` (if needed) and upload the checkpoint folder to it in one commit.

    Args:
        folder: the final checkpoint folder (weights, config.json with auto_map, the model-surface
            .py files, preprocessor_config.json, README.md, eval_results.json).
        repo_id: "user/name" on the Hub.
        token: Hub token; None uses the logged-in token (`hf auth login` / HF_TOKEN).
        private: create the repo private (ignored when it already exists).
        endpoint: Hub URL; None -> HF_ENDPOINT or huggingface.co (tests point it at a local server).
        revision: branch to commit to (default main).
        ignore_patterns: files of `folder` left out; by default intermediate training checkpoints.

    Returns:
        the URL of the model repo.
    """
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=folder,
        commit_message=commit_message,
        revision=revision,
        ignore_patterns=list(ignore_patterns),
    )
    return str(repo_url)
