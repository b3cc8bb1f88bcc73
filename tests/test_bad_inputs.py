"""Bad data, bad inputs and faults, tried as a user would: each gives a clear error naming the item
(file, image id, annotation id, argument, config field), or a skip that is warned about and counted;
never a lost run, a silent wrong result or a crash deep inside torch, cv2 or Arrow.

Covered in the module tests, not repeated here:
- corrupt training image files are skipped, warned about and counted, also across DataLoader workers:
  test_data.py::test_bad_data_is_fixed_skipped_and_counted, ::test_unreadable_images_counted_across_loader_workers
- zero-area boxes dropped, boxes outside the image clipped, crowd boxes kept out of the targets (all
  counted): test_data.py::test_bad_data_is_fixed_skipped_and_counted
- an unknown category id (COCO file, or a category map that lacks it): test_data.py::test_unknown_category_id_raises_naming_the_annotation
- target boxes outside [0, 1], NaN boxes, class ids out of range, mismatched shapes given to the model:
  test_loss.py::test_bad_targets_raise_value_error_naming_image_and_annotation, ::test_mismatched_target_shapes_rejected
- config values the model cannot be built with: test_configuration.py::test_bad_values_raise_value_error_naming_the_field
- a resumed run reaches the same losses as an uninterrupted one:
  test_train.py::test_resumed_run_reaches_the_same_loss_as_an_uninterrupted_one
- remote code loads where hf_detr cannot be imported: test_modeling.py::test_remote_code_loads_where_hf_detr_cannot_be_imported
- the original repo's .pth is read with weights_only=True: test_convert.py::test_original_detr_pth_is_read_weights_only
- train.py's arguments out of range (negative learning rates or steps, --checkpointing_steps 0 or abc):
  test_training.py::test_contradicting_or_out_of_range_arguments_are_refused_by_name
- two runs on one --output_dir, --overwrite_output_dir, a resume of another folder's run:
  test_run_folder.py; a full disk while checkpointing, a resume after an architecture change:
  test_checkpoints.py::test_a_full_disk_while_checkpointing_says_so_and_leaves_the_earlier_checkpoint_intact,
  ::test_resume_refuses_another_model_naming_the_config_fields
"""

import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pyarrow
import pyarrow.parquet
import pytest
import torch

import hf_detr
from conftest import random_labels, tiny_config
from hf_detr.data import DETECTION_FEATURES, CategoryMap, DetectionDataset, load_coco_folder, make_synthetic_coco
from hf_detr.evaluation import evaluate_model
from hf_detr.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_transform

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = [{"id": 1, "name": "one"}, {"id": 3, "name": "three"}]


def square_image(height=48, width=64, box=(10, 10, 20, 10)) -> np.ndarray:
    """Black [H,W,3] uint8 with a white rectangle at COCO xywh ``box``."""
    image = np.zeros((height, width, 3), np.uint8)
    x, y, w, h = box
    image[y : y + h, x : x + w] = 255
    return image


