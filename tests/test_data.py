"""Data pipeline: sources -> Hub schema -> cleaned targets -> augmented examples -> batches."""

import json
import logging
from pathlib import Path

import albumentations as A
import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from hf_detr.data import (
    DETECTION_FEATURES,
    HUB_DATASETS,
    CategoryMap,
    DetectionDataset,
    collate_fn,
    default_splits,
    load_coco_folder,
    load_hub_detection_dataset,
    load_splits,
    make_synthetic_coco,
    synthetic_dataset,
)
from hf_detr.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetrTransform,
    build_eval_transform,
    build_train_transform,
    build_transform,
    detr_resize_shape,
    scaled_sizes,
)

SMALL = scaled_sizes(64)


def unnormalise(pixel_values: torch.Tensor) -> np.ndarray:
    """[3,H,W] ImageNet-normalised -> [H,W,3] in 0..255."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((pixel_values * std + mean) * 255).permute(1, 2, 0).numpy()


def cxcywh_to_pixels(boxes: torch.Tensor, height: int, width: int) -> np.ndarray:
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    return (xyxy * torch.tensor([width, height, width, height])).numpy()


# --- sources -----------------------------------------------------------------------------------------


def test_synthetic_folder_loads_with_schema_and_is_deterministic(tmp_path):
    kwargs = dict(num_train=24, num_val=6, image_size=64, empty_fraction=0.3, seed=3)
    a = make_synthetic_coco(tmp_path / "a", **kwargs)
    b = make_synthetic_coco(tmp_path / "b", **kwargs)
    c = make_synthetic_coco(tmp_path / "c", **{**kwargs, "seed": 4})
    assert (a / "annotations/instances_train.json").read_text() == (b / "annotations/instances_train.json").read_text()
    assert (a / "train/000005.jpg").read_bytes() == (b / "train/000005.jpg").read_bytes()
    assert (a / "train/000005.jpg").read_bytes() != (c / "train/000005.jpg").read_bytes()

    # Cached: a second call with the same arguments writes nothing.
    mtime = (a / "train/000000.jpg").stat().st_mtime_ns
    make_synthetic_coco(a, **kwargs)
    assert (a / "train/000000.jpg").stat().st_mtime_ns == mtime

    train, categories = load_coco_folder(a, "train")
    assert train.features == DETECTION_FEATURES
    assert len(train) == 24 and len(load_coco_folder(a, "val").dataset) == 6
    assert categories.category_ids == [1, 3, 7]  # sparse ids
    rows = train.remove_columns("image").to_list()
    counts = [len(r["objects"]["bbox"]) for r in rows]
    assert min(counts) == 0 and max(counts) >= 2  # empty images kept, several objects elsewhere
    assert {c for r in rows for c in r["objects"]["category"]} == {1, 3, 7}
    for r in rows:
        for x, y, w, h in r["objects"]["bbox"]:
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
    image = train[0]["image"]
    assert image.size == (64, 64) and image.mode == "RGB"


def test_synthetic_colours_do_not_give_away_the_class(tmp_path):
    root = make_synthetic_coco(tmp_path, num_train=60, num_val=0, image_size=64)
    train, _ = load_coco_folder(root, "train")
    colours: dict[int, list] = {}
    for row in train:
        pixels = np.asarray(row["image"], dtype=np.float32)
        for (x, y, w, h), category in zip(row["objects"]["bbox"], row["objects"]["category"]):
            cx, cy = int(x + w / 2), int(y + h / 2)
            colours.setdefault(category, []).append(pixels[cy, cx])
    # Every class shows a wide spread of colours, and the class means are close together.
    spreads = [np.std(c, axis=0).mean() for c in colours.values()]
    means = np.array([np.mean(c, axis=0) for c in colours.values()])
    assert min(spreads) > 40
    assert np.abs(means - means.mean(0)).max() < 45


def _coco_rows(root: Path) -> list[dict]:
    return load_coco_folder(root, "train").dataset.remove_columns("image").to_list()


def test_the_clutter_style_is_deterministic_with_small_objects_of_its_own_classes_and_more_per_image(tmp_path):
    from hf_detr.synthetic import CLUTTER_CATEGORIES, SYNTHETIC_CATEGORIES

    kwargs = dict(num_train=40, num_val=2, image_size=128, seed=3)
    a = make_synthetic_coco(tmp_path / "a", style="clutter", **kwargs)
    b = make_synthetic_coco(tmp_path / "b", style="clutter", **kwargs)
    c = make_synthetic_coco(tmp_path / "c", style="clutter", **{**kwargs, "seed": 4})
    for name in ("annotations/instances_train.json", "annotations/instances_val.json", "train/000007.jpg"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "train/000007.jpg").read_bytes() != (c / "train/000007.jpg").read_bytes()

    train, categories = load_coco_folder(a, "train")
    assert train.features == DETECTION_FEATURES
    assert categories.category_ids == sorted(CLUTTER_CATEGORIES.values())
    assert set(categories.names) == set(CLUTTER_CATEGORIES)
    assert not set(CLUTTER_CATEGORIES) & set(SYNTHETIC_CATEGORIES)  # other names
    assert not set(CLUTTER_CATEGORIES.values()) & set(SYNTHETIC_CATEGORIES.values())  # and other ids
    rows = _coco_rows(a)
    boxes = np.array([box for r in rows for box in r["objects"]["bbox"]])
    areas = np.array([area for r in rows for area in r["objects"]["area"]])
    assert {c for r in rows for c in r["objects"]["category"]} == set(CLUTTER_CATEGORIES.values())
    x, y, w, h = boxes.T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 128).all() and (y + h <= 128).all()  # in the image
    assert (w >= 2).all() and (h >= 2).all() and (areas > 0).all() and (areas <= w * h).all()  # no degenerate box
    longer = np.maximum(w, h)
    assert ((longer >= 8) & (longer <= 24)).mean() > 0.4 and longer.max() > 40  # mostly small, some large

    counts = [len(r["objects"]["bbox"]) for r in rows]
    shapes_counts = [len(r["objects"]["bbox"]) for r in _coco_rows(make_synthetic_coco(tmp_path / "shapes", **kwargs))]
    assert max(counts) > 10 and np.mean(counts) > 2 * np.mean(shapes_counts)

    with pytest.raises(ValueError, match="unknown synthetic style 'stripes'; known: \\['shapes', 'clutter'\\]"):
        make_synthetic_coco(tmp_path / "d", style="stripes")
    with pytest.raises(ValueError, match="shapes \\['rectangle'\\] are not the 'clutter' style's"):
        make_synthetic_coco(tmp_path / "d", style="clutter", shapes=["star", "rectangle"])


def test_the_default_style_writes_what_it_wrote_before_the_clutter_style(tmp_path):
    """The built-in recipe was tuned on the "shapes" set: adding a style must leave it byte for byte as it was.
    The hashes were computed with the code of commit 47df198 (hf_detr/data.py, before a second style existed).
    The JPEG bytes also depend on Pillow's JPEG encoder: if only that hash moves after a Pillow upgrade, compute
    it again with that commit's make_synthetic_coco."""
    import hashlib

    root = make_synthetic_coco(tmp_path / "s", num_train=6, num_val=2, image_size=64, seed=5)
    splits = ("train", "val")
    annotations = b"".join((root / "annotations" / f"instances_{s}.json").read_bytes() for s in splits)
    jpegs = b"".join(p.read_bytes() for s in splits for p in sorted((root / s).glob("*.jpg")))
    assert hashlib.sha256(annotations).hexdigest() == "5272bf2e1ddda4d8397002cc1a625faecc0ae06d23dd500dcc031cf31119699b"
    assert hashlib.sha256(jpegs).hexdigest() == "8a2266db1d6f0fbf86bbaa1a3009327f1b6ea933610f6424ddc7db47ea7f16d5"


