"""Model card rendering, and the push path end to end against a local Hub (tests/hub_server.py).

Nothing in huggingface_hub is patched except its offline switch (conftest.py turns offline mode on
so no test can reach the real Hub; here every request goes to 127.0.0.1).
"""

import json
import os

import pytest
import torch
from huggingface_hub import ModelCard, snapshot_download
from huggingface_hub import constants as hub_constants

import hf_detr
from hf_detr.evaluation import COCO_METRIC_NAMES
from hf_detr.hub import base_model_id, push_checkpoint, render_model_card, save_eval_results, write_model_card

from conftest import tiny_config
from hub_server import LocalHub

METRICS = {name: round(0.05 * (i + 1), 4) for i, name in enumerate(COCO_METRIC_NAMES)} | {"map_small": -1.0}
TRAINING_ARGS = {"dataset_name": "detection-datasets/coco", "learning_rate": 1e-4, "hub_token": "hf_secret", "seed": 0}


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # requests only go to 127.0.0.1
    with LocalHub(tmp_path / "hub_storage") as hub:
        yield hub
    assert hub.unknown == [], f"routes the local Hub does not implement were hit: {hub.unknown}"


def local_files(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def dummy_folder(tmp_path):
    """Arbitrary bytes (NULs, non-UTF-8), a nested file, an empty file, and an intermediate checkpoint."""
    folder = tmp_path / "dummy"
    (folder / "sub").mkdir(parents=True)
    (folder / "step_10").mkdir()
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64 + os.urandom(4096))
    (folder / "sub" / "notes.txt").write_text("nested file\n")
    (folder / "empty.bin").write_bytes(b"")
    (folder / "step_10" / "optimizer.bin").write_bytes(b"training state, not part of the checkpoint")
    write_model_card(folder, METRICS, "detection-datasets/coco", TRAINING_ARGS, "tester/dummy")
    save_eval_results(folder, METRICS)
    return folder


@pytest.fixture
def checkpoint_folder(tmp_path):
    """A tiny real checkpoint laid out as train.py leaves --output_dir: weights, config with auto_map,
    model-surface .py files, image processor, model card, eval results."""
    torch.manual_seed(0)
    config = tiny_config(num_labels=3, id2label={0: "cat", 1: "dog", 2: "car"}, category_ids=[1, 3, 7])
    model = hf_detr.HfDetrForObjectDetection(config).eval()
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    hf_detr.HfDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    write_model_card(folder, METRICS, None, {"max_train_steps": 2}, "tester/tiny-detr", model_config=config)
    save_eval_results(folder, METRICS)
    return folder, model


def test_push_uploads_every_file_byte_identical(local_hub, dummy_folder):
    url = push_checkpoint(dummy_folder, "tester/dummy", token="hf_test_token", endpoint=local_hub.endpoint)

    assert url == f"{local_hub.endpoint}/tester/dummy"
    expected = {path: data for path, data in local_files(dummy_folder).items() if not path.startswith("step_10/")}
    assert local_hub.files("tester/dummy") == expected
    assert len(local_hub.repos["tester/dummy"]["commits"]) == 1
    assert local_hub.repos["tester/dummy"]["private"] is False
    assert set(local_hub.authorizations) == {"Bearer hf_test_token"}
    routes = {(method, path.split("/")[-2] if "/models/" in path else path) for method, path in local_hub.requests}
    assert routes >= {("POST", "/api/repos/create"), ("POST", "preupload"), ("POST", "commit")}


def test_push_again_updates_the_existing_repo(local_hub, dummy_folder):
    push_checkpoint(dummy_folder, "tester/dummy", private=True, endpoint=local_hub.endpoint)
    assert local_hub.repos["tester/dummy"]["private"] is True
    (dummy_folder / "sub" / "notes.txt").write_text("changed\n")
    save_eval_results(dummy_folder, {"map": 0.9})

    url = push_checkpoint(dummy_folder, "tester/dummy", endpoint=local_hub.endpoint, commit_message="second")

    assert url == f"{local_hub.endpoint}/tester/dummy"  # the 409 of create_repo is accepted (exist_ok)
    files = local_hub.files("tester/dummy")
    assert files["sub/notes.txt"] == b"changed\n"
    assert json.loads(files["eval_results.json"]) == {"map": 0.9}
    assert [c["summary"] for c in local_hub.repos["tester/dummy"]["commits"]][-1] == "second"


def test_pushed_checkpoint_downloads_and_loads_back(local_hub, checkpoint_folder, tmp_path):
    folder, model = checkpoint_folder
    push_checkpoint(folder, "tester/tiny-detr", endpoint=local_hub.endpoint)
    assert local_hub.files("tester/tiny-detr") == local_files(folder)
    for name in ("config.json", "model.safetensors", "modeling_hf_detr.py", "configuration_hf_detr.py",
                 "preprocessor_config.json", "README.md", "eval_results.json"):  # fmt: skip
        assert name in local_hub.files("tester/tiny-detr"), name
    assert "auto_map" in json.loads(local_hub.files("tester/tiny-detr")["config.json"])

    download = snapshot_download("tester/tiny-detr", endpoint=local_hub.endpoint, local_dir=tmp_path / "download")
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    loaded = AutoModelForObjectDetection.from_pretrained(download).eval()
    processor = AutoImageProcessor.from_pretrained(download)
    assert isinstance(loaded, hf_detr.HfDetrForObjectDetection)
    assert loaded.config.category_ids == [1, 3, 7]
    image = torch.randint(0, 256, (3, 80, 100), dtype=torch.uint8)
    inputs = processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        expected, actual = model(**inputs), loaded(**inputs)
    torch.testing.assert_close(actual.logits, expected.logits)
    torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes)
    card = ModelCard.load(os.path.join(download, "README.md"))
    assert card.data.pipeline_tag == "object-detection"


