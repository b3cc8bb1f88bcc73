"""Which dataset category each of a model's labels means: one rule, by class name, for evaluation
(`scripts/evaluate.py`: `match_labels(config.id2label, dataset_categories, config.category_ids)`, label i of
the checkpoint is that dataset category) and for training from a checkpoint on a dataset (`scripts/train.py
--model_name_or_path`: `class_head_rows`, the checkpoint's class head row each dataset class continues).

A model predicts contiguous labels 0..K-1 named by its `config.id2label`; a dataset has its own category
ids (COCO's sparse 1..90, a ClassLabel's 0..K-1) named in its `CategoryMap`. The same classes can carry
other ids in another copy of a dataset (a COCO folder with ids 1, 3, 7 and its Hub copy with ClassLabel
0-2), and the same ids other classes (a split whose names are in another order): ids alone would score
(or fine-tune) the wrong classes without a word. So names decide, wherever the model has them:

- the model has names (not transformers' placeholders ``LABEL_i``): label i means the dataset category
  of the same name (compared without case or surrounding spaces). A class on one side only is warned
  about: in evaluation the model's is never scored and the dataset's can never be found (AP 0); in
  training the model's row is dropped and the dataset's starts afresh. A name that two categories (or two
  labels) share is a ValueError naming both lists; so is no name in common in evaluation (in training the
  class head then starts afresh: fine-tuning to new classes);
- no names: the model's `category_ids` (hf_detr's checkpoints record them), else the dataset's order when
  the counts agree, else the labels are taken as category ids (the original DETR's 91 COCO id slots).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .data import CategoryMap

logger = logging.getLogger(__name__)

PLACEHOLDER_NAME = re.compile(r"LABEL_\d+")  # transformers' names for labels nobody named


def label_names(id2label: Mapping | None) -> list[str] | None:
    """`config.id2label` as a list in label order, or None when it names nothing (absent, or only
    transformers' ``LABEL_i`` placeholders)."""
    if not id2label:
        return None
    names = [str(id2label[label]) for label in sorted(id2label, key=int)]
    return None if all(PLACEHOLDER_NAME.fullmatch(name) for name in names) else names


def _key(name: str) -> str:
    return name.strip().casefold()


def _index(names: Sequence[str], ids: Sequence[int]) -> tuple[dict[str, int], set[str]]:
    """name key -> id, and the keys that more than one id carries."""
    index, repeated = {}, set()
    for name, id_ in zip(names, ids):
        if _key(name) in index:
            repeated.add(_key(name))
        index.setdefault(_key(name), id_)
    return index, repeated


def match_labels(
    id2label: Mapping | None,
    categories: CategoryMap,
    category_ids: Sequence[int] | None = None,
    model: str = "the checkpoint",
    dataset: str = "the dataset",
) -> list[int | None]:
    """label -> the dataset category id it means (None: a class the dataset does not have), by the rule of
    the module docstring. `id2label` and `category_ids` are the model's (`config.id2label`,
    `config.category_ids`); `model` and `dataset` name the two sides in warnings and errors."""
    names = label_names(id2label)
    if names is None:
        return _match_without_names(id2label, categories, category_ids, model, dataset)
    matched = _match_names(names, categories, model, dataset)
    if all(category is None for category in matched):
        raise ValueError(
            f"none of {model}'s classes {names} is a class of {dataset} {categories.names}: the model was trained "
            "on other classes (labels are matched to categories by name)"
        )
    model_only = sorted({name for name, category in zip(names, matched) if category is None})
    dataset_only = [name for name in categories.names if _key(name) not in {_key(n) for n in names}]
    if model_only:
        logger.warning(f"{model}'s classes {model_only} are not classes of {dataset}: their detections are not scored")
    if dataset_only:
        logger.warning(f"{dataset}'s classes {dataset_only} are not classes of {model}: it cannot detect them (AP 0)")
    by_ids = list(category_ids) if category_ids else list(categories.category_ids) if len(names) == categories.num_labels else None
    if by_ids is not None and by_ids != matched:
        differ = [f"{name!r}: {by_id} there, {category} here" for name, by_id, category in zip(names, by_ids, matched) if by_id != category]
        logger.warning(
            f"{model}'s category ids differ from {dataset}'s for the same class names; matched by name "
            f"({', '.join(differ[:5])}{', ...' if len(differ) > 5 else ''})"
        )
    return matched


def _match_names(names: Sequence[str], categories: CategoryMap, model: str, dataset: str) -> list[int | None]:
    """label -> the dataset category id of the same name (None: none); a name used twice is a ValueError."""
    dataset_index, dataset_repeated = _index(categories.names, categories.category_ids)
    model_index, model_repeated = _index(names, range(len(names)))
    ambiguous = sorted((dataset_repeated & model_index.keys()) | (model_repeated & dataset_index.keys()))
    if ambiguous:
        raise ValueError(
            f"cannot tell which class {ambiguous} is: the name is used twice by {model} ({names}) or by {dataset} "
            f"({categories.names}); class names must be unique to match {model}'s labels to {dataset}'s categories"
        )
    return [dataset_index.get(_key(name)) for name in names]


def class_head_rows(
    id2label: Mapping | None,
    categories: CategoryMap,
    category_ids: Sequence[int] | None = None,
    model: str = "the checkpoint",
    dataset: str = "the dataset",
) -> list[int | None]:
    """Training from a checkpoint on a dataset: dataset label j (its j-th category) -> the checkpoint label whose
    class head row it continues, or None (a class the checkpoint lacks: its row starts afresh), by the rule of
    the module docstring. Checkpoint classes the dataset lacks, and new classes, are warned about; so are
    classes matched in another order (their rows move); other ids for the same classes in the same order
    change nothing. `id2label` and `category_ids` are the checkpoint's config's."""
    names = label_names(id2label)
    if names is not None:
        matched = _match_names(names, categories, model, dataset)
        row_of = {category: label for label, category in enumerate(matched) if category is not None}
        rows = [row_of.get(category) for category in categories.category_ids]
        if not row_of:
            logger.info(f"none of {model}'s classes {names} is a class of {dataset} {categories.names}: its class head starts afresh")
            return rows
        dropped = [name for name, category in zip(names, matched) if category is None]
        new = [name for name, row in zip(categories.names, rows) if row is None]
        moved = [
            f"{name!r}: label {row} there, {label} here" for label, (name, row) in enumerate(zip(categories.names, rows)) if row not in (None, label)
        ]  # fmt: skip
        if dropped:
            logger.warning(f"{model}'s classes {dropped} are not classes of {dataset}: their class head rows are dropped")
        if new:
            logger.warning(f"{dataset}'s classes {new} are not classes of {model}: their class head rows start afresh")
        if moved:
            logger.warning(
                f"{model}'s classes are in another order than {dataset}'s: the class head rows follow the classes by name "
                f"({', '.join(moved[:5])}{', ...' if len(moved) > 5 else ''})"
            )
        return rows
    num_labels = len(id2label) if id2label else len(category_ids or ())
    if category_ids:
        row_of = {category: label for label, category in enumerate(category_ids)}
        logger.info(f"{model} does not name its classes: its category ids {list(category_ids)} are matched to {dataset}'s")
        return [row_of.get(category) for category in categories.category_ids]
    if num_labels == categories.num_labels:
        logger.info(f"{model} does not name its classes: label i is taken as {dataset}'s i-th category {categories.names}")
        return list(range(num_labels))
    logger.info(f"{model} does not name its {num_labels} classes and {dataset} has {categories.num_labels}: its class head starts afresh")
    return [None] * categories.num_labels


def _match_without_names(id2label, categories, category_ids, model, dataset) -> list[int | None]:
    num_labels = len(id2label) if id2label else len(category_ids or ())
    if category_ids:
        unknown = sorted(set(category_ids) - set(categories.category_ids))
        if unknown:
            logger.warning(f"{model}'s category ids {unknown} are not categories of {dataset}: their detections are not scored")
        return [c if c in categories.category_ids else None for c in category_ids]
    if num_labels == categories.num_labels:
        logger.info(f"{model} does not name its classes: label i is taken as {dataset}'s i-th category {categories.names}")
        return list(categories.category_ids)
    logger.warning(
        f"{model} does not name its {num_labels} classes and {dataset} has {categories.num_labels}: "
        "labels are taken as category ids"
    )
    return list(range(num_labels))


__all__ = ["class_head_rows", "label_names", "match_labels"]