def test_category_map_round_trip_with_sparse_ids():
    cats = CategoryMap.from_coco([{"id": 7, "name": "c"}, {"id": 1, "name": "a"}, {"id": 3, "name": "b"}])
    assert cats.category_ids == [1, 3, 7] and cats.names == ["a", "b", "c"]
    assert [cats.to_label(i) for i in (1, 3, 7)] == [0, 1, 2]
    assert all(cats.to_category(cats.to_label(i)) == i for i in (1, 3, 7))
    assert cats.id2label == {0: "a", 1: "b", 2: "c"} and cats.label2id["c"] == 2
    with pytest.raises(KeyError):
        cats.to_label(2)
    names = CategoryMap.from_names(["x", "y"])
    assert names.category_ids == [0, 1] and names.to_label(1) == 1
    with pytest.raises(ValueError):
        CategoryMap([3, 1], ["a", "b"])


def _hub_dataset(tmp_path: Path, name: str, xyxy: bool) -> str:
    """A two-image Hub-style dataset saved as parquet, in cppe-5's (xywh) or detection-datasets/coco's
    (xyxy, ``bbox_id``, no ``iscrowd``) layout."""
    id_key = "bbox_id" if xyxy else "id"
    objects = {id_key: datasets.Value("int64"), "area": datasets.Value("int64"),
               "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
               "category": datasets.ClassLabel(names=["mask", "gloves", "goggles"])}  # fmt: skip
    features = datasets.Features({"image_id": datasets.Value("int64"), "image": datasets.Image(),
                                  "width": datasets.Value("int32"), "height": datasets.Value("int32"),
                                  "objects": datasets.Sequence(objects)})  # fmt: skip
    boxes = [[10.0, 5.0, 20.0, 30.0], [0.0, 0.0, 8.0, 4.0]]  # xywh
    if xyxy:
        boxes = [[x, y, x + w, y + h] for x, y, w, h in boxes]
    rows = {
        "image_id": [11, 12],
        "image": [PIL.Image.new("RGB", (48, 40), (90, 10, 200))] * 2,
        "width": [48, 48],
        "height": [40, 40],
        "objects": [{id_key: [5, 6], "area": [600, 32], "bbox": boxes, "category": [2, 0]},
                    {id_key: [], "area": [], "bbox": [], "category": []}],  # fmt: skip
    }
    folder = tmp_path / name
    datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    return str(folder)