def write_coco(root: Path, coco, split="train", files=None) -> Path:
    """A COCO folder: ``coco`` (a dict, or raw text) as the split's annotation file; ``files``
    {file_name: PIL image or bytes}; by default one image a.png per listed image."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    text = coco if isinstance(coco, str) else json.dumps(coco)
    (root / "annotations" / f"instances_{split}.json").write_text(text)
    if files is None and isinstance(coco, dict):
        files = {im["file_name"]: PIL.Image.fromarray(square_image()) for im in coco.get("images", []) if isinstance(im, dict) and "file_name" in im}
    for name, content in (files or {}).items():
        if isinstance(content, bytes):
            (root / split / name).write_bytes(content)
        else:
            content.save(root / split / name)
    return root


def good_coco() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                   {"id": 2, "file_name": "b.png", "width": 64, "height": 48}],  # fmt: skip
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 10], "iscrowd": 0},
                        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0}],  # fmt: skip
        "categories": [dict(c) for c in CATEGORIES],
    }


def mutated(change):
    def build():
        coco = good_coco()
        change(coco)
        return coco

    return build


def unnormalise(pixel_values: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((pixel_values * std + mean) * 255).permute(1, 2, 0).numpy()


# --- COCO annotation files: a ValueError naming the file and the image / annotation ----------------

ANNOTATION_FILE = r"\S*instances_train\.json"
COCO_FILE_CASES = {
    "bbox as a string": (
        mutated(lambda c: c["annotations"][0].update(bbox="10,10,20,10")),
        rf"annotation 1 \(image 1\) in {ANNOTATION_FILE}: 'bbox' must be \[x, y, width, height\]: 4 finite numbers, got str '10,10,20,10'",
    ),
    "bbox with an inf width": (
        mutated(lambda c: c["annotations"][1].update(bbox=[5, 5, float("inf"), 10])),
        rf"annotation 2 \(image 2\) in {ANNOTATION_FILE}: 'bbox' must be .*4 finite numbers, got list \[5, 5, inf, 10\]",
    ),
    "bbox with a NaN": (
        mutated(lambda c: c["annotations"][1].update(bbox=[5, float("nan"), 10, 10])),
        rf"annotation 2 \(image 2\) in {ANNOTATION_FILE}: 'bbox' must be .*got list \[5, nan, 10, 10\]",
    ),
    "bbox of 3 numbers": (
        mutated(lambda c: c["annotations"][0].update(bbox=[1, 2, 3])),
        rf"annotation 1 \(image 1\) in {ANNOTATION_FILE}: 'bbox' must be .*got list \[1, 2, 3\]",
    ),
    "missing category_id": (
        mutated(lambda c: c["annotations"][1].pop("category_id")),
        rf"annotation 2 \(image 2\) in {ANNOTATION_FILE}: missing 'category_id'",
    ),
    "missing annotation id": (
        mutated(lambda c: c["annotations"][1].pop("id")),
        rf"annotation None \(image 2\) in {ANNOTATION_FILE}: missing 'id'",
    ),
    "missing image width": (
        mutated(lambda c: c["images"][1].pop("width")),
        rf"image 2 \(images\[1\]\) in {ANNOTATION_FILE}: missing 'width'",
    ),
    "missing file_name": (
        mutated(lambda c: c["images"][0].pop("file_name")),
        rf"image 1 \(images\[0\]\) in {ANNOTATION_FILE}: missing 'file_name'",
    ),
    "string category id": (
        mutated(lambda c: c["annotations"][0].update(category_id="3")),
        rf"annotation 1 \(image 1\) in {ANNOTATION_FILE}: 'category_id' must be an integer, got str '3'",
    ),
    "string id in the categories": (
        mutated(lambda c: c["categories"][1].update(id="3")),
        rf"categories\[1\] in {ANNOTATION_FILE}: 'id' must be an integer, got str '3'",
    ),
    "iscrowd as a string": (
        mutated(lambda c: c["annotations"][1].update(iscrowd="no")),
        rf"annotation 2 \(image 2\) in {ANNOTATION_FILE}: 'iscrowd' must be 0, 1 or a bool, got str 'no'",
    ),
    "zero image height": (
        mutated(lambda c: c["images"][0].update(height=0)),
        rf"image 1 \(images\[0\]\) in {ANNOTATION_FILE}: 'height' must be a positive integer, got int 0",
    ),
    "duplicate image ids": (
        mutated(lambda c: c["images"][1].update(id=1)),
        rf"{ANNOTATION_FILE}: image id 1 is used by both 'a.png' and 'b.png'; image ids must be unique",
    ),
    "annotation of an undeclared image": (
        mutated(lambda c: c["annotations"][1].update(image_id=9)),
        rf"annotation 2 \(image 9\) in {ANNOTATION_FILE}: image id not in the file's images",
    ),
    "not JSON": (lambda: '{"images": [', rf"{ANNOTATION_FILE} is not valid JSON"),
    "image id beyond int64": (
        mutated(lambda c: [c["images"][0].update(id=2**70), c["annotations"][0].update(image_id=2**70)]),
        rf"image {2**70} \(images\[0\]\) in {ANNOTATION_FILE}: 'id' must fit in 64 bits \(ids and sizes are stored as int64\), got {2**70}",
    ),
    "category id beyond int64": (
        mutated(lambda c: c["categories"][0].update(id=-(2**64))),
        rf"categories\[0\] in {ANNOTATION_FILE}: 'id' must fit in 64 bits .*got {-(2**64)}",
    ),
    "file_name leaving the folder": (
        mutated(lambda c: c["images"][1].update(file_name="../../x.png")),
        rf"image 2 \(images\[1\]\) in {ANNOTATION_FILE}: file_name '../../x.png' is not a file inside the split's image folder",
    ),
    "absolute file_name": (
        mutated(lambda c: c["images"][0].update(file_name="/etc/hostname")),
        rf"image 1 \(images\[0\]\) in {ANNOTATION_FILE}: file_name '/etc/hostname' is not a file inside the split's image folder",
    ),
    "one file under two image ids": (
        mutated(lambda c: c["images"][1].update(file_name="./a.png")),
        rf"{ANNOTATION_FILE}: images 1 and 2 are the same file './a.png'; list each image once, with all its annotations under one image id",
    ),
    "negative bbox width": (
        mutated(lambda c: c["annotations"][1].update(bbox=[5, 5, -3, 10])),
        rf"{ANNOTATION_FILE}: annotation 2 of image 2: \[5.0, 5.0, -3.0, 10.0\] in a 64x48 image has a negative width or height",
    ),
}


@pytest.mark.parametrize("case", list(COCO_FILE_CASES))
def test_malformed_coco_file_raises_naming_file_and_item(tmp_path, case):
    build, message = COCO_FILE_CASES[case]
    root = write_coco(tmp_path, build(), files={})
    with pytest.raises(ValueError, match=message):
        load_coco_folder(root, "train")


def test_iscrowd_as_bool_is_read_as_0_or_1(tmp_path):
    root = write_coco(tmp_path, mutated(lambda c: c["annotations"][0].update(iscrowd=True))())
    data = load_coco_folder(root, "train")
    assert data.dataset[0]["objects"]["iscrowd"] == [1] and data.dataset[1]["objects"]["iscrowd"] == [0]
    dataset = DetectionDataset(data.dataset, data.categories, build_eval_transform(48, 64))
    assert dataset.stats.crowd_ignored == 1 and dataset[0]["labels"]["crowd_boxes"].shape == (1, 4)


def hub_rows(boxes) -> datasets.Dataset:
    """One Hub-schema row (image 11, annotation ids 5, 6, ...) with the given xywh boxes."""
    n = len(boxes)
    objects = {"id": list(range(5, 5 + n)), "bbox": boxes, "category": [0] * n, "area": [1.0] * n, "iscrowd": [0] * n}
    return datasets.Dataset.from_dict(
        {"image": [PIL.Image.fromarray(square_image())], "image_id": [11], "width": [64], "height": [48], "objects": [objects]},
        features=DETECTION_FEATURES,
    )


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_box_of_any_source_raises_naming_the_annotation(bad):
    rows = hub_rows([[1.0, 1.0, 5.0, 5.0], [10.0, 10.0, bad, 10.0]])
    with pytest.raises(ValueError, match=r"annotation 6 \(image 11\): bbox must be 4 finite numbers"):
        DetectionDataset(rows, CategoryMap.from_names(["a"]), build_eval_transform(48, 64))


@pytest.mark.parametrize(
    "field, value, message",
    [("iscrowd", ["no"], r"row 0: objects\.iscrowd must be 0/1 or bools, got \['no'\]"),
     ("bbox", [[1.0, 2.0, 3.0]], r"row 0: objects\.bbox must be \[N, 4\] numbers")],
)  # fmt: skip
def test_hub_dataset_with_a_malformed_object_field_names_the_row(tmp_path, field, value, message):
    from hf_detr.data import load_hub_detection_dataset

    objects = {"bbox": [[1.0, 2.0, 3.0, 4.0]], "category": [0], "iscrowd": [0], field: value}
    rows = {"image": [PIL.Image.fromarray(square_image())], "width": [64], "height": [48], "objects": [objects]}
    folder = tmp_path / "hub"
    datasets.Dataset.from_dict(rows).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=message):
        load_hub_detection_dataset(str(folder), "train", categories=CategoryMap.from_names(["a"]), cache_dir=str(tmp_path / "cache"))


# --- boxes in another format than they are read in; class names given twice ---------------------------

# Six objects of 64x48 images as corners [x0, y0, x1, y1], spread over the image as real objects are.
CORNERS = [[30, 20, 60, 44], [2, 3, 20, 30], [40, 5, 62, 25], [10, 25, 35, 46], [33, 30, 50, 40], [5, 5, 15, 12]]


def hub_folder(root: Path, boxes, category=None, ids=None) -> str:
    """A Hub-schema parquet dataset (split "train"): one 64x48 image per box, category 0."""
    category = category or datasets.ClassLabel(names=["a"])
    id_feature = {"id": datasets.Value("uint64")} if ids is not None else {}
    features = datasets.Features({
        "image": datasets.Image(), "width": datasets.Value("int64"), "height": datasets.Value("int64"),
        "objects": datasets.Sequence({"bbox": datasets.Sequence(datasets.Value("float32"), length=4), "category": category, **id_feature}),
    })  # fmt: skip
    png = io.BytesIO()
    PIL.Image.fromarray(square_image()).save(png, "PNG")
    rows = [
        {"image": {"bytes": png.getvalue(), "path": None}, "width": 64, "height": 48,
         "objects": {"bbox": [box], "category": [0], **({"id": [ids[i]]} if ids is not None else {})}}
        for i, box in enumerate(boxes)
    ]  # fmt: skip
    # through pyarrow: datasets' own writer cannot take a uint64 beyond int64 inside a sequence
    (root / "data").mkdir(parents=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows, schema=features.arrow_schema), root / "data" / "train.parquet")
    return str(root)


def test_corners_read_as_xywh_are_an_error_naming_bbox_format(tmp_path):
    from hf_detr.data import load_hub_detection_dataset

    folder = hub_folder(tmp_path / "hub", CORNERS)
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match=(
        r"hub \(train\): read as --bbox_format xywh \[x, y, width, height\], 4 of 6 boxes leave their image or have no size "
        r"\(e\.g\. annotation 0 of image 0: \[30\.0, 20\.0, 60\.0, 44\.0\] in a 64x48 image\); read as \[x0, y0, x1, y1\], 0 do\. "
        r"The boxes look like \[x0, y0, x1, y1\]: pass --bbox_format xyxy"
    )):  # fmt: skip
        load_hub_detection_dataset(folder, "train", cache_dir=cache)
    data = load_hub_detection_dataset(folder, "train", bbox_format="xyxy", cache_dir=cache)
    assert data.dataset[0]["objects"]["bbox"] == [[30.0, 20.0, 30.0, 24.0]]
    # the other way round: COCO boxes read as corners have no size
    xywh = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in CORNERS]
    with pytest.raises(ValueError, match=r"read as --bbox_format xyxy .* 4 of 6 boxes .*; read as \[x, y, width, height\], 0 do\. .*pass --bbox_format xywh"):
        load_hub_detection_dataset(hub_folder(tmp_path / "hub2", xywh), "train", bbox_format="xyxy", cache_dir=cache)


def test_corners_in_a_coco_file_are_an_error_naming_the_file(tmp_path):
    coco = good_coco()
    coco["images"] = [{"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 48} for i in range(len(CORNERS))]
    coco["annotations"] = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": box} for i, box in enumerate(CORNERS)]
    root = write_coco(tmp_path, coco, files={})
    with pytest.raises(ValueError, match=(
        rf"{ANNOTATION_FILE}: read as COCO's \[x, y, width, height\], 4 of 6 boxes leave their image .*"
        r"The boxes look like \[x0, y0, x1, y1\]: convert them to \[x, y, width, height\]"
    )):  # fmt: skip
        load_coco_folder(root, "train")


def test_boxes_that_overhang_a_little_are_clipped_not_an_error(tmp_path, caplog):
    # every box overhangs by a pixel or less, as rounding annotation tools leave them: no error, no warning
    boxes = [[x0, y0, x1 - x0 + 1, y1 - y0 + 1] for x0, y0, x1, y1 in CORNERS]
    boxes[0] = [30, 20, 34.5, 28.5]  # to 64.5 x 48.5
    coco = good_coco()
    coco["annotations"] = [{"id": i + 1, "image_id": 1 + i % 2, "category_id": 1, "bbox": box} for i, box in enumerate(boxes)]
    with caplog.at_level(logging.WARNING):
        data = load_coco_folder(write_coco(tmp_path, coco, files={}), "train")
    assert not caplog.text
    assert DetectionDataset(data.dataset, data.categories, build_eval_transform(48, 64)).stats.clipped == 1


def test_label_names_that_disagree_with_the_classlabel_are_an_error(tmp_path):
    from hf_detr.data import load_hub_detection_dataset

    folder = hub_folder(tmp_path / "hub", CORNERS[:1], category=datasets.ClassLabel(names=["cat", "dog"]))
    kwargs = dict(bbox_format="xyxy", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=(
        r"the class names given \(train.py --label_names\) \['dog', 'cat'\] disagree with the names of objects\.category's "
        r"ClassLabel \['cat', 'dog'\] \(label i is its i-th name\): leave out --label_names"
    )):  # fmt: skip
        load_hub_detection_dataset(folder, "train", categories=CategoryMap.from_names(["dog", "cat"]), **kwargs)
    same = load_hub_detection_dataset(folder, "train", categories=CategoryMap.from_names(["cat", "dog"]), **kwargs)
    assert same.categories.names == ["cat", "dog"]


def test_hub_annotation_ids_beyond_int64_name_the_row(tmp_path):
    from hf_detr.data import load_hub_detection_dataset

    folder = hub_folder(tmp_path / "hub", CORNERS[:2], ids=[7, 2**64 - 1])
    with pytest.raises(ValueError, match=rf"hub \(train\) row 1: objects\.id must fit in 64 bits \(stored as int64\), got \[{2**64 - 1}\]"):
        load_hub_detection_dataset(folder, "train", bbox_format="xyxy", cache_dir=str(tmp_path / "cache"))


# --- images: one way to decode them; what cannot be used is skipped, warned about and counted ---------


def one_image_folder(root: Path, image, width=64, height=48, name="a.png", box=(10, 10, 20, 10)) -> Path:
    coco = {
        "images": [{"id": 1, "file_name": name, "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": list(box), "iscrowd": 0}],
        "categories": CATEGORIES,
    }
    return write_coco(root, coco, files={name: image})


def test_exif_orientation_is_applied_in_training_as_in_evaluation_and_the_pipeline(tmp_path):
    displayed = square_image(height=60, width=40, box=(5, 30, 20, 12))  # boxes are drawn on what is shown
    stored = PIL.Image.fromarray(displayed).transpose(PIL.Image.Transpose.ROTATE_90)  # 60 wide, 40 high
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6  # "rotate 90 degrees clockwise to display"
    root = one_image_folder(tmp_path, stored, width=40, height=60, name="photo.png", box=(5, 30, 20, 12))
    path = root / "train" / "photo.png"
    stored.save(path, exif=exif)
    assert PIL.Image.open(path).size == (60, 40)

    data = load_coco_folder(root, "train")
    example = DetectionDataset(data.dataset, data.categories, build_eval_transform(40, 60))[0]
    assert example["labels"]["orig_size"].tolist() == [60, 40] and example["pixel_values"].shape == (3, 60, 40)
    cx, cy, w, h = (example["labels"]["boxes"][0] * torch.tensor([40, 60, 40, 60])).tolist()
    bright = unnormalise(example["pixel_values"]).mean(-1) > 128
    ys, xs = np.nonzero(bright)
    np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=1e-3)

    # the same pixels as datasets' Image feature and transformers' load_image (so pipeline) give
    from transformers.image_utils import load_image

    from hf_detr.images import decode_image

    np.testing.assert_array_equal(np.asarray(decode_image(str(path))), displayed)
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), displayed)
    np.testing.assert_array_equal(np.asarray(datasets.Image().decode_example({"path": str(path), "bytes": None})), displayed)


def test_sixteen_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    grey = np.full((48, 64), 128 * 257, np.uint16)  # mid-grey in 16 bits
    grey[10:20, 10:30] = 65535
    image = PIL.Image.fromarray(grey)
    assert image.mode.startswith("I;16")
    data = load_coco_folder(one_image_folder(tmp_path, image), "train")
    pixels = unnormalise(DetectionDataset(data.dataset, data.categories, build_eval_transform(48, 64))[0]["pixel_values"])
    np.testing.assert_allclose(pixels[30, 40], [128, 128, 128], atol=0.5)
    np.testing.assert_allclose(pixels[15, 20], [255, 255, 255], atol=0.5)


def test_extreme_aspect_ratio_trains_with_a_resize_of_at_least_one_pixel(tmp_path):
    wide = PIL.Image.fromarray(square_image(height=1, width=300, box=(10, 0, 50, 1)))
    data = load_coco_folder(one_image_folder(tmp_path, wide, width=300, height=1, box=(10, 0, 50, 1)), "train")
    for augmentation in ("detr", "flip"):
        transform = build_transform(train=True, image_size=64, max_size=96, seed=0, augmentation=augmentation)
        dataset = DetectionDataset(data.dataset, data.categories, transform)
        for _ in range(5):  # several scales and crops
            example = dataset[0]
            height, width = example["labels"]["size"].tolist()
            assert height >= 1 and width >= 1 and example["pixel_values"].shape == (3, height, width)


def test_image_of_another_size_than_annotated_is_skipped_and_counted(tmp_path, caplog):
    small = PIL.Image.fromarray(square_image(height=24, width=32, box=(5, 5, 10, 5)))
    data = load_coco_folder(one_image_folder(tmp_path, small, width=64, height=48), "train")
    dataset = DetectionDataset(data.dataset, data.categories, build_eval_transform(48, 64))
    with caplog.at_level(logging.WARNING):
        assert dataset[0] is None
    assert "a.png (image_id 1)" in caplog.text
    assert "decoded size 32x24 differs from the annotated width x height 64x48" in caplog.text
    assert dataset.stats.size_mismatch == 1 and dataset.stats.skipped_images == 0


def test_decompression_bomb_is_skipped_and_counted_like_an_unreadable_image(tmp_path, caplog, monkeypatch):
    data = load_coco_folder(one_image_folder(tmp_path, PIL.Image.fromarray(square_image())), "train")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 48 = 3072 > 2 x 1000: PIL refuses it
    dataset = DetectionDataset(data.dataset, data.categories, build_eval_transform(48, 64))
    with caplog.at_level(logging.WARNING):
        assert dataset[0] is None
    assert "skipping unreadable image" in caplog.text and "a.png (image_id 1)" in caplog.text
    assert "DecompressionBombError" in caplog.text
    assert dataset.stats.skipped_images == 1


# --- evaluation: the same skips, counted; a split or run is never lost to one image -----------------

EVAL_CATEGORIES = CategoryMap([1, 3], ["one", "three"])


@pytest.fixture(scope="module")
def tiny_detector():
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(tiny_config(num_labels=2)).eval()
    return model, hf_detr.HfDetrImageProcessor(size={"shortest_edge": 48, "longest_edge": 64})


def eval_folder(root: Path, bad_file: bytes | PIL.Image.Image, bad_size=(64, 48)) -> Path:
    """Three images: a.png and c.png fine, b.png the bad one (annotated as bad_size)."""
    good = PIL.Image.fromarray(square_image())
    coco = good_coco()
    coco["images"][1].update(width=bad_size[0], height=bad_size[1])
    coco["images"].append({"id": 3, "file_name": "c.png", "width": 64, "height": 48})
    coco["annotations"][1]["bbox"] = [0, 0, 1, 1]
    coco["annotations"].append({"id": 3, "image_id": 3, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0})
    return write_coco(root, coco, split="val", files={"a.png": good, "b.png": bad_file, "c.png": good})


def truncated_jpeg() -> bytes:
    import io

    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


EVAL_SKIP_CASES = {
    # bad b.png, (skipped_images, size_mismatch), what the warning says
    "truncated JPEG": (lambda: truncated_jpeg(), None, (1, 0), r"b\.png \(image_id 2\): OSError"),
    "not an image": (lambda: b"this is not a png", None, (1, 0), r"b\.png \(image_id 2\): UnidentifiedImageError"),
    "other size than annotated": (
        lambda: PIL.Image.fromarray(square_image(24, 32)), None, (0, 1),
        r"b\.png \(image_id 2\): decoded size 32x24 differs from the annotated width x height 64x48",
    ),
    "extreme aspect ratio": (
        lambda: PIL.Image.fromarray(square_image(1, 300, (0, 0, 1, 1))), (300, 1), (1, 0),
        r"image_id 2 \(300x1\): the image processor failed",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(EVAL_SKIP_CASES))
def test_evaluation_skips_and_counts_an_image_it_cannot_use(tmp_path, tiny_detector, caplog, case):
    bad_file, bad_size, (unreadable, mismatch), warning = EVAL_SKIP_CASES[case]
    root = eval_folder(tmp_path, bad_file(), bad_size or (64, 48))
    data = load_coco_folder(root, "val")
    model, processor = tiny_detector
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_model(model, processor, data.dataset, data.categories, batch_size=2)
    assert math.isfinite(metrics["map"])
    assert len(re.findall(warning, caplog.text)) == 1, caplog.text
    again, stats = evaluate_model(model, processor, data.dataset, data.categories, batch_size=2, return_stats=True)
    assert again == metrics
    assert stats == {"images": 3, "evaluated": 2, "skipped_images": unreadable, "size_mismatch": mismatch}


def test_evaluation_with_no_usable_image_raises_not_zero_map(tmp_path, tiny_detector):
    root = write_coco(tmp_path, good_coco(), split="val", files={"a.png": b"junk", "b.png": b"junk"})
    data = load_coco_folder(root, "val")
    with pytest.raises(ValueError, match=r"none of the 2 evaluation images could be used"):
        evaluate_model(*tiny_detector, data.dataset, data.categories)


def test_duplicate_image_ids_in_evaluation_examples_raise():
    examples = [{"image_id": 7, "width": 10, "height": 10, "objects": {"bbox": [], "category": []}}] * 2
    from hf_detr.evaluation import coco_from_examples

    with pytest.raises(ValueError, match=r"image id 7 is used by several examples"):
        coco_from_examples(examples)


def test_a_split_without_annotations_is_warned_about(tmp_path, tiny_detector, caplog):
    coco = good_coco()
    coco["annotations"] = []
    data = load_coco_folder(write_coco(tmp_path, coco), "train")
    with caplog.at_level(logging.WARNING):
        DetectionDataset(data.dataset, data.categories, build_eval_transform(48, 64))
    assert "none of the 2 images has a box to learn from" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        evaluate_model(*tiny_detector, data.dataset, data.categories)
    assert "the evaluation split has no annotations" in caplog.text


# --- model inputs: a ValueError from the model naming the argument and the counts --------------------


def model_inputs(case):
    pixel_values, pixel_mask = torch.randn(2, 3, 64, 64), torch.ones(2, 64, 64, dtype=torch.long)
    labels = random_labels([2, 1], 5, torch.Generator().manual_seed(0))
    if case == "float class_labels":
        labels[0]["class_labels"] = labels[0]["class_labels"].float()
    elif case == "labels for fewer images than the batch":
        labels = labels[:1]
    elif case == "batch of 0 images":
        pixel_values, pixel_mask, labels = pixel_values[:0], pixel_mask[:0], []
    elif case == "pixel_mask of another size":
        pixel_mask = torch.ones(2, 32, 32, dtype=torch.long)
    elif case == "pixel_mask of one image for two":
        pixel_mask = pixel_mask[:1]
    elif case == "pixel_mask all zeros":
        pixel_mask[1] = 0
    elif case == "uint8 pixel_values":
        pixel_values = (pixel_values.clamp(-2, 2) * 60 + 128).to(torch.uint8)
    elif case == "channels-last pixel_values":
        pixel_values = pixel_values.permute(0, 2, 3, 1)
    elif case == "numpy pixel_values":
        pixel_values = pixel_values.numpy()
    elif case == "one image without the batch dimension":
        pixel_values, pixel_mask, labels = pixel_values[0], None, None
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": labels}


MODEL_INPUT_CASES = {
    "float class_labels": r"labels\[0\]\['class_labels'\] must be an integer tensor \[N\], got torch\.float32 of shape \(2,\)",
    "labels for fewer images than the batch": r"labels has 1 entries for a batch of 2 images",
    "batch of 0 images": r"pixel_values must be \[batch_size >= 1, channels, height, width\], got shape \(0, 3, 64, 64\)",
    "pixel_mask of another size": r"pixel_mask must be \[batch_size, height, width\] = \(2, 64, 64\) .*got \(2, 32, 32\)",
    "pixel_mask of one image for two": r"pixel_mask must be \[batch_size, height, width\] = \(2, 64, 64\) .*got \(1, 64, 64\)",
    "pixel_mask all zeros": r"pixel_mask of image\(s\) \[1\] is all zeros",
    "uint8 pixel_values": r"pixel_values must be a floating-point tensor \(the image processor's normalised pixels\), got torch\.uint8 of shape \(2, 3, 64, 64\)",
    "channels-last pixel_values": r"pixel_values must be \[batch_size, channels, height, width\], got shape \(2, 64, 64, 3\): channels last\? pass pixel_values\.permute\(0, 3, 1, 2\)",
    "numpy pixel_values": r"pixel_values must be a torch\.Tensor \[batch_size, channels, height, width\] .*got ndarray of shape \(2, 3, 64, 64\)",
    "one image without the batch dimension": r"got shape \(3, 64, 64\) \(one image\? add the batch dimension: pixel_values\[None\]\)",
}


@pytest.mark.parametrize("case", list(MODEL_INPUT_CASES))
def test_bad_model_inputs_raise_value_error_with_the_counts(case):
    model = hf_detr.HfDetrForObjectDetection(tiny_config()).train()
    with pytest.raises(ValueError, match=MODEL_INPUT_CASES[case]):
        model(**model_inputs(case))


def test_good_model_inputs_pass_the_checks():
    model = hf_detr.HfDetrForObjectDetection(tiny_config()).train()
    assert torch.isfinite(model(**model_inputs("good")).loss)
    inputs = model_inputs("good")
    inputs["pixel_mask"][1, :8] = 0  # padding at the top: real pixels elsewhere are enough
    assert torch.isfinite(model(**inputs).loss)


# --- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_labels", [1, 2, 3, 91])
def test_any_num_labels_round_trips(tmp_path, num_labels):
    hf_detr.HfDetrForObjectDetection(tiny_config(num_labels=num_labels)).save_pretrained(tmp_path)
    assert hf_detr.HfDetrConfig.from_pretrained(tmp_path).num_labels == num_labels
    model = hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path)
    assert model.config.num_labels == num_labels and model.model.heads.class_heads[0].out_features == num_labels + 1


def test_truncated_safetensors_is_refused(tmp_path):
    from safetensors import SafetensorError

    hf_detr.HfDetrForObjectDetection(tiny_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SafetensorError, match="incomplete metadata, file not fully covered"):
        hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path)


# --- scripts/train.py: faults during and after training -------------------------------------------------
# One process runs every scenario below in order (sharing the import time); each records its error, if
# any, and its log. A wrapped collate_fn fills the pixels of any batch holding a poisoned image id with NaN.

RUNNER = """
import json, logging, shutil, sys
from pathlib import Path
import torch
sys.path.insert(0, {scripts!r})
import train as train_script
from hf_detr import data as detr_data

logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
POISON = set()
collate = detr_data.collate_fn

def poisoned_collate(batch):
    out = collate(batch)
    if out is not None and any(int(target["image_id"]) in POISON for target in out["labels"]):
        out["pixel_values"] = torch.full_like(out["pixel_values"], float("nan"))
    return out

detr_data.collate_fn = poisoned_collate
results = {{}}
for name, scenario in json.load(open(sys.argv[1])).items():
    POISON.clear()
    POISON.update(scenario["poison"])
    handler = logging.FileHandler(sys.argv[2] + "/" + name + ".log")
    logging.getLogger().addHandler(handler)
    try:
        for source, target in scenario.get("copy", []):
            (shutil.copytree if Path(source).is_dir() else shutil.copy)(source, target)
        for file, values in scenario.get("edit", {{}}).items():
            Path(file).write_text(json.dumps({{**json.loads(Path(file).read_text()), **values}}))
        train_script.main(scenario["argv"])
        results[name] = None
    except (Exception, SystemExit) as err:  # SystemExit: argparse refusing an argument
        results[name] = [type(err).__name__, str(err)]
    logging.getLogger().removeHandler(handler)
json.dump(results, open(sys.argv[2] + "/results.json", "w"))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    tiny = tmp / "tiny"  # live batch norm: a NaN batch would poison its running statistics too
    hf_detr.HfDetrForObjectDetection(tiny_config(freeze_backbone_stages=0, freeze_backbone_batch_norm=False)).save_pretrained(tiny)
    coco = make_synthetic_coco(tmp / "coco", num_train=12, num_val=4, image_size=64, seed=1)  # 3 batches of 4
    truncated_val = Path(shutil.copytree(coco, tmp / "truncated_val"))
    jpeg = truncated_val / "val" / "000001.jpg"  # image id 2
    jpeg.write_bytes(jpeg.read_bytes()[:400])
    unreadable_val = Path(shutil.copytree(coco, tmp / "unreadable_val"))
    for image in (unreadable_val / "val").iterdir():
        image.write_bytes(b"not an image")
    empty = make_synthetic_coco(tmp / "empty", num_train=0, num_val=2, image_size=64)
    small = make_synthetic_coco(tmp / "small", num_train=3, num_val=2, image_size=64)

    def argv(dataset, output, *more):
        return ["--dataset_name", str(dataset), "--train_split", "train", "--eval_split", "val",
                "--model_name_or_path", str(tiny), "--image_size", "64", "--max_size", "64",
                "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--seed", "3",
                "--max_train_steps", "3", "--output_dir", str(tmp / output), *more]  # fmt: skip

    def copy_of(run, folder, *files):
        return [[str(tmp / run / file), str(tmp / folder / file)] for file in files]

    for folder in ("resumed", "other_batch_size", "other_learning_rate", "other_config", "resumed_best"):
        (tmp / folder).mkdir()
    best_state = {"best_metric": 1.0, "best_global_step": 2}  # as if step 2's model had been perfect
    scenarios = {
        "poisoned": {"argv": argv(coco, "poisoned", "--checkpointing_steps", "2"), "poison": [5]},
        # a second run in the same --output_dir (issue 25: it overwrote the first run's model and log)
        "second_run": {"argv": argv(coco, "poisoned", "--checkpointing_steps", "2"), "poison": []},
        "resumed": {  # a stray step_backup folder beside (issue 25: it broke `latest`)
            "copy": [*copy_of("poisoned", "resumed", "step_2", "train_log.jsonl"), [str(tmp / "poisoned" / "step_2"), str(tmp / "resumed" / "step_backup")]],
            "argv": argv(coco, "resumed", "--resume_from_checkpoint", "latest"), "poison": [5],
        },
        "other_batch_size": {
            "copy": copy_of("poisoned", "other_batch_size", "step_2"),
            "argv": argv(coco, "other_batch_size", "--resume_from_checkpoint", "latest", "--per_device_train_batch_size", "2"),
            "poison": [],
        },
        "other_learning_rate": {  # issue 25: it trained at the checkpoint's rate and recorded the new one
            "copy": copy_of("poisoned", "other_learning_rate", "step_2"),
            "argv": argv(coco, "other_learning_rate", "--resume_from_checkpoint", "latest", "--learning_rate", "5e-4"), "poison": [],
        },
        "other_config": {  # issue 25: torch's size-mismatch text
            "copy": copy_of("poisoned", "other_config", "step_2"),
            "argv": argv(coco, "other_config", "--resume_from_checkpoint", "latest", "--config_overrides", "num_queries=7"), "poison": [],
        },
        "not_a_checkpoint": {"argv": argv(coco, "not_a_checkpoint", "--resume_from_checkpoint", str(tiny)), "poison": []},
        "evaluated": {"argv": argv(coco, "evaluated", "--checkpointing_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1"), "poison": []},
        "resumed_best": {  # issue 25: a resumed run forgot the best metric and replaced best_model/ with a worse model
            "copy": copy_of("evaluated", "resumed_best", "step_2", "best_model", "train_log.jsonl"),
            "edit": {str(tmp / "resumed_best" / "step_2" / "trainer_state.json"): best_state,
                     str(tmp / "resumed_best" / "best_model" / "eval_results.json"): {"map": 1.0, "train_steps": 2}},  # fmt: skip
            "argv": argv(coco, "resumed_best", "--resume_from_checkpoint", "latest", "--eval_strategy", "steps", "--eval_steps", "1"),
            "poison": [],
        },
        "eval_truncated": {"argv": argv(truncated_val, "eval_truncated", "--max_train_steps", "1"), "poison": []},
        "eval_unreadable": {"argv": argv(unreadable_val, "eval_unreadable"), "poison": []},
        "all_nonfinite": {"argv": argv(coco, "all_nonfinite", "--max_consecutive_nonfinite_steps", "2"), "poison": list(range(1, 13))},
        "empty_train_split": {"argv": argv(empty, "empty_train_split"), "poison": []},
        "split_smaller_than_a_batch": {"argv": argv(small, "split_smaller_than_a_batch"), "poison": []},
    }
    (tmp / "scenarios.json").write_text(json.dumps(scenarios))
    (tmp / "runner.py").write_text(RUNNER.format(scripts=str(ROOT / "scripts")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(tmp / "runner.py"), str(tmp / "scenarios.json"), str(tmp)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return tmp, json.loads((tmp / "results.json").read_text())


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


RUN_ERRORS = {
    "second_run": (
        "ValueError",
        r"--output_dir \S+poisoned already holds the results of run [\w-]+ \(best_model, eval_results.json, model.safetensors, "
        r"step_2, train_log.jsonl, README.md, \.\.\.\): this run would write its model, log and results over them\. Choose "
        r"another --output_dir, continue that run with --resume_from_checkpoint latest, or pass --overwrite_output_dir",
    ),
    "other_batch_size": (
        "ValueError",
        r"--resume_from_checkpoint \S+step_2: arguments differ from the run that wrote it: per_device_train_batch_size "
        r"\(checkpoint 4, now 2\)\. A resumed run continues that run as it was set up",
    ),
    "other_learning_rate": ("ValueError", r"arguments differ from the run that wrote it: learning_rate \(checkpoint 0.0001, now 0.0005\)\."),
    "other_config": ("ValueError", r"arguments differ from the run that wrote it: config_overrides \(checkpoint None, now 'num_queries=7'\)\."),
    "not_a_checkpoint": (
        "ValueError",
        r"--resume_from_checkpoint \S+tiny is not a training checkpoint: it lacks optimizer.bin, scheduler.bin\. .* To start a new "
        r"run from the model saved there, pass --model_name_or_path \S+tiny\.",
    ),
    "eval_unreadable": ("ValueError", r"none of the 4 evaluation images could be used"),
    "all_nonfinite": (
        "RuntimeError",
        r"2 optimizer steps in a row had a non-finite loss \(the last: step 2, images \[.*\]\); "
        r"stopping \(--max_consecutive_nonfinite_steps 2\)",
    ),
    "empty_train_split": ("ValueError", r"the training split 'train' of \S+empty has no images"),
    "split_smaller_than_a_batch": (
        "ValueError",
        r"the training split 'train' has 3 images, fewer than one batch \(--per_device_train_batch_size 4\)",
    ),
}


@pytest.mark.parametrize("scenario", list(RUN_ERRORS))
def test_train_script_stops_with_an_error_naming_the_cause(runs, scenario):
    _, results = runs
    error_type, message = RUN_ERRORS[scenario]
    assert results[scenario] is not None, f"{scenario} ran to the end"
    assert results[scenario][0] == error_type, results[scenario]
    assert re.search(message, results[scenario][1]), results[scenario][1]


def all_finite(folder: Path) -> bool:
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values() if t.is_floating_point())


def test_nan_batch_is_skipped_counted_and_never_reaches_the_weights(runs):
    tmp, results = runs
    assert results["poisoned"] is None
    log = read_log(tmp / "poisoned")
    assert [entry["step"] for entry in log] == [1, 2, 3]
    skipped = [entry for entry in log if entry.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["loss"] is None and skipped[0]["skipped"] == "non-finite loss"
    assert all(math.isfinite(entry["loss"]) for entry in log if not entry.get("skipped"))
    step = skipped[0]["step"]
    warning = rf"step {step}: non-finite loss \(this process's loss: nan\), optimizer step skipped \(1 in a row, 1 in this run\); image ids of this process's batch: \[.*\b5\b.*\]"
    assert re.search(warning, (tmp / "poisoned.log").read_text())
    results_file = json.loads((tmp / "poisoned" / "eval_results.json").read_text())
    assert results_file["data_stats"]["train"]["skipped_nonfinite_steps"] == 1
    assert all_finite(tmp / "poisoned") and all_finite(tmp / "poisoned" / "step_2")  # running statistics too
    assert math.isfinite(results_file["map"])
    assert "run summary: 3 steps (1 skipped: non-finite)" in (tmp / "poisoned.log").read_text()


def test_unreadable_evaluation_image_is_skipped_and_counted_in_eval_results(runs):
    tmp, results = runs
    assert results["eval_truncated"] is None
    stats = json.loads((tmp / "eval_truncated" / "eval_results.json").read_text())["data_stats"]
    assert stats["eval"] == {"images": 4, "evaluated": 3, "skipped_images": 1, "size_mismatch": 0}
    assert stats["train"]["skipped_images"] == 0 and stats["train"]["images"] == 12
    log = (tmp / "eval_truncated.log").read_text()
    assert "evaluation: skipping image " in log and "000001.jpg (image_id 2): OSError" in log
    assert "'skipped_images': 1" in log.split("run summary:")[1]


def test_failed_evaluation_leaves_the_trained_model_saved(runs):
    tmp, results = runs
    assert results["eval_unreadable"][0] == "ValueError"
    output = tmp / "eval_unreadable"
    assert [entry["step"] for entry in read_log(output)] == [1, 2, 3]
    model = hf_detr.HfDetrForObjectDetection.from_pretrained(output)
    assert model.config.category_ids == [1, 3, 7]
    hf_detr.HfDetrImageProcessor.from_pretrained(output)
    assert not list(output.glob("*.partial")) and not (output / "eval_results.json").exists()


def test_stopped_non_finite_run_saves_no_weights(runs):
    tmp, _ = runs
    output = tmp / "all_nonfinite"
    assert not (output / "model.safetensors").exists()
    assert [entry.get("skipped") for entry in read_log(output)] == ["non-finite loss"] * 2


def test_checkpoint_records_the_settings_and_resume_refuses_others_before_touching_anything(runs):
    tmp, _ = runs
    saved = json.loads((tmp / "poisoned" / "step_2" / "train_args.json").read_text())
    assert saved["per_device_train_batch_size"] == 4 and saved["num_processes"] == 1 and saved["train_images"] == 12
    assert not (tmp / "other_batch_size" / "train_log.jsonl").exists()
    assert not (tmp / "other_batch_size" / "model.safetensors").exists()


def test_second_run_in_an_output_dir_leaves_the_first_runs_results_as_they_were(runs):
    tmp, _ = runs
    assert [entry["step"] for entry in read_log(tmp / "poisoned")] == [1, 2, 3]
    assert json.loads((tmp / "poisoned" / "eval_results.json").read_text())["data_stats"]["train"]["skipped_nonfinite_steps"] == 1
    for refused in ("other_learning_rate", "other_config", "not_a_checkpoint"):
        assert not (tmp / refused / "train_log.jsonl").exists() and not (tmp / refused / "model.safetensors").exists()


def test_resumed_run_keeps_the_best_model_so_far(runs):
    tmp, results = runs
    assert results["evaluated"] is None and results["resumed_best"] is None
    state = json.loads((tmp / "evaluated" / "step_2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["metric_for_best_model"] == "map" and state["best_global_step"] in (1, 2)
    # the resumed run's step-3 evaluations (no better than map 1.0) left best_model/ as it was
    best = json.loads((tmp / "resumed_best" / "best_model" / "eval_results.json").read_text())
    assert (best["map"], best["train_steps"]) == (1.0, 2)
    assert json.loads((tmp / "resumed_best" / "eval_results.json").read_text())["best_model"] == {"step": 2, "map": 1.0, "path": "best_model"}
    assert "best map so far: 1.0000 at step 2" in (tmp / "resumed_best.log").read_text()


def test_resumed_run_rewrites_the_log_from_the_checkpoint_step(runs):
    tmp, results = runs
    assert results["resumed"] is None
    assert (tmp / "resumed" / "step_backup").is_dir()  # ignored, not deleted
    full, resumed = read_log(tmp / "poisoned"), read_log(tmp / "resumed")
    assert [entry["step"] for entry in resumed] == [1, 2, 3]  # not 1, 2, 3, 3
    assert resumed[:2] == full[:2]
    if full[2]["loss"] is None:
        assert resumed[2] == full[2]
    else:
        assert resumed[2]["loss"] == pytest.approx(full[2]["loss"], rel=1e-5)
    skipped = sum(1 for entry in full if entry.get("skipped"))  # counted from the kept log lines too
    assert json.loads((tmp / "resumed" / "eval_results.json").read_text())["data_stats"]["train"]["skipped_nonfinite_steps"] == skipped
