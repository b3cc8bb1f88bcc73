"""hf_detr.labels: a model's labels matched to a dataset's categories by class name, and scripts/evaluate.py
scoring the classes a checkpoint predicts, whatever ids or order another copy of the dataset gives them."""

import importlib.util
import json
import logging
from pathlib import Path

import datasets
import pytest

from hf_detr.data import CategoryMap
from hf_detr.labels import class_head_rows, label_names, match_labels

ROOT = Path(__file__).resolve().parents[1]
NAMES = {0: "cat", 1: "dog", 2: "bird"}


def test_same_classes_under_other_ids_match_by_name(caplog):
    """A checkpoint trained on a COCO folder (ids 1, 3, 7) scores a Hub copy (ClassLabel 0-2, same names)."""
    hub = CategoryMap.from_names(["cat", "dog", "bird"])
    with caplog.at_level(logging.WARNING):
        assert match_labels(NAMES, hub, category_ids=[1, 3, 7]) == [0, 1, 2]
    assert "category ids differ from the dataset's for the same class names; matched by name ('cat': 1 there, 0 here" in caplog.text


def test_names_in_another_order_match_by_name_and_are_warned_about(caplog):
    swapped = CategoryMap([1, 3, 7], ["dog", "cat", "bird"])
    with caplog.at_level(logging.WARNING):
        assert match_labels(NAMES, swapped, category_ids=[1, 3, 7]) == [3, 1, 7]
    assert "matched by name ('cat': 1 there, 3 here, 'dog': 3 there, 1 here)" in caplog.text
    # and without category ids in the checkpoint (label i would have been the i-th category)
    assert match_labels(NAMES, swapped) == [3, 1, 7]
    # names compare without case and surrounding spaces; the same ids and order say nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert match_labels(NAMES, CategoryMap([1, 3, 7], [" Cat", "DOG", "bird "]), category_ids=[1, 3, 7]) == [1, 3, 7]
    assert not caplog.text


def test_classes_on_one_side_only_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        assert match_labels(NAMES, CategoryMap([4, 5], ["dog", "fish"]), model="ckpt", dataset="split") == [None, 4, None]
    assert "ckpt's classes ['bird', 'cat'] are not classes of split: their detections are not scored" in caplog.text
    assert "split's classes ['fish'] are not classes of ckpt: it cannot detect them (AP 0)" in caplog.text


def test_no_class_in_common_or_an_ambiguous_name_is_an_error():
    with pytest.raises(ValueError, match=r"none of ckpt's classes \['cat', 'dog', 'bird'\] is a class of split \['car', 'bus'\]"):
        match_labels(NAMES, CategoryMap([1, 2], ["car", "bus"]), model="ckpt", dataset="split")
    with pytest.raises(ValueError, match=r"cannot tell which class \['cat'\] is: the name is used twice"):
        match_labels(NAMES, CategoryMap([1, 2], ["cat", "Cat"]))
    # a repeated name the dataset does not have is harmless (the original DETR's "N/A" slots)
    assert match_labels({0: "N/A", 1: "cat", 2: "N/A"}, CategoryMap([5], ["cat"])) == [None, 5, None]


def test_unnamed_labels_fall_back_to_ids_then_order():
    placeholders = {0: "LABEL_0", 1: "LABEL_1"}
    assert label_names(placeholders) is None and label_names({1: "b", 0: "a"}) == ["a", "b"]
    categories = CategoryMap([2, 9], ["a", "b"])
    assert match_labels(placeholders, categories, category_ids=[9, 2]) == [9, 2]
    assert match_labels(placeholders, categories) == [2, 9]  # same count: the dataset's order
    assert match_labels({i: f"LABEL_{i}" for i in range(4)}, categories) == [0, 1, 2, 3]  # labels as ids


# --- training from a checkpoint: the class head rows each dataset class continues ------------------------


def test_class_head_rows_follow_the_dataset_classes_by_name(caplog):
    """The same rule as evaluation: the checkpoint's classes in another order (or under other ids) keep their rows;
    ids alone would train the 'cat' row as 'bird'."""
    with caplog.at_level(logging.WARNING):
        assert class_head_rows(NAMES, CategoryMap([1, 3, 7], ["bird", "cat", "dog"]), [4, 5, 6], model="ckpt", dataset="split") == [2, 0, 1]
    assert (
        "ckpt's classes are in another order than split's: the class head rows follow the classes by name "
        "('bird': label 2 there, 0 here, 'cat': label 0 there, 1 here, 'dog': label 1 there, 2 here)"
    ) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # other ids, same order (a COCO folder and its Hub copy): nothing moves
        assert class_head_rows(NAMES, CategoryMap.from_names(["Cat", "dog", "bird"]), category_ids=[1, 3, 7]) == [0, 1, 2]
    assert not caplog.text