@pytest.mark.parametrize("bbox_format", ["xywh", "xyxy"])
def test_hub_loader_normalises_to_the_coco_schema(tmp_path, bbox_format):
    path = _hub_dataset(tmp_path, bbox_format, xyxy=bbox_format == "xyxy")
    cache_dir = str(tmp_path / "cache")
    ds, categories = load_hub_detection_dataset(path, "train", bbox_format=bbox_format, cache_dir=cache_dir)
    assert ds.features == DETECTION_FEATURES
    assert categories.names == ["mask", "gloves", "goggles"] and categories.category_ids == [0, 1, 2]
    objs = ds[0]["objects"]
    np.testing.assert_allclose(objs["bbox"], [[10, 5, 20, 30], [0, 0, 8, 4]])
    assert objs["category"] == [2, 0] and objs["id"] == [5, 6] and objs["iscrowd"] == [0, 0]
    assert ds[1]["objects"]["bbox"] == [] and ds[0]["image"].size == (48, 40)
    example = DetectionDataset(ds, categories, build_eval_transform(40, 80))[0]
    assert example["labels"]["class_labels"].tolist() == [2, 0]
    assert HUB_DATASETS["cppe-5"].bbox_format == "xywh" and HUB_DATASETS["cppe-5"].eval_split == "test"
    assert HUB_DATASETS["detection-datasets/coco"].bbox_format == "xyxy"


# --- transforms --------------------------------------------------------------------------------------


def test_detr_size_rule():
    assert detr_resize_shape(480, 640, 800, 1333) == (800, 1066)
    assert detr_resize_shape(640, 480, 800, 1333) == (1066, 800)
    assert detr_resize_shape(100, 1000, 800, 1333) == (133, 1330)  # long edge capped (rounding as DETR)
    assert detr_resize_shape(100, 1000, 800, None) == (800, 8000)


def test_flip_twice_is_identity():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    boxes = np.array([[3.0, 4.0, 20.0, 10.0], [40.0, 0.0, 20.0, 40.0]])
    once = DetrTransform([A.HorizontalFlip(p=1.0)], train=False)(image, boxes, [0, 1])
    twice = DetrTransform([A.HorizontalFlip(p=1.0), A.HorizontalFlip(p=1.0)], train=False)(image, boxes, [0, 1])
    plain = DetrTransform([A.NoOp()], train=False)(image, boxes, [0, 1])
    torch.testing.assert_close(twice["boxes"], plain["boxes"])
    torch.testing.assert_close(twice["pixel_values"], plain["pixel_values"])
    torch.testing.assert_close(once["boxes"][:, 0], 1 - plain["boxes"][:, 0])
    torch.testing.assert_close(once["pixel_values"], plain["pixel_values"].flip(-1))


