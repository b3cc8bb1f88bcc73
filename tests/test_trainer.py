"""transformers' Trainer path, as its object-detection guide writes it (the image processor's COCO annotations
format, its collate_fn, `compute_metrics` over un-concatenated batches with `eval_do_concat_batches=False`),
trains and evaluates hf_detr; `TrainingArguments(gradient_checkpointing=True)` gives the same training."""

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.utils import ModelOutput

import hf_detr
from conftest import tiny_config
from hf_detr.data import load_coco_folder, make_synthetic_coco
from hf_detr.evaluation import CocoEvaluator
from hf_detr.images import decode_image


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = make_synthetic_coco(tmp_path_factory.mktemp("coco"), num_train=8, num_val=4, image_size=64, seed=1)
    train, categories = load_coco_folder(root, "train")
    val, _ = load_coco_folder(root, "val")
    return train, val, categories


def guide_datasets(coco, processor):
    train, val, categories = coco

    def transform(batch):  # the guide's augment_and_transform_batch, without augmentation
        images = [np.asarray(decode_image(image)) for image in batch["image"]]
        annotations = []
        for image_id, objects in zip(batch["image_id"], batch["objects"]):
            annotations.append({"image_id": image_id, "annotations": [
                {"image_id": image_id, "category_id": categories.to_label(category), "bbox": list(bbox), "area": area, "iscrowd": 0}
                for bbox, category, area in zip(objects["bbox"], objects["category"], objects["area"])
            ]})  # fmt: skip
        return processor(images=images, annotations=annotations, return_tensors="pt")

    return train.with_transform(transform), val.with_transform(transform)


def collate_fn(batch):  # the guide's
    data = {"pixel_values": torch.stack([x["pixel_values"] for x in batch]), "labels": [x["labels"] for x in batch]}
    if "pixel_mask" in batch[0]:
        data["pixel_mask"] = torch.stack([x["pixel_mask"] for x in batch])
    return data


def compute_metrics_for(processor, num_labels):
    """The guide's compute_metrics, with pycocotools (hf_detr's CocoEvaluator) for torchmetrics."""

    @torch.no_grad()
    def compute_metrics(evaluation_results):
        examples, image_ids, results = [], [], []
        for batch_predictions, batch_targets in zip(evaluation_results.predictions, evaluation_results.label_ids):
            logits, pred_boxes = batch_predictions[1], batch_predictions[2]  # after loss_dict, as for DETR
            assert logits.shape[-1] == num_labels + 1 and pred_boxes.shape[-1] == 4
            sizes = torch.tensor(np.array([target["orig_size"] for target in batch_targets]))
            output = ModelOutput(logits=torch.tensor(logits), pred_boxes=torch.tensor(pred_boxes))
            results += processor.post_process_object_detection(output, threshold=0.0, target_sizes=sizes)
            for target in batch_targets:
                height, width = (int(v) for v in target["orig_size"])
                boxes = np.asarray(target["boxes"]) * [width, height, width, height]  # cxcywh 0..1 -> pixels
                xywh = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, 2:]], axis=1) if len(boxes) else boxes
                image_ids.append(int(np.asarray(target["image_id"]).reshape(-1)[0]))  # the processor keeps it as [id]
                examples.append({"image_id": image_ids[-1], "width": width, "height": height,
                                 "objects": {"bbox": xywh.tolist(), "category": [int(c) for c in target["class_labels"]]}})  # fmt: skip
        evaluator = CocoEvaluator.from_examples(examples, categories=range(num_labels))
        evaluator.update(image_ids, results)
        return evaluator.compute()

    return compute_metrics


def training_arguments(output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, per_device_eval_batch_size=2, max_steps=3,
        learning_rate=1e-4, weight_decay=1e-4, max_grad_norm=0.1, remove_unused_columns=False,
        eval_do_concat_batches=False, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    return TrainingArguments(**{**kwargs, **overrides})


def test_trainer_trains_and_evaluates_hf_detr_as_the_object_detection_guide_does(coco, tmp_path):
    categories = coco[2]
    processor = hf_detr.HfDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    config = tiny_config(num_labels=categories.num_labels, id2label=categories.id2label, label2id=categories.label2id)
    torch.manual_seed(0)
    model = hf_detr.HfDetrForObjectDetection(config)
    train, val = guide_datasets(coco, processor)
    trainer = Trainer(
        model=model, args=training_arguments(tmp_path), train_dataset=train, eval_dataset=val,
        processing_class=processor, data_collator=collate_fn,
        compute_metrics=compute_metrics_for(processor, categories.num_labels),
    )  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(np.isfinite(losses))
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])
    for key in ("eval_map", "eval_map_50", "eval_mar_100"):
        assert 0 <= metrics[key] <= 1, key
    trainer.save_model(tmp_path / "saved")
    assert isinstance(hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path / "saved"), hf_detr.HfDetrForObjectDetection)


def test_training_arguments_gradient_checkpointing_gives_the_same_training(coco, tmp_path):
    categories = coco[2]
    processor = hf_detr.HfDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    config = tiny_config(num_labels=categories.num_labels, freeze_backbone_stages=0)
    torch.manual_seed(0)
    initial = hf_detr.HfDetrForObjectDetection(config).state_dict()
    runs = {}
    for checkpointing in (False, True):
        model = hf_detr.HfDetrForObjectDetection(config)
        model.load_state_dict(initial)
        train, _ = guide_datasets(coco, processor)
        args = training_arguments(tmp_path / str(checkpointing), max_steps=2, gradient_checkpointing=checkpointing)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate_fn)
        trainer.train()
        assert trainer.model.is_activation_checkpointing == checkpointing
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[checkpointing] = losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(runs[False][1][n], initial[n]) for n in runs[False][1])  # the steps changed the weights