def test_class_head_rows_of_classes_on_one_side_are_dropped_or_start_afresh(caplog):
    with caplog.at_level(logging.INFO):
        assert class_head_rows(NAMES, CategoryMap([1, 2], ["dog", "fish"]), model="ckpt", dataset="split") == [1, None]
        # no class in common: fine-tuning to new classes (an error in evaluation), the whole head starts afresh
        assert class_head_rows(NAMES, CategoryMap([1, 2], ["car", "bus"]), model="ckpt", dataset="split") == [None, None]
    assert "ckpt's classes ['cat', 'bird'] are not classes of split: their class head rows are dropped" in caplog.text
    assert "split's classes ['fish'] are not classes of ckpt: their class head rows start afresh" in caplog.text
    assert "none of ckpt's classes ['cat', 'dog', 'bird'] is a class of split ['car', 'bus']: its class head starts afresh" in caplog.text
    with pytest.raises(ValueError, match=r"cannot tell which class \['cat'\] is: the name is used twice"):
        class_head_rows(NAMES, CategoryMap([1, 2], ["cat", "Cat"]))


def test_class_head_rows_without_names_follow_ids_then_order():
    placeholders = {0: "LABEL_0", 1: "LABEL_1"}
    categories = CategoryMap([2, 9], ["a", "b"])
    assert class_head_rows(placeholders, categories, category_ids=[9, 2]) == [1, 0]
    assert class_head_rows(placeholders, categories, category_ids=[9, 4]) == [None, 0]
    assert class_head_rows(placeholders, categories) == [0, 1]  # same count: the dataset's order
    assert class_head_rows({i: f"LABEL_{i}" for i in range(4)}, categories) == [None, None]  # afresh


# --- scripts/evaluate.py on copies of one split -------------------------------------------------------


def evaluate_script():
    spec = importlib.util.spec_from_file_location("hf_detr_evaluate_script", ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def named_checkpoint(tmp_path_factory):
    """A checkpoint trained (as train.py records it) on categories 1, 3, 7 named cat, dog, bird, and a split
    whose ground truth is its own predictions: scored right, it has mAP 1."""
    from test_evaluation import CATEGORY_IDS, self_labelled_setup

    model, processor, examples = self_labelled_setup(num_images=4)
    assert CATEGORY_IDS == [1, 3, 7]
    model.config.id2label, model.config.label2id = dict(NAMES), {v: k for k, v in NAMES.items()}
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, examples


def coco_copy(root: Path, examples, categories: dict[int, str], category_of: dict[str, int]) -> Path:
    """The examples as a COCO folder whose category ids are `categories` (id -> name); an object of class
    `name` gets the id `category_of[name]`."""
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    images, annotations = [], []
    for example in examples:
        file_name = f"{example['image_id']}.png"
        example["image"].save(root / "val" / file_name)
        images.append({"id": example["image_id"], "file_name": file_name, "width": example["width"], "height": example["height"]})
        for box, category in zip(example["objects"]["bbox"], example["objects"]["category"]):
            name = NAMES[[1, 3, 7].index(category)]
            annotations.append({"id": len(annotations) + 1, "image_id": example["image_id"], "bbox": box,
                                "category_id": category_of[name], "iscrowd": 0})  # fmt: skip
    coco = {"images": images, "annotations": annotations, "categories": [{"id": i, "name": n} for i, n in categories.items()]}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    return root


def hub_copy(root: Path, examples) -> Path:
    """The examples as a Hub-schema parquet dataset with a ClassLabel [cat, dog, bird] (ids 0-2)."""
    features = datasets.Features({
        "image": datasets.Image(), "image_id": datasets.Value("int64"), "width": datasets.Value("int64"),
        "height": datasets.Value("int64"),
        "objects": datasets.Sequence({"bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                                      "category": datasets.ClassLabel(names=list(NAMES.values()))}),
    })  # fmt: skip
    rows = [
        {**{k: example[k] for k in ("image", "image_id", "width", "height")},
         "objects": {"bbox": example["objects"]["bbox"], "category": [[1, 3, 7].index(c) for c in example["objects"]["category"]]}}
        for example in examples
    ]  # fmt: skip
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(root / "data" / "val.parquet"))
    return root


@pytest.mark.parametrize("copy", ["same ids", "Hub copy with ClassLabel ids", "names in another order"])
def test_evaluate_script_scores_the_classes_by_name(named_checkpoint, tmp_path, copy, caplog):
    folder, examples = named_checkpoint
    if copy == "same ids":
        dataset = coco_copy(tmp_path / "coco", examples, {1: "cat", 3: "dog", 7: "bird"}, {"cat": 1, "dog": 3, "bird": 7})
    elif copy == "Hub copy with ClassLabel ids":
        dataset = hub_copy(tmp_path / "hub", examples)
    else:  # the same ids, the names of 1 and 3 swapped: a cat is category 3 here
        dataset = coco_copy(tmp_path / "coco", examples, {1: "dog", 3: "cat", 7: "bird"}, {"cat": 3, "dog": 1, "bird": 7})
    argv = ["--model_name_or_path", str(folder), "--dataset_name", str(dataset), "--dataloader_num_workers", "0"]
    if copy.startswith("Hub"):  # datasets names a val.parquet file's split so; a COCO folder's "val" is found
        argv += ["--eval_split", "validation"]
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_script().main(argv)
    assert metrics["map"] == pytest.approx(1.0), copy
    assert metrics["map_cat"] == pytest.approx(1.0) or metrics["map_cat"] == -1.0  # per class, by the split's names
    if copy != "same ids":
        assert "category ids differ from" in caplog.text and "matched by name" in caplog.text