def test_train_transform_keeps_boxes_on_the_drawn_object():
    image = np.zeros((60, 90, 3), np.uint8)
    image[12:42, 50:80] = 255  # a solid square, xywh (50, 12, 30, 30)
    transform = build_train_transform(**SMALL["train"], seed=0)
    sizes, flipped, cropped, cropped_away = set(), 0, 0, 0
    for _ in range(40):
        out = transform(image, np.array([[50.0, 12.0, 30.0, 30.0]]), np.array([2]))
        height, width = out["size"].tolist()
        assert tuple(out["pixel_values"].shape) == (3, height, width)
        sizes.add((height, width))
        cropped += abs(width / height - 1.5) > 0.05  # only a crop changes the aspect ratio
        bright = unnormalise(out["pixel_values"]).mean(-1) > 128
        if len(out["boxes"]) == 0:  # the crop missed the square
            cropped_away += 1
            assert bright.sum() <= 2
            continue
        assert out["class_labels"].tolist() == [2]
        assert ((out["boxes"] >= 0) & (out["boxes"] <= 1)).all() and (out["boxes"][:, 2:] > 0).all()
        x0, y0, x1, y1 = cxcywh_to_pixels(out["boxes"], height, width)[0]
        ys, xs = np.nonzero(bright)
        np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [x0, y0, x1, y1], atol=1.5)
        flipped += (x0 + x1) / 2 < width / 2  # the square starts on the right half
    assert len(sizes) > 5 and flipped > 5 and cropped > 5  # several scales, flips and crops happened


def test_eval_transform_is_a_fixed_resize():
    image = np.zeros((50, 100, 3), np.uint8)
    out = build_eval_transform(size=64, max_size=200)(image, np.array([[10.0, 10.0, 20.0, 20.0]]), [1])
    assert out["size"].tolist() == [64, 128]
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.2, 0.4, 0.2, 0.4]]))
    # build_transform: the same recipe scaled to one image size, longest edge capped.
    assert build_transform(train=False, image_size=64, max_size=100)(image, [], [])["size"].tolist() == [50, 100]
    train = build_transform(train=True, image_size=64, max_size=100, seed=0)
    assert train.train and all(max(train(image, [], [])["size"].tolist()) <= 100 for _ in range(10))


def test_collate_pads_and_masks():
    def example(h, w, n):
        labels = {"class_labels": torch.zeros(n, dtype=torch.long), "boxes": torch.full((n, 4), 0.5)}
        return {"pixel_values": torch.ones(3, h, w), "labels": labels}

    batch = collate_fn([example(5, 7, 1), None, example(6, 4, 0)])
    assert batch["pixel_values"].shape == (2, 3, 6, 7) and batch["pixel_mask"].shape == (2, 6, 7)
    assert batch["pixel_mask"].dtype == torch.long
    assert batch["pixel_mask"][0].sum() == 35 and batch["pixel_mask"][0, :5, :7].all()
    assert batch["pixel_mask"][1].sum() == 24 and batch["pixel_mask"][1, :6, :4].all()
    torch.testing.assert_close(batch["pixel_values"][:, 0].bool(), batch["pixel_mask"].bool())  # zeros = padding
    assert [len(lab["boxes"]) for lab in batch["labels"]] == [1, 0]
    assert collate_fn([None, None]) is None


# --- bad data ----------------------------------------------------------------------------------------