def test_model_card_metadata_and_text():
    text = render_model_card(METRICS, "detection-datasets/coco", TRAINING_ARGS, "tester/detr-coco", dataset_split="val")
    card = ModelCard(text)
    data = card.data
    assert data.library_name == "transformers"
    assert {"object-detection", "detr", "hf_detr"} <= set(data.tags)
    assert data.pipeline_tag == "object-detection"
    assert data.datasets == ["detection-datasets/coco"]
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == set(COCO_METRIC_NAMES) - {"map_small"}  # -1 (undefined) stays out of model-index
    assert results["map"].metric_value == METRICS["map"]
    assert results["map"].task_type == "object-detection"
    assert results["map"].dataset_split == "val"
    # text: metrics table, dataset, training args without the token, both usage snippets
    assert "| `learning_rate` | `0.0001` |" in text
    assert "hub_token" not in text and "hf_secret" not in text
    assert 'pipeline("object-detection", model="tester/detr-coco", trust_remote_code=True)' in text
    assert "import hf_detr" in text and 'AutoModelForObjectDetection.from_pretrained("tester/detr-coco")' in text
    assert f"| {METRICS['map_50']:.4f} |" in text.replace("mAP @[IoU=0.50] ", "")


def test_model_card_for_local_or_synthetic_data_has_no_datasets_metadata(tmp_path):
    for dataset_name in (str(tmp_path), None):
        card = ModelCard(render_model_card({"map": 0.25}, dataset_name, {}, None))
        assert card.data.datasets is None
        assert card.data.eval_results[0].metric_value == 0.25
        assert 'model="path/to/checkpoint"' in card.text


def test_model_card_lists_architecture_from_config():
    config = tiny_config(
        num_queries=7, query_type="anchor", encoder_attention="deformable", decoder_cross_attention="deformable"
    )
    text = render_model_card({"map": 0.1}, None, {}, "a/b", model_config=config, base_model="facebook/detr-resnet-50")
    assert "| num_queries | 7 |" in text and "| d_model | 32 |" in text
    # the attention kinds and the number of feature levels tell a DETR from a (single-scale) Deformable DETR
    assert "| encoder_attention | deformable |" in text and "| decoder_cross_attention | deformable |" in text
    assert "| num_feature_levels | 1 |" in text
    assert ModelCard(text).data.base_model == "facebook/detr-resnet-50"


def test_model_card_metrics_table_skips_non_numbers():
    metrics = {"train_steps": 20, "data_stats": {"skipped": 1}, **METRICS}
    text = render_model_card(metrics, None, {}, None)
    table = text.split("## Evaluation")[1].split("## Dataset")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "metric" not in line]
    assert rows[0].startswith("| mAP @[IoU=0.50:0.95] |")  # COCO metrics first, in COCOeval order
    assert "| train_steps | 20.0000 |" in table and "data_stats" not in table


def test_save_eval_results_round_trip(tmp_path):
    path = save_eval_results(tmp_path, METRICS)
    assert json.loads(path.read_text()) == METRICS


def test_model_card_lists_the_framework_versions():
    import importlib.metadata

    text = render_model_card({"map": 0.1}, None, {}, None)
    section = text.split("## Framework versions")[1].split("##")[0]
    for name, package in (("Transformers", "transformers"), ("PyTorch", "torch"), ("Accelerate", "accelerate"), ("Datasets", "datasets")):
        assert f"- {name} {importlib.metadata.version(package)}" in section, name
    assert "## Framework versions" not in render_model_card({"map": 0.1}, None, {}, None, versions={})


def test_base_model_is_the_hub_model_the_weights_started_from(tmp_path):
    converted = tiny_config(converted_from="facebook/detr-resnet-50")
    assert base_model_id("facebook/detr-resnet-50") == "facebook/detr-resnet-50"
    assert base_model_id(str(tmp_path), converted) == "facebook/detr-resnet-50"  # a local converted folder
    assert base_model_id(str(tmp_path), tiny_config()) is None  # a local folder of unknown origin
    assert base_model_id(None, converted) is None  # trained from scratch


def test_the_card_says_when_the_weights_are_an_average():
    plain = render_model_card(METRICS, None, {"learning_rate": 1e-4})
    averaged = render_model_card(METRICS, None, {"learning_rate": 1e-4, "ema_decay": 0.9999, "ema_warmup_steps": 2000})
    assert "exponential moving average" not in plain
    assert "an exponential moving average of the trained\nweights (decay 0.9999, warmed up over 2000 steps)" in averaged
