"""hf_detr.training: the run's argument checks, the optimizer and schedule, the non-finite step guard and the
training loop that scripts/train.py and scripts/benchmark_convergence.py share (end to end: tests/test_train.py)."""

import argparse
import functools
import json
import math

import pytest
import torch
from accelerate import Accelerator

import hf_detr
from conftest import tiny_config
from hf_detr import data as detr_data
from hf_detr import training


@functools.cache
def train_script_defaults() -> dict:
    """scripts/train.py's arguments as it parses an empty command line."""
    from conftest import load_train_script

    return vars(load_train_script().parse_args([]))


def run_arguments(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{**train_script_defaults(), **overrides})


BAD_ARGUMENTS = {
    "max_consecutive_nonfinite_steps 0": (dict(max_consecutive_nonfinite_steps=0), "--max_consecutive_nonfinite_steps must be >= 1, got 0"),
    "eval_every_epoch with steps": (dict(eval_every_epoch=True, eval_strategy="steps"), "--eval_every_epoch contradicts --eval_strategy steps"),
    "eval_steps 0": (dict(eval_steps=0), "--eval_steps must be >= 1, got 0"),
    "eval_steps with epoch": (dict(eval_steps=5, eval_strategy="epoch"), "--eval_steps 5 needs --eval_strategy steps, got --eval_strategy epoch"),
    "steps without eval_steps": (dict(eval_strategy="steps"), "--eval_strategy steps needs --eval_steps N"),
    "train_val_split 1": (dict(train_val_split=1.0), r"--train_val_split must be in \(0, 1\), got 1.0"),
    "checkpoints_total_limit 0": (dict(checkpoints_total_limit=0), "--checkpoints_total_limit must be >= 1, got 0"),
    # issue 25: these ran to exit 0 (gradient ascent, or the untrained weights saved as the result) or failed
    # after the first step (ZeroDivisionError, int('abc'))
    "backbone_learning_rate -0.5": (dict(backbone_learning_rate=-0.5), "--backbone_learning_rate must be >= 0, got -0.5"),
    "learning_rate 0": (dict(learning_rate=0.0), "--learning_rate must be > 0, got 0.0"),
    "learning_rate nan": (dict(learning_rate=float("nan")), "--learning_rate must be a finite number, got nan"),
    "num_warmup_steps -5": (dict(num_warmup_steps=-5), "--num_warmup_steps must be >= 0, got -5"),
    "max_train_steps -3": (dict(max_train_steps=-3), "--max_train_steps must be >= 1, got -3"),
    "num_train_epochs 0": (dict(num_train_epochs=0), "--num_train_epochs must be >= 1, got 0"),
    "gradient_accumulation_steps 0": (dict(gradient_accumulation_steps=0), "--gradient_accumulation_steps must be >= 1, got 0"),
    "checkpointing_steps 0": (dict(checkpointing_steps="0"), "--checkpointing_steps must be a number of steps >= 1 or 'epoch', got '0'"),
    "checkpointing_steps abc": (dict(checkpointing_steps="abc"), "--checkpointing_steps must be a number of steps >= 1 or 'epoch', got 'abc'"),
    "per_device_train_batch_size 0": (dict(per_device_train_batch_size=0), "--per_device_train_batch_size must be >= 1, got 0"),
    "weight_decay -1": (dict(weight_decay=-1.0), "--weight_decay must be >= 0, got -1.0"),
    "adam_beta2 1": (dict(adam_beta2=1.0), r"--adam_beta2 must be in \[0, 1\), got 1.0"),
    "adam_epsilon 0": (dict(adam_epsilon=0.0), "--adam_epsilon must be > 0, got 0.0"),
    "max_grad_norm -1": (dict(max_grad_norm=-1.0), "--max_grad_norm must be >= 0, got -1.0"),
    "lr_drop_fraction 1.5": (dict(lr_drop_fraction=1.5), r"--lr_drop_fraction must be in \(0, 1\], got 1.5"),
    "max_train_samples 0": (dict(max_train_samples=0), "--max_train_samples must be >= 1, got 0"),
    "seed -1": (dict(seed=-1), r"--seed must be in \[0, 4294967296\), got -1"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_contradicting_or_out_of_range_arguments_are_refused_by_name(case):
    overrides, message = BAD_ARGUMENTS[case]
    with pytest.raises(ValueError, match=message):
        training.check_run_arguments(run_arguments(**overrides))


def test_eval_strategy_follows_eval_every_epoch_and_eval_steps():
    assert training.check_run_arguments(run_arguments(eval_every_epoch=True)).eval_strategy == "epoch"
    assert training.check_run_arguments(run_arguments(eval_steps=3)).eval_strategy == "steps"
    assert training.check_run_arguments(run_arguments()).eval_strategy is None  # run_defaults decides


def test_checkpointing_steps_become_an_int_or_epoch_and_every_range_names_an_argument():
    assert training.check_run_arguments(run_arguments(checkpointing_steps="500")).checkpointing_steps == 500
    assert training.check_run_arguments(run_arguments(checkpointing_steps="epoch")).checkpointing_steps == "epoch"
    assert training.check_run_arguments(run_arguments(backbone_learning_rate=0.0)).backbone_learning_rate == 0.0  # frozen
    assert set(training.ARGUMENT_RANGES) <= set(train_script_defaults())  # a typo would check nothing


def test_train_script_turns_a_refused_argument_into_a_usage_error(capsys):
    from conftest import load_train_script

    with pytest.raises(SystemExit) as exit_info:
        load_train_script().parse_args(["--eval_strategy", "steps"])
    assert exit_info.value.code == 2 and "--eval_strategy steps needs --eval_steps N" in capsys.readouterr().err


def test_a_training_split_without_a_full_batch_is_refused():
    with pytest.raises(ValueError, match="the training split 'train' of /data/x has no images"):
        training.check_train_split(0, 4, "train", "/data/x")
    with pytest.raises(ValueError, match=r"has 3 images, fewer than one batch \(--per_device_train_batch_size 4\)"):
        training.check_train_split(3, 4, "train", "/data/x")
    training.check_train_split(4, 4, "train", "/data/x")


def test_cpu_is_forced_only_where_accelerate_finds_no_accelerator(monkeypatch):
    """Accelerator(cpu=...) overrides the device accelerate would pick (and `accelerate config`): only where
    accelerate itself finds no accelerator (this machine) is the CPU forced, e.g. an XPU, NPU, HPU or TPU
    host gets its device."""
    from accelerate import PartialState

    assert training.use_cpu()  # CI: no accelerator
    # accelerate's own detection (PartialState.default_device) is what counts; how it finds a device differs
    # between its versions (per-device checks in 1.x before 1.16, torch.accelerator since), so it is replaced whole
    for device_type in ("xpu", "hpu", "mps", "cuda"):  # the device types this torch knows
        with monkeypatch.context() as patch:
            patch.setattr(PartialState, "default_device", property(lambda self, device_type=device_type: torch.device(device_type)))
            assert not training.use_cpu(), device_type
    with monkeypatch.context() as patch:
        patch.setattr(training, "is_torch_xla_available", lambda *args, **kwargs: True)
        assert not training.use_cpu()


def test_the_run_defaults_are_the_built_in_run_and_detrs_recipe():
    built_in, detr = training.run_defaults(built_in=True), training.run_defaults(built_in=False)
    assert (built_in["image_size"], built_in["learning_rate"], built_in["lr_drop_fraction"], built_in["eval_strategy"]) == (128, 5e-4, 0.8, "no")
    assert (detr["image_size"], detr["learning_rate"], detr["backbone_learning_rate"], detr["eval_strategy"]) == (800, 1e-4, 1e-5, "epoch")
    for defaults in (built_in, detr):
        assert (defaults["weight_decay"], defaults["max_grad_norm"], defaults["lr_scheduler_type"]) == (1e-4, 0.1, "step")


def test_optimizer_gives_the_backbone_its_own_learning_rate():
    model = hf_detr.HfDetrForObjectDetection(tiny_config(freeze_backbone_stages=0))
    optimizer = training.build_optimizer(model, 1e-4, 1e-5, weight_decay=0.5)
    rest, backbone = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert rest["lr"] == 1e-4 and backbone["lr"] == 1e-5 and rest["weight_decay"] == 0.5
    assert backbone["params"] and all(names[id(p)].startswith("model.backbone.") for p in backbone["params"])
    assert not any(names[id(p)].startswith("model.backbone.") for p in rest["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_deformable_models_train_where_to_sample_at_a_tenth_of_the_learning_rate():
    """Deformable DETR's 0.1x on the sampling offsets (encoder and decoder) and the queries' reference points."""
    model = hf_detr.HfDetrForObjectDetection(tiny_config(query_type="deformable", encoder_attention="deformable"))
    rest, backbone, sampling = training.build_optimizer(model, 1e-4, 1e-5).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sampling["lr"] == pytest.approx(1e-5) and rest["lr"] == 1e-4 and backbone["lr"] == 1e-5
    sampled = sorted(names[id(p)] for p in sampling["params"])
    layers = model.config.encoder_layers + model.config.decoder_layers
    assert len(sampled) == 2 * layers + 2 and "model.queries.reference_points.weight" in sampled  # weights and biases
    assert all(".sampling_offsets." in n or ".reference_points." in n for n in sampled)
    assert not any(".sampling_offsets." in names[id(p)] for p in rest["params"])


@pytest.mark.parametrize("num_processes", [1, 2])
def test_step_schedule_drops_10x_after_its_step_whatever_the_process_count(num_processes):
    """accelerate steps a prepared scheduler once per process per optimizer step: the schedule counts them."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = training.build_scheduler(optimizer, "step", max_train_steps=10, num_warmup_steps=2, lr_drop_fraction=0.8,
                                         num_processes=num_processes)  # fmt: skip
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for _ in range(num_processes):
            scheduler.step()
    assert training.lr_drop_step(10, 0.8) == 8
    assert rates == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 0.1, 0.1])


def test_step_seeds_depend_only_on_where_the_run_is():
    seeds = {training.step_seed(42, step, micro, process) for step in range(3) for micro in range(2) for process in range(2)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert training.step_seed(42, 7, 0, 1) == training.step_seed(42, 7, 0, 1) != training.step_seed(43, 7, 0, 1)


def live_bn_model():
    return hf_detr.HfDetrForObjectDetection(tiny_config(freeze_backbone_stages=0, freeze_backbone_batch_norm=False))


def test_guard_skips_a_non_finite_step_restores_the_batch_norms_and_stops_after_the_limit():
    accelerator = Accelerator(cpu=True)
    model = live_bn_model()
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    guard = training.NonFiniteStepGuard(accelerator, model, limit=2)
    guard.add_loss(torch.tensor(1.0))
    assert guard.step_ok(torch.tensor(0.5)) and guard.ok
    before = norm.running_mean.clone()
    norm.running_mean.fill_(float("nan"))  # what a forward pass over NaN pixels leaves behind
    guard.add_loss(torch.tensor(float("nan")))
    assert not guard.step_ok(torch.tensor(0.5)) and guard.reason == "non-finite loss"
    assert guard.skip(3, float("nan"), [5, 6]) == {"step": 3, "loss": None, "skipped": "non-finite loss"}
    assert torch.equal(norm.running_mean, before) and guard.skipped == 1
    guard.stop_if_too_many()  # 1 in a row < 2
    guard.add_loss(torch.tensor(1.0))
    assert not guard.step_ok(torch.tensor(float("inf"))) and guard.reason == "non-finite gradient norm"
    guard.skip(4, 1.0, [7])
    with pytest.raises(RuntimeError, match=r"2 optimizer steps in a row had a non-finite gradient norm \(the last: step 4, images \[7\]\)"):
        guard.stop_if_too_many()
    guard.add_loss(torch.tensor(1.0))
    assert guard.step_ok(None) and guard.in_a_row == 0 and guard.skipped == 2  # a good step resets the run of skips


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = detr_data.make_synthetic_coco(tmp_path_factory.mktemp("coco"), num_train=10, num_val=2, image_size=48, seed=1)
    train, categories = detr_data.load_coco_folder(root, "train")
    transform = detr_data.build_transform(train=True, image_size=48, max_size=48, augmentation="flip")
    return train, categories, transform


def prepared_run(tiny_data, seed=0, batch_size=4):
    from accelerate.utils import DataLoaderConfiguration, set_seed

    train, categories, transform = tiny_data
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(seed)
    dataset = detr_data.DetectionDataset(train, categories, transform, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=detr_data.collate_fn)
    model = hf_detr.HfDetrForObjectDetection(tiny_config(num_labels=categories.num_labels, freeze_backbone_stages=0))
    optimizer = training.build_optimizer(model, 1e-4, 1e-4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = accelerator.prepare(training.build_scheduler(optimizer, "step", max_train_steps=5, lr_drop_fraction=0.6))
    return accelerator, model, optimizer, scheduler, loader


def test_loop_trains_the_steps_logs_each_and_calls_back_after_steps_and_epochs(tiny_data, tmp_path):
    """10 images in batches of 4: 3 steps per epoch, so 5 steps end one step into the second epoch."""
    accelerator, model, optimizer, scheduler, loader = prepared_run(tiny_data)
    log_file = tmp_path / "train_log.jsonl"
    log_file.write_text('{"step": 9, "loss": 1.0}\n')  # an earlier run's: a run from step 0 starts the log afresh
    weights = [p.detach().clone() for p in model.parameters()]
    steps, epochs = [], []
    result = training.train_loop(
        accelerator, model, optimizer, scheduler, loader, max_train_steps=5, seed=0, log_file=log_file,
        after_step=lambda step, entry, last: steps.append((step, entry["loss"] is not None, last)),
        after_epoch=lambda epoch, step, last: epochs.append((epoch, step, last)), progress=False,
    )  # fmt: skip
    assert steps == [(1, True, False), (2, True, False), (3, True, False), (4, True, False), (5, True, True)]
    assert epochs == [(0, 3, False), (1, 5, True)]
    log = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5]
    assert [entry["lr"] for entry in log] == pytest.approx([1e-4, 1e-4, 1e-4, 1e-5, 1e-5])  # the drop after step 3
    assert all(key in log[0] for key in ("loss", "loss_ce", "loss_bbox", "loss_giou"))
    assert result.steps == 5 and result.skipped_nonfinite_steps == 0 and result.last_losses["loss"] == log[-1]["loss"]
    assert any(not torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_loop_resumed_at_a_step_trains_the_rest_of_its_epoch_only(tiny_data):
    accelerator, model, optimizer, scheduler, loader = prepared_run(tiny_data)
    steps = []
    result = training.train_loop(
        accelerator, model, optimizer, scheduler, loader, max_train_steps=5, seed=0, start_step=2, skipped_steps=1,
        after_step=lambda step, entry, last: steps.append(step), progress=False,
    )  # fmt: skip
    assert steps == [3, 4, 5] and result.steps == 5 and result.skipped_nonfinite_steps == 1


# --- fine-tuning from a checkpoint: the class head rows follow the dataset's classes by name ---------------

CHECKPOINT_LABELS = dict(id2label={0: "cat", 1: "dog", 2: "bird"}, category_ids=[1, 3, 7])


def labels_of(categories):
    return dict(id2label=categories.id2label, label2id=categories.label2id, category_ids=list(categories.category_ids))


@pytest.mark.parametrize("class_loss", ["softmax", "focal"])
def test_fine_tuning_carries_each_classes_rows_by_name_and_starts_new_classes_afresh(tmp_path, class_loss):
    """Class heads (every decoder layer's, with_box_refine; a DINO two-stage encoder's) and the denoising queries'
    label embeddings: row j is the checkpoint's row of the dataset's j-th class; a new class's row is the module's
    own init (the focal prior for a sigmoid head); softmax's "no object" row stays the checkpoint's."""
    config = tiny_config(num_labels=3, **CHECKPOINT_LABELS, class_loss=class_loss, query_type="anchor", num_denoising_queries=6,
                         with_box_refine=True, two_stage=True)  # fmt: skip
    torch.manual_seed(0)
    hf_detr.HfDetrForObjectDetection(config).save_pretrained(tmp_path / "checkpoint")
    saved = hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path / "checkpoint")
    categories = detr_data.CategoryMap([1, 2, 3], ["bird", "cat", "fish"])
    model = training.load_for_fine_tuning(str(tmp_path / "checkpoint"), categories, dataset="split", **labels_of(categories))
    assert model.config.id2label == {0: "bird", 1: "cat", 2: "fish"} and model.config.category_ids == [1, 2, 3]
    pairs = [(new, old) for new, old in zip(model.model.heads.class_heads, saved.model.heads.class_heads)]
    pairs.append((model.model.queries.denoising.label_embeddings, saved.model.queries.denoising.label_embeddings))
    pairs.append((model.model.proposals.class_head, saved.model.proposals.class_head))
    assert len(pairs) == 5
    for new, old in pairs:
        for name, param in new.named_parameters():
            old_param = getattr(old, name)
            assert torch.equal(param[0], old_param[2]) and torch.equal(param[1], old_param[0]), name  # bird, cat
            if name == "weight":  # fish: afresh (an untrained focal head's biases are all its prior)
                assert not any(torch.equal(param[2], row) for row in old_param), name
            if param.shape[0] == 4:  # softmax: "no object"
                assert torch.equal(param[3], old_param[3])
            if class_loss == "focal" and name == "bias" and isinstance(new, torch.nn.Linear):
                assert param[2].item() == pytest.approx(-math.log(0.99 / 0.01), rel=1e-5)  # the sigmoid heads' prior
    # every other weight is the checkpoint's
    class_rows = ("class_heads", "label_embeddings", "proposals.class_head")
    others = {n: p for n, p in model.state_dict().items() if not any(k in n for k in class_rows)}
    assert all(torch.equal(p, saved.state_dict()[n]) for n, p in others.items())


def test_fine_tuning_on_the_checkpoints_classes_loads_it_as_it_is_and_strict_sizes_refuse_other_classes(tmp_path):
    config = tiny_config(num_labels=3, **CHECKPOINT_LABELS)
    hf_detr.HfDetrForObjectDetection(config).save_pretrained(tmp_path / "checkpoint")
    saved = hf_detr.HfDetrForObjectDetection.from_pretrained(tmp_path / "checkpoint").state_dict()
    same = detr_data.CategoryMap.from_names(["cat", "dog", "bird"])  # other ids, same classes in the same order
    model = training.load_for_fine_tuning(str(tmp_path / "checkpoint"), same, dataset="split", **labels_of(same))
    assert all(torch.equal(p, saved[n]) for n, p in model.state_dict().items())
    other = detr_data.CategoryMap.from_names(["bird", "cat", "fish"])
    with pytest.raises(ValueError, match=(
        r"--no-ignore_mismatched_sizes: \S+checkpoint's classes \['cat', 'dog', 'bird'\] are not those of split \['bird', 'cat', "
        r"'fish'\] \(matched by name\): pass --ignore_mismatched_sizes"
    )):  # fmt: skip
        training.load_for_fine_tuning(str(tmp_path / "checkpoint"), other, dataset="split", ignore_mismatched_sizes=False, **labels_of(other))
    reordered = detr_data.CategoryMap.from_names(["bird", "cat", "dog"])  # the same classes: strict sizes allow it
    model = training.load_for_fine_tuning(str(tmp_path / "checkpoint"), reordered, dataset="split", ignore_mismatched_sizes=False, **labels_of(reordered))
    assert torch.equal(model.model.heads.class_heads[0].weight[0], saved["model.heads.class_heads.0.weight"][2])