def _bad_folder(root: Path, category_of_last: int = 1) -> Path:
    """64x48 images: 1 has a good, a zero-area, an outside-the-image and a crowd box; 2 is a corrupt
    file; 3 has no annotations."""
    (root / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    image = np.zeros((48, 64, 3), np.uint8)
    image[10:20, 10:30] = 255
    PIL.Image.fromarray(image).save(root / "val" / "a.png")
    (root / "val" / "b.png").write_bytes(b"this is not a png")
    PIL.Image.fromarray(image).save(root / "val" / "c.png")
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 10], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # zero area
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [40, 30, 50, 40], "iscrowd": 0},  # outside
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 64, 48], "iscrowd": 1},  # crowd
        {"id": 5, "image_id": 2, "category_id": category_of_last, "bbox": [1, 1, 5, 5], "iscrowd": 0},
    ]
    coco = {
        "images": [{"id": i, "file_name": f, "width": 64, "height": 48}
                   for i, f in ((1, "a.png"), (2, "b.png"), (3, "c.png"))],  # fmt: skip
        "annotations": anns,
        "categories": [{"id": 1, "name": "one"}, {"id": 3, "name": "three"}],
    }
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    return root


def test_bad_data_is_fixed_skipped_and_counted(tmp_path, caplog):
    data = load_coco_folder(_bad_folder(tmp_path), "val")
    train = DetectionDataset(data.dataset, data.categories, build_train_transform(**SMALL["train"], seed=0))
    stats = train.stats
    assert (stats.images, stats.images_without_objects, stats.objects) == (3, 1, 3)
    assert (stats.clipped, stats.dropped_zero_area, stats.crowd_ignored) == (1, 1, 1)
    assert stats.as_dict()["skipped_images"] == 0  # not read yet

    with caplog.at_level(logging.WARNING):
        assert train[1] is None
    assert "b.png" in caplog.text and "image_id 2" in caplog.text
    assert train[1] is None and train.stats.skipped_images == 1  # distinct images, not reads

    assert train[2]["labels"]["boxes"].shape == (0, 4)  # no annotations: kept, empty targets
    assert set(train[0]["labels"]["class_labels"].tolist()) <= {0, 1} and "crowd_boxes" not in train[0]["labels"]

    evaluation = DetectionDataset(data.dataset, data.categories, build_eval_transform(48, 64))
    labels = evaluation[0]["labels"]
    assert labels["class_labels"].tolist() == [1, 0]  # category 3 -> label 1; zero-area box gone
    assert labels["orig_size"].tolist() == [48, 64] and labels["size"].tolist() == [48, 64]
    # The outside box (40, 30, 50, 40) is clipped to (40, 30)-(64, 48).
    np.testing.assert_allclose(cxcywh_to_pixels(labels["boxes"], 48, 64)[1], [40, 30, 64, 48], atol=1e-4)
    np.testing.assert_allclose(cxcywh_to_pixels(labels["crowd_boxes"], 48, 64), [[0, 0, 64, 48]], atol=1e-4)
    assert labels["crowd_class_labels"].tolist() == [0]


def test_unreadable_images_counted_across_loader_workers(tmp_path):
    data = load_coco_folder(_bad_folder(tmp_path), "val")
    dataset = DetectionDataset(data.dataset, data.categories, build_eval_transform(48, 64))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate_fn)
    (batch,) = list(loader)
    assert [lab["image_id"].item() for lab in batch["labels"]] == [1, 3]
    assert dataset.stats.skipped_images == 1


def test_unknown_category_id_raises_naming_the_annotation(tmp_path):
    with pytest.raises(ValueError, match=r"annotation 5 \(image 2\).*category id 99"):
        load_coco_folder(_bad_folder(tmp_path, category_of_last=99), "val")
    # Same for a dataset whose categories do not match the map it is used with.
    data = load_coco_folder(_bad_folder(tmp_path / "ok"), "val")
    with pytest.raises(ValueError, match=r"annotation 1 \(image 1\).*category id 3"):
        DetectionDataset(data.dataset, CategoryMap([1], ["one"]), build_eval_transform(48, 64))


def test_loader_workers_draw_different_augmentations(tmp_path):
    root = make_synthetic_coco(tmp_path, num_train=1, num_val=0, image_size=64, empty_fraction=0.0)
    data = load_coco_folder(root, "train")
    same_image = data.dataset.select([0, 0, 0, 0])
    dataset = DetectionDataset(same_image, data.categories, build_train_transform(**SMALL["train"], seed=0))
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_fn)
    first, second = list(loader)[:2]  # batch i comes from worker i
    assert not torch.equal(first["labels"][0]["boxes"], second["labels"][0]["boxes"])


def test_flip_augmentation_flips_at_the_evaluation_size():
    image = np.zeros((60, 90, 3), np.uint8)
    image[12:42, 50:80] = 255  # a solid square on the right half
    transform = build_transform(train=True, image_size=64, max_size=100, seed=0, augmentation="flip")
    centres = []
    for _ in range(30):
        out = transform(image, np.array([[50.0, 12.0, 30.0, 30.0]]), np.array([1]))
        assert out["size"].tolist() == [64, 96]  # always the evaluation resize
        centres.append(round(float(out["boxes"][0, 0]), 4))
    # unflipped centre (65 / 90) and its mirror image both occur, nothing else
    assert set(centres) == {round(65 / 90, 4), round(1 - 65 / 90, 4)}
    with pytest.raises(ValueError, match="augmentation"):
        build_transform(train=True, image_size=64, augmentation="mosaic")


def test_seeded_dataset_augments_by_epoch_and_index_alone(tmp_path):
    root = make_synthetic_coco(tmp_path, num_train=3, num_val=0, image_size=64, empty_fraction=0.0)
    data = load_coco_folder(root, "train")

    def boxes(dataset, epoch, index):
        dataset.set_epoch(epoch)
        return dataset[index]["labels"]["boxes"]

    transform = build_train_transform(**SMALL["train"])
    first = DetectionDataset(data.dataset, data.categories, transform, seed=5)
    second = DetectionDataset(data.dataset, data.categories, build_train_transform(**SMALL["train"]), seed=5)
    a = [boxes(first, epoch, i) for epoch in range(3) for i in range(3)]
    b = [boxes(second, epoch, i) for epoch in reversed(range(3)) for i in reversed(range(3))][::-1]
    for x, y in zip(a, b):  # same (epoch, index) -> same augmentation, whatever the order of calls
        torch.testing.assert_close(x, y)
    assert any(not torch.equal(boxes(first, 0, 0), boxes(first, epoch, 0)) for epoch in range(1, 6))


def test_a_detector_that_ignores_the_image_scores_near_zero_on_synthetic_data(tmp_path):
    """The synthetic task is real: the best image-blind guess (the most common training boxes and
    classes, the same for every image) gets almost no mAP, while the default run reaches ~0.7."""
    from hf_detr.evaluation import CocoEvaluator

    root = make_synthetic_coco(tmp_path, num_train=300, num_val=60, seed=2)
    train, categories = load_coco_folder(root, "train")
    val, _ = load_coco_folder(root, "val")
    view = val.select_columns(["image_id", "width", "height", "objects"])
    objects = [o for row in train.select_columns(["objects"]) for o in zip(row["objects"]["bbox"], row["objects"]["category"])]
    # 30 guesses: training boxes on a coarse grid, most frequent first, each with its class
    grid = {}
    for (x, y, w, h), category in objects:
        key = (round(x / 16), round(y / 16), round(w / 16), round(h / 16), category)
        grid[key] = grid.get(key, 0) + 1
    guesses = sorted(grid, key=grid.get, reverse=True)[:30]
    boxes = torch.tensor([[x * 16, y * 16, (x + w) * 16, (y + h) * 16] for x, y, w, h, _ in guesses], dtype=torch.float32)
    labels = torch.tensor([categories.to_label(c) for *_, c in guesses])
    scores = torch.linspace(1.0, 0.1, len(guesses))
    evaluator = CocoEvaluator.from_examples(view, label_to_category=categories)
    image_ids = [row["image_id"] for row in view]
    evaluator.update(image_ids, [{"scores": scores, "labels": labels, "boxes": boxes}] * len(image_ids))
    assert evaluator.compute()["map"] < 0.05


def _hub_folder(tmp_path, rows, features):
    import datasets

    folder = tmp_path / "hub"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "data" / "train.parquet"))
    return str(folder)


def test_hub_schemas_other_spellings_sizes_from_the_images_and_integer_classes(tmp_path):
    """Rows without width / height (read from the image, EXIF orientation applied), the `bboxes` / `labels`
    spellings of the object fields, integer class ids named by categories= (train.py --label_names)."""
    import io

    import datasets
    from PIL import Image

    from hf_detr.data import CategoryMap, load_hub_detection_dataset

    def jpeg(width, height, orientation=None):
        buffer = io.BytesIO()
        exif = Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, "JPEG", exif=exif)
        return {"bytes": buffer.getvalue(), "path": None}

    features = datasets.Features({
        "image": datasets.Image(),
        "objects": datasets.Sequence({"bboxes": datasets.Sequence(datasets.Value("float32"), length=4), "labels": datasets.Value("int64")}),
    })  # fmt: skip
    rows = [
        {"image": jpeg(80, 60), "objects": {"bboxes": [[2.0, 3.0, 10.0, 12.0]], "labels": [1]}},
        {"image": jpeg(80, 60, orientation=6), "objects": {"bboxes": [[1.0, 1.0, 5.0, 5.0]], "labels": [0]}},  # shown 60 x 80
    ]
    folder = _hub_folder(tmp_path, rows, features)
    with pytest.raises(ValueError, match=r"objects\.labels holds integer class ids without class names .*--label_names"):
        load_hub_detection_dataset(folder, "train")
    data = load_hub_detection_dataset(folder, "train", categories=CategoryMap.from_names(["cat", "dog"]))
    assert data.dataset["width"] == [80, 60] and data.dataset["height"] == [60, 80]
    assert data.dataset[0]["objects"]["bbox"] == [[2.0, 3.0, 10.0, 12.0]] and data.dataset[0]["objects"]["category"] == [1]
    assert data.categories.names == ["cat", "dog"]
    # trains: the sizes match the decoded (displayed) images
    dataset = DetectionDataset(data.dataset, data.categories, build_transform(train=False, image_size=64, max_size=64))
    assert all(dataset[i] is not None for i in range(2)) and dataset.stats.size_mismatch == 0


@pytest.mark.parametrize(
    "objects, message",
    [
        ({"box": [[1.0, 1.0, 5.0, 5.0]], "category": [0]}, r"objects has none of the fields \['bbox', 'bboxes'\]"),
        ({"bbox": [[1.0, 1.0, 5.0, 5.0]], "kind": [0]}, r"objects has none of the fields \['category', 'label', 'labels', 'category_id'\]"),
        ({"bbox": [[1.0, 1.0, 5.0, 5.0]], "category": ["cat"]}, r"objects\.category must hold class ids"),
    ],
)
def test_hub_schema_errors_name_the_column(tmp_path, objects, message):
    from PIL import Image

    from hf_detr.data import load_hub_detection_dataset

    rows = [{"image": Image.new("RGB", (32, 32)), "width": 32, "height": 32, "objects": objects}]
    folder = _hub_folder(tmp_path, rows, None)
    with pytest.raises(ValueError, match=message):
        load_hub_detection_dataset(folder, "train")


def test_default_splits_are_the_datasets_own(tmp_path):
    make_synthetic_coco(tmp_path / "coco", num_train=1, num_val=1, image_size=32)
    assert default_splits(tmp_path / "coco") == ("train", "val")  # the folder's own splits
    assert default_splits("cppe-5") == ("train", "test") and default_splits("detection-datasets/coco") == ("train", "val")
    assert default_splits("someone/unknown") == ("train", "validation")


def test_load_splits_holds_out_part_of_the_training_split_only_when_no_evaluation_split_was_named(tmp_path, caplog):
    root = make_synthetic_coco(tmp_path / "coco", num_train=8, num_val=2, image_size=32)
    splits = load_splits(root, "train", "val")
    assert (len(splits.train), len(splits.eval), splits.eval_split) == (8, 2, "val")
    (root / "annotations" / "instances_val.json").unlink()  # a dataset with a training split only
    with caplog.at_level(logging.WARNING):
        held_out = load_splits(root, "train", train_val_split=0.25, seed=1)
    assert (len(held_out.train), len(held_out.eval), held_out.eval_split) == (6, 2, "train[held out 0.25]")
    assert not set(held_out.train["image_id"]) & set(held_out.eval["image_id"])
    assert "has no 'val2017' split" in caplog.text
    with pytest.raises(FileNotFoundError):  # a split asked for by name must exist
        load_splits(root, "train", "val")


def test_the_built_in_dataset_is_written_once_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DETR_CACHE", str(tmp_path))
    root = synthetic_dataset(4, 2, image_size=32)
    assert root == tmp_path / "synthetic-4-2-32px" and len(load_coco_folder(root, "train").dataset) == 4
    marker = (root / "synthetic_done.json").stat().st_mtime_ns
    assert synthetic_dataset(4, 2, image_size=32) == root and (root / "synthetic_done.json").stat().st_mtime_ns == marker
    assert synthetic_dataset(4, 2).name == "synthetic-4-2"  # the built-in run's 128 pixels: no suffix

    # Each style in a folder of its own: neither set overwrites the other, nor is read for the other.
    clutter = synthetic_dataset(4, 2, image_size=32, style="clutter")
    assert clutter == tmp_path / "synthetic-clutter-4-2-32px" and synthetic_dataset(4, 2, image_size=32) == root
    assert load_coco_folder(clutter, "train").categories.names == ["star", "ring", "diamond", "bar"]
    assert load_coco_folder(root, "train").categories.names == ["rectangle", "ellipse", "triangle"]
    assert (root / "synthetic_done.json").stat().st_mtime_ns == marker


# --- splits of a local COCO folder ----------------------------------------------------------------------


def test_a_coco_folders_own_splits_are_found_and_a_missing_one_is_named(tmp_path):
    """hf_detr's own layout (instances_train.json, instances_val.json) trains without --train_split /
    --eval_split; COCO's own names come first; a split the folder lacks is an error listing the ones it has."""
    from accelerate import PartialState

    from conftest import load_train_script
    from hf_detr.data import coco_folder_splits, default_splits

    root = make_synthetic_coco(tmp_path / "ours", num_train=4, num_val=2, image_size=32)
    assert coco_folder_splits(root) == ["train", "val"] and default_splits(root) == ("train", "val")
    train = load_train_script()
    args = train.parse_args(["--dataset_name", str(root)])
    (train_data, eval_data), categories, _ = train.load_data(args, PartialState())
    assert (args.train_split, args.eval_split, len(train_data), len(eval_data)) == ("train", "val", 4, 2)

    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017", "train"):
        (coco / "annotations" / f"instances_{split}.json").write_text("{}")
    assert default_splits(coco) == ("train2017", "val2017")
    assert default_splits("detection-datasets/coco") == ("train", "val") and default_splits("user/other") == ("train", "validation")
    with pytest.raises(FileNotFoundError, match=(
        r"no COCO annotation file \S*instances_test\.json: the splits of \S*ours are \['train', 'val'\] "
        r"\(annotations/instances_<split>\.json\); name one with --train_split / --eval_split"
    )):  # fmt: skip
        load_coco_folder(root, "test")


def test_images_with_more_objects_than_queries_are_warned_about_and_counted(tmp_path, caplog):
    """The matcher pairs each query with at most one object: with 3 queries, the 4th and 5th objects of an
    image are never learned. Crowd boxes are not targets and do not count."""
    def objects(n, crowd=0):
        boxes = [[2.0 * i, 2.0 * i, 5.0, 5.0] for i in range(n + crowd)]
        return {"id": list(range(n + crowd)), "bbox": boxes, "category": [1] * (n + crowd), "area": [25.0] * (n + crowd),
                "iscrowd": [0] * n + [1] * crowd}  # fmt: skip

    rows = {"image": [None] * 3, "image_id": [7, 8, 9], "width": [64] * 3, "height": [48] * 3,
            "objects": [objects(5), objects(3, crowd=2), objects(4)]}  # fmt: skip
    dataset = DetectionDataset(datasets.Dataset.from_dict(rows, features=DETECTION_FEATURES), CategoryMap([1], ["a"]),
                               build_eval_transform(48, 64))  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert dataset.check_num_queries(3) == 2
    assert dataset.stats.as_dict()["images_over_num_queries"] == 2
    assert (
        "2 training images have more objects than the model's 3 queries (num_queries), e.g. image 7 (5), image 9 (4): "
        "the objects beyond 3 in an image are never matched, so never learned; the most, 5, are in image 7"
    ) in caplog.text
    caplog.clear()
    assert dataset.check_num_queries(5) == 0 and dataset.stats.images_over_num_queries == 0 and not caplog.text
