"""hf_detr against transformers' DetrForObjectDetection, side by side, on the same weights and inputs.

    python scripts/benchmark.py                    # the full table (DETR-R50; several minutes on 2 CPU cores)
    python scripts/benchmark.py --quick            # tiny sizes: checks that every row runs (seconds)
    python scripts/benchmark.py --rows infer1,train --repeats 5
    python scripts/benchmark.py --device cuda      # the same table on a GPU, plus the training-throughput table
    python scripts/benchmark.py --rows deform      # deformable attention layer vs transformers' (Deformable-DETR-R50 shapes)
    python scripts/benchmark.py --rows deformable-infer1,deformable-train   # Deformable DETR-R50 vs transformers'

Method. One process builds a transformers DETR-R50 (`DetrConfig(use_timm_backbone=False)` with an
AutoBackbone ResNet-50, 91 classes, auxiliary loss, default dropout) with random but fixed weights,
its frozen batch-norm statistics randomised too (fresh ones are the identity, which would make folding
them trivially exact), and converts it with `hf_detr.convert_transformers_detr`. Each timed row then
runs transformers (A) and hf_detr (B) on the same inputs, interleaved A, B, A, B ... after warm-up
pairs; the speed-up is the median over pairs of time(A) / time(B), so a slow moment of the machine
hits both sides of a pair. Times shown are the medians of each side. Peak memory is measured in fresh
subprocesses instead (see `memory_worker`). The optional-modes table compares hf_detr with itself
(fp32 eager) the same way and gives each mode's largest output difference from fp32. The throughput
table (`--rows throughput`, a default row on a GPU) times full training steps, batch 8 at 800x1333, of
transformers at fp32 and at bf16 autocast against hf_detr at bf16 autocast (and fp32), with each side's
peak GPU memory. The deformable-* rows do the same with transformers' DeformableDetrForObjectDetection
(R50, 4 levels, the plain model) converted to hf_detr.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_detr import measure

ROWS = ("infer1", "infer4", "train", "loss", "data", "memory", "modes", "throughput", "deform", "deformable-infer1", "deformable-train")
# Run by default: on CPU the throughput row (batch 8 at 800x1333) would take many minutes and ~20 GB,
# the deform rows (transformers' deformable attention backward at 800x1200) about a minute.
DEFAULT_ROWS = {"cpu": tuple(row for row in ROWS if row not in ("throughput", "deform")), "cuda": ROWS}

# Where the models and inputs live; set once by main() from --device. The data row runs on CPU either way.
DEVICE = torch.device("cpu")


@dataclass
class Sizes:
    """Everything that differs between the full run and --quick."""

    infer_size: tuple[int, int] = (800, 1066)  # 800-pixel shortest edge, 4:3
    infer_real_sizes: tuple = ((800, 1066), (800, 1000), (750, 1066), (800, 900))  # padded inside infer_size
    train_size: tuple[int, int] = (512, 683)
    train_real_sizes: tuple = ((512, 683), (512, 600))
    objects_per_image: int = 7
    loss_shape: tuple[int, int, int] = (6, 32, 100)  # decoder layers, batch, queries
    data_images: int = 48
    data_image_size: int = 640  # square synthetic COCO photos, resized to 800 by both pipelines
    data_batch: int = 4
    data_size: tuple[int, int] = (800, 1333)  # shortest edge, longest edge cap
    throughput_size: tuple[int, int] = (800, 1333)  # every image of the batch at this size, no padding
    throughput_batch: int = 8
    deform_levels: tuple = ((100, 150), (50, 75), (25, 38), (13, 19))  # an 800x1200 image at strides 8, 16, 32, 64
    deform_batch: int = 1
    repeats: dict = field(default_factory=lambda: {"infer1": 7, "infer4": 4, "train": 8, "loss": 30, "data": 10, "modes": 5, "throughput": 10, "deform": 3,
                                                        "deformable-infer1": 5, "deformable-train": 4})
    warmup: dict = field(default_factory=lambda: {"infer1": 1, "infer4": 1, "train": 2, "loss": 3, "data": 1, "modes": 1, "throughput": 3, "deform": 1,
                                                       "deformable-infer1": 1, "deformable-train": 1})
    quick: bool = False


QUICK = Sizes(
    infer_size=(64, 96),
    infer_real_sizes=((64, 96), (64, 80), (48, 96), (64, 64)),
    train_size=(64, 96),
    train_real_sizes=((64, 96), (64, 80)),
    objects_per_image=3,
    loss_shape=(3, 4, 10),
    data_images=8,
    data_image_size=64,
    data_batch=2,
    data_size=(64, 96),
    throughput_size=(64, 96),
    throughput_batch=2,
    deform_levels=((10, 15), (5, 8), (3, 4), (2, 2)),
    repeats={"infer1": 2, "infer4": 2, "train": 2, "loss": 2, "data": 2, "modes": 2, "throughput": 2, "deform": 2,
             "deformable-infer1": 2, "deformable-train": 2},
    warmup={"infer1": 1, "infer4": 1, "train": 1, "loss": 1, "data": 1, "modes": 1, "throughput": 1, "deform": 1,
            "deformable-infer1": 1, "deformable-train": 1},
    quick=True,
)


# --------------------------------------------------------------------------------------------- models


def detr_config(quick: bool):
    from transformers import DetrConfig, ResNetConfig

    if quick:
        backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], out_features=["stage4"])
        return DetrConfig(
            use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, num_labels=5,
            d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, auxiliary_loss=True,
        )  # fmt: skip
    backbone = ResNetConfig(out_features=["stage4"])  # ResNet-50
    return DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, num_labels=91, auxiliary_loss=True)


def deformable_config(quick: bool):
    """transformers' Deformable DETR-R50 (4 levels: ResNet-50's last 3 stages + one stride-2 level, 300 queries, FFN
    1024, 4 points per head and level, the plain model), or a tiny one."""
    from transformers import DeformableDetrConfig, ResNetConfig

    stages = ["stage2", "stage3", "stage4"]
    if quick:
        backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], out_features=stages)
        return DeformableDetrConfig(
            use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, num_labels=5, d_model=32,
            encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, num_queries=10, auxiliary_loss=True,
        )  # fmt: skip
    backbone = ResNetConfig(out_features=stages)  # ResNet-50
    return DeformableDetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, num_labels=91, auxiliary_loss=True)


def build_models(quick: bool, family: str = "detr"):
    """(transformers' DetrForObjectDetection, or its DeformableDetrForObjectDetection for family "deformable";
    the hf_detr model with the same weights), both in eval mode."""
    import hf_detr
    from transformers import DeformableDetrForObjectDetection, DetrForObjectDetection

    torch.manual_seed(0)
    if family == "deformable":
        reference = DeformableDetrForObjectDetection(deformable_config(quick))
    else:
        reference = DetrForObjectDetection(detr_config(quick))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if ".normalization." not in name:
                continue
            kind = name.rsplit(".", 1)[-1]
            if kind == "running_mean" or kind == "bias":
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
            elif kind == "running_var" or kind == "weight":
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
    ours = hf_detr.convert_transformers_detr(reference)
    return reference.to(DEVICE).eval(), ours.to(DEVICE).eval()


def padded_batch(real_sizes, canvas, batch, generator):
    """Random normalised images of the given real sizes, zero-padded to `canvas`, with their pixel mask."""
    height, width = canvas
    pixel_values = torch.zeros(batch, 3, height, width)
    pixel_mask = torch.zeros(batch, height, width, dtype=torch.long)
    for i in range(batch):
        h, w = real_sizes[i % len(real_sizes)]
        pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        pixel_mask[i, :h, :w] = 1
    return pixel_values.to(DEVICE), pixel_mask.to(DEVICE)


def random_labels(counts, num_labels, generator):
    labels = []
    for n in counts:
        centers = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        classes = torch.randint(0, num_labels, (n,), generator=generator)
        labels.append({"class_labels": classes.to(DEVICE), "boxes": torch.cat([centers, sizes], -1).to(DEVICE)})
    return labels


# --------------------------------------------------------------------------------------------- timing


def synchronize():
    """Wait for the GPU's queued work, so that a call's time includes it (nothing to wait for on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def interleaved(first, second, repeats: int, warmup: int):
    """Run first, second, first, second ...; return the two lists of seconds after `warmup` pairs."""
    return measure.interleaved([first, second], repeats, warmup, synchronize)


def fmt_time(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


@dataclass
class Row:
    name: str
    reference: str
    ours: str
    ratio: float | None
    notes: str = ""

    def cells(self):
        ratio = "n/a" if self.ratio is None else f"{self.ratio:.2f}x"
        return [self.name, self.reference, self.ours, ratio, self.notes]


def print_table(title: str, header: list[str], rows: list[list[str]]):
    print(f"\n{title}\n\n{measure.markdown_table(header, rows)}", flush=True)


# ----------------------------------------------------------------------------------------------- rows


def row_inference(reference, ours, sizes: Sizes, batch: int, key: str, label: str = "") -> Row:
    generator = torch.Generator().manual_seed(batch)
    pixel_values, pixel_mask = padded_batch(sizes.infer_real_sizes, sizes.infer_size, batch, generator)
    with torch.no_grad():
        ref_out = reference(pixel_values=pixel_values, pixel_mask=pixel_mask)
        our_out = ours(pixel_values=pixel_values, pixel_mask=pixel_mask)
        times = interleaved(
            lambda: reference(pixel_values=pixel_values, pixel_mask=pixel_mask),
            lambda: ours(pixel_values=pixel_values, pixel_mask=pixel_mask),
            sizes.repeats[key], sizes.warmup[key],
        )  # fmt: skip
    logits_diff = (ref_out.logits - our_out.logits).abs().max().item()
    boxes_diff = (ref_out.pred_boxes - our_out.pred_boxes).abs().max().item()
    ref_time, our_time, ratio = measure.paired_medians(*times)
    h, w = sizes.infer_size
    return Row(
        f"{label}inference, batch {batch}, {h}x{w} + mask", fmt_time(ref_time), fmt_time(our_time), ratio,
        f"max|d logits| {logits_diff:.1e}, max|d boxes| {boxes_diff:.1e}",
    )  # fmt: skip


def training_inputs(sizes: Sizes, num_labels: int):
    generator = torch.Generator().manual_seed(2)
    batch = len(sizes.train_real_sizes)
    pixel_values, pixel_mask = padded_batch(sizes.train_real_sizes, sizes.train_size, batch, generator)
    labels = random_labels([sizes.objects_per_image] * batch, num_labels, generator)
    return pixel_values, pixel_mask, labels


def training_step(model, pixel_values, pixel_mask, labels):
    model.zero_grad(set_to_none=True)
    loss = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
    loss.backward()
    return loss.detach()


def copy_backbone_trainability(source, target):
    """Give `target`'s backbone parameters the requires_grad flags of `source`'s (same names: hf_detr's
    keys are transformers')."""
    flags = {name: p.requires_grad for name, p in source.named_parameters() if ".backbone." in name}
    for name, parameter in target.named_parameters():
        if ".backbone." in name:
            parameter.requires_grad_(flags[name])


def row_training(reference, ours, sizes: Sizes, backbone: str, key: str = "train", label: str = "") -> Row:
    """backbone "detr": both train DETR's set (all but the ResNet stem and first stage). transformers
    5.x would train none of its AutoBackbone: its rule keeps parameters named "stage.1" .. "stage.3"
    trainable, but the names read "stages.1" ..; it is given our flags, so both sides do the same work.
    backbone "frozen": both keep the whole backbone frozen (transformers' actual default)."""
    pixel_values, pixel_mask, labels = training_inputs(sizes, ours.config.num_labels)
    saved = {name: p.requires_grad for model in (reference, ours) for name, p in model.named_parameters() if ".backbone." in name}
    if backbone == "frozen":
        for name, parameter in ours.named_parameters():
            if ".backbone." in name:
                parameter.requires_grad_(False)
    copy_backbone_trainability(ours, reference)
    trainable = [sum(p.requires_grad for n, p in m.named_parameters() if ".backbone." in n) for m in (reference, ours)]
    assert trainable[0] == trainable[1], trainable
    reference.train()
    ours.train()
    try:
        times = interleaved(
            lambda: training_step(reference, pixel_values, pixel_mask, labels),
            lambda: training_step(ours, pixel_values, pixel_mask, labels),
            sizes.repeats[key], sizes.warmup[key],
        )  # fmt: skip
    finally:
        for model in (reference, ours):
            model.eval()
            model.zero_grad(set_to_none=True)
            for name, parameter in model.named_parameters():
                if name in saved:
                    parameter.requires_grad_(saved[name])
    ref_time, our_time, ratio = measure.paired_medians(*times)
    h, w = sizes.train_size
    if backbone == "detr":
        name = f"{label}training step, batch {len(labels)}, {h}x{w}, {sizes.objects_per_image} obj/img"
        notes = f"fwd + loss (aux) + bwd, dropout 0.1; DETR's trainable backbone ({trainable[0]} tensors) on both"
        return Row(name, fmt_time(ref_time), fmt_time(our_time), ratio, notes)
    name = "  same, backbone frozen on both"
    return Row(name, fmt_time(ref_time), fmt_time(our_time), ratio, "transformers' own default (see BENCHMARKS.md)")


def row_loss(reference, ours, sizes: Sizes) -> Row:
    from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

    layers, batch, queries = sizes.loss_shape
    num_labels = ours.config.num_labels
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(layers, batch, queries, num_labels + 1, generator=generator).to(DEVICE).requires_grad_()
    boxes = (torch.rand(layers, batch, queries, 4, generator=generator) * 0.5 + 0.25).to(DEVICE).requires_grad_()
    counts = torch.randint(1, 2 * sizes.objects_per_image, (batch,), generator=generator).tolist()  # mean ~7
    labels = random_labels(counts, num_labels, generator)
    config = reference.config

    def reference_loss():
        # what DetrForObjectDetection.forward hands its loss: the last layer, and every layer for the aux losses
        return ForObjectDetectionLoss(logits[-1], labels, logits.device, boxes[-1], config, logits, boxes)[0]

    def our_loss():
        return ours.criterion(logits, boxes, labels)[0]

    difference = abs(reference_loss().item() - our_loss().item()) / abs(reference_loss().item())
    times = interleaved(reference_loss, our_loss, sizes.repeats["loss"], sizes.warmup["loss"])
    ref_time, our_time, ratio = measure.paired_medians(*times)
    return Row(
        f"matching + loss, {layers} layers x {batch} images x {queries} queries",
        fmt_time(ref_time), fmt_time(our_time), ratio,
        f"{sum(counts)} targets, {num_labels + 1} classes; loss rel diff {difference:.1e}",
    )  # fmt: skip


def row_data(sizes: Sizes) -> list[Row]:
    """Examples/s from a local COCO folder: our dataset (decode, DETR eval resize, normalise, boxes to
    normalised cxcywh) + collate_fn (pad, mask) against transformers' DETR image processor (PIL backend)
    doing the same on the same files: decode, resize, rescale + normalise, pad, COCO annotations to
    normalised cxcywh. A second row gives our training augmentation for information."""
    try:
        from hf_detr import data as detr_data
    except ImportError as err:  # hf_detr.data needs the [train] extras
        return [Row("data path", "not measured", "not measured", None, f"hf_detr.data unavailable: {err}")]
    import PIL.Image

    import hf_detr

    shortest, longest = sizes.data_size
    with tempfile.TemporaryDirectory() as tmp:
        root = detr_data.make_synthetic_coco(
            tmp, num_train=sizes.data_images, num_val=1, image_size=sizes.data_image_size, max_objects=8, seed=0
        )
        loaded = detr_data.load_coco_folder(root, "train")
        coco = json.loads((Path(root) / "annotations" / "instances_train.json").read_text())
        annotations = {image["id"]: [] for image in coco["images"]}
        for annotation in coco["annotations"]:
            annotations[annotation["image_id"]].append(annotation)
        files = {image["id"]: str(Path(root) / "train" / image["file_name"]) for image in coco["images"]}
        image_ids = loaded.dataset["image_id"]
        processor = hf_detr.HfDetrImageProcessor(size={"shortest_edge": shortest, "longest_edge": longest})

        def transform(train):
            if sizes.quick:
                kwargs = detr_data.scaled_sizes(shortest)["train" if train else "eval"]
                kwargs["max_size"] = longest
                return (detr_data.build_train_transform if train else detr_data.build_eval_transform)(**kwargs)
            return detr_data.build_transform(train=train, image_size=shortest, max_size=longest, seed=0 if train else None)

        datasets = {train: detr_data.DetectionDataset(loaded.dataset, loaded.categories, transform(train), seed=0) for train in (False, True)}
        batches = [list(range(i, i + sizes.data_batch)) for i in range(0, sizes.data_images - sizes.data_batch + 1, sizes.data_batch)]
        position = {"ref": 0, "ours": 0}

        def next_batch(side):
            indices = batches[position[side] % len(batches)]
            position[side] += 1
            return indices

        def reference_batch():
            indices = next_batch("ref")
            images = [PIL.Image.open(files[image_ids[i]]).convert("RGB") for i in indices]
            targets = [{"image_id": image_ids[i], "annotations": annotations[image_ids[i]]} for i in indices]
            return processor(images=images, annotations=targets, return_tensors="pt")

        def our_batch(train):
            def run():
                return detr_data.collate_fn([datasets[train][i] for i in next_batch("ours")])
            return run

        rows = []
        for train in (False, True):
            position.update(ref=0, ours=0)
            times = interleaved(reference_batch, our_batch(train), sizes.repeats["data"], sizes.warmup["data"])
            ref_time, our_time, ratio = measure.paired_medians(*times)
            per_second = lambda seconds: f"{sizes.data_batch / seconds:.1f} ex/s"  # noqa: E731
            size = sizes.data_image_size
            if not train:
                rows.append(Row(
                    f"data path, COCO folder ({size}px JPEG) -> batch of {sizes.data_batch}",
                    per_second(ref_time), per_second(our_time), ratio,
                    f"both: decode, resize to {shortest} (max {longest}), normalise, pad, boxes to cxcywh",
                ))  # fmt: skip
            else:
                rows.append(Row(
                    "  same, ours with DETR's training augmentation", per_second(ref_time), per_second(our_time), ratio,
                    "flip + multi-scale resize / crop (smaller images on average)",
                ))  # fmt: skip
    return rows


# glibc's malloc hands large freed blocks back to the kernel (and maps blocks over 32 MB fresh every
# time), so a training step faults its memory in again, ~2-5 us a page on this VM. Set for a whole
# process, these keep what it has mapped: neither side faults, and the row shows the implementations' own work.
NO_TRIM_MALLOC = {"MALLOC_TRIM_THRESHOLD_": "4000000000", "MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TOP_PAD_": "268435456"}


def start_worker(flags: list[str], quick: bool, env: dict | None = None) -> subprocess.Popen:
    """This script in a fresh process, running the worker that `flags` pick, with this process's thread
    count; collect it with `worker_result`."""
    command = [sys.executable, os.path.abspath(__file__), *flags, "--threads", str(torch.get_num_threads())]
    command += ["--quick"] if quick else []
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def worker_result(worker: subprocess.Popen) -> tuple[dict | None, str]:
    """(the JSON the worker printed last, "") once it has finished, or (None, its last error line)."""
    stdout, stderr = worker.communicate()
    if worker.returncode != 0:
        return None, (stderr.strip().splitlines() or ["?"])[-1][:120]
    return json.loads(stdout.strip().splitlines()[-1]), ""


def train_worker(quick: bool) -> dict:
    """Run in a fresh process started with NO_TRIM_MALLOC: both models, the main training row."""
    sizes = QUICK if quick else Sizes()
    reference, ours = build_models(quick)
    row = row_training(reference, ours, sizes, "detr")
    return {"reference": row.reference, "ours": row.ours, "ratio": row.ratio}


def row_training_without_page_faults(sizes: Sizes) -> Row:
    name = "  same, no page faults on either side"
    if DEVICE.type != "cpu":
        return Row(name, "not measured", "not measured", None, "CPU only (glibc's malloc)")
    if platform.libc_ver()[0] != "glibc":
        return Row(name, "not measured", "not measured", None, "the malloc settings are glibc's")
    result, error = worker_result(start_worker(["--train-worker"], sizes.quick, env={**os.environ, **NO_TRIM_MALLOC}))
    if result is None:
        return Row(name, "error", "error", None, error)
    notes = "fresh process, glibc's trimming off (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_, MALLOC_TOP_PAD_)"
    return Row(name, result["reference"], result["ours"], result["ratio"], notes)


def memory_worker(side: str, quick: bool, steps: int = 2) -> dict:
    """Run in a fresh process: build one model and the training inputs, then reset the kernel's peak
    RSS counter (`/proc/self/clear_refs` <- 5) and run `steps` training steps. The peak resident set
    (VmHWM) minus the resident set just before the steps is what the steps needed at most, model and
    inputs excluded. Only this side's model is ever built in the process."""
    import hf_detr
    from transformers import DetrForObjectDetection

    torch.manual_seed(0)
    config = detr_config(quick)
    if side == "ref":
        model = DetrForObjectDetection(config)
        for name, parameter in model.named_parameters():  # DETR's trainable backbone, as in row_training
            if ".backbone." in name:
                parameter.requires_grad_(".embedder." not in name and ".stages.0." not in name)
    else:
        model = hf_detr.HfDetrForObjectDetection(hf_detr.convert.config_from_detr_config(config))
    model.train()
    sizes = QUICK if quick else Sizes()
    pixel_values, pixel_mask, labels = training_inputs(sizes, config.num_labels)
    gc.collect()

    def status():
        return {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(("VmHWM", "VmRSS"))}

    before = status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(steps):
        training_step(model, pixel_values, pixel_mask, labels)
    after = status()
    return {"rss_before_kib": before, "peak_kib": after["VmHWM"], "step_peak_kib": after["VmHWM"] - before}


def row_memory(sizes: Sizes) -> Row:
    if DEVICE.type != "cpu":
        return Row("peak memory, training step", "not measured", "not measured", None, "CPU only (RSS); GPU: the throughput table")
    if not Path("/proc/self/clear_refs").exists():
        return Row("peak memory, training step", "not measured", "not measured", None, "needs Linux /proc")
    # Both sides at once (peak RSS is per process, so they do not disturb each other's numbers).
    workers = {side: start_worker(["--memory-worker", side], sizes.quick) for side in ("ref", "ours")}
    results = {}
    for side, worker in workers.items():
        results[side], error = worker_result(worker)
        if results[side] is None:
            return Row("peak memory, training step", "error", "error", None, error)
    mib = lambda kib: f"{kib / 1024:.0f} MiB"  # noqa: E731
    ref, ours = results["ref"]["step_peak_kib"], results["ours"]["step_peak_kib"]
    return Row(
        "peak memory, training step (RSS above model + inputs)", mib(ref), mib(ours), ref / ours,
        f"fresh process per side, 2 steps, DETR's trainable backbone; VmHWM total {mib(results['ref']['peak_kib'])} vs {mib(results['ours']['peak_kib'])}",
    )  # fmt: skip


# ------------------------------------------------------------------------------ deformable attention


def deformable_layers(d_model: int, heads: int, levels: int, points: int):
    """(transformers' DeformableDetrMultiscaleDeformableAttention, hf_detr's layer) with the same weights:
    Deformable DETR's initialisation, then moved off it (offsets that depend on the query, non-uniform
    attention), as after some training."""
    from transformers import DeformableDetrConfig
    from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrMultiscaleDeformableAttention

    from hf_detr.deformable import MultiScaleDeformableAttention

    torch.manual_seed(5)
    ours = MultiScaleDeformableAttention(d_model, heads, levels, points)
    with torch.no_grad():
        ours.sampling_offsets.weight.normal_(0, 0.05)  # a few pixels of spread around the initial ring
        ours.attention_weights.weight.normal_(0, 0.05)
    config = DeformableDetrConfig(d_model=d_model, encoder_attention_heads=heads, num_feature_levels=levels, encoder_n_points=points)
    reference = DeformableDetrMultiscaleDeformableAttention(config, num_heads=heads, n_points=points)
    reference.load_state_dict(ours.state_dict())
    return reference.to(DEVICE), ours.to(DEVICE)


def deform_rows(sizes: Sizes) -> list[Row]:
    """The deformable attention layer alone: transformers' (one grid_sample per level) against
    hf_detr.deformable (one gather over all levels), same weights and inputs, at Deformable-DETR-R50's
    sizes (d_model 256, 8 heads, 4 levels, 4 points). Encoder self-attention: every position of the
    levels is a query, its reference its own pixel centre on every level; decoder cross-attention:
    300 queries with random reference points; both with the memory's padding mask (all real: one
    image). Forward under no_grad, and forward + backward of a fixed random output gradient (gradients
    of the inputs and the weights). Then the sampling op alone (transformers' MultiScaleDeformableAttention
    module against hf_detr.deformable.multi_scale_deformable_attention) on the value, locations and
    weights the layer computes: the layer's projections are the same work on both sides (for the
    decoder most of the layer's time: value_proj of the whole memory)."""
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    from hf_detr.deformable import multi_scale_deformable_attention

    d_model, heads, points = 256, 8, 4
    levels = len(sizes.deform_levels)
    reference, ours = deformable_layers(d_model, heads, levels, points)
    reference_op = MultiScaleDeformableAttention()
    spatial_shapes = torch.tensor(sizes.deform_levels, device=DEVICE)
    shapes_list = [tuple(shape) for shape in sizes.deform_levels]
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start = areas.cumsum(0) - areas
    length, batch = int(areas.sum()), sizes.deform_batch
    generator = torch.Generator().manual_seed(6)
    memory = torch.randn(batch, length, d_model, generator=generator).to(DEVICE)
    value_mask = torch.ones(batch, length, dtype=torch.bool, device=DEVICE)
    centres = []
    for h, w in sizes.deform_levels:
        y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([x.flatten(), y.flatten()], -1))
    workloads = {
        "encoder self-attention": (memory + torch.randn(memory.shape, generator=generator).to(DEVICE),
                                   torch.cat(centres).to(DEVICE)[None, :, None].expand(batch, -1, levels, -1)),
        "decoder cross-attention": (torch.randn(batch, 300, d_model, generator=generator).to(DEVICE),
                                    torch.rand(batch, 300, 1, 2, generator=generator).to(DEVICE).expand(-1, -1, levels, -1)),
    }  # fmt: skip
    repeats, warmup = sizes.repeats["deform"], sizes.warmup["deform"]
    rows = []

    def compare(name, run_reference, run_ours, inputs, reference_weights=(), our_weights=()):
        """A forward row and a forward + backward row; gradients of `inputs` and of the weights."""
        with torch.no_grad():
            difference = (run_reference(*inputs) - run_ours(*inputs)).abs().max().item()
            times = interleaved(lambda: run_reference(*inputs), lambda: run_ours(*inputs), repeats, warmup)
        ref_time, our_time, ratio = measure.paired_medians(*times)
        rows.append(Row(f"{name}, forward", fmt_time(ref_time), fmt_time(our_time), ratio, f"max|d out| {difference:.1e}"))

        leaves = [tensor.detach().clone().requires_grad_() for tensor in inputs]
        grad = torch.randn(run_ours(*inputs).shape, generator=generator).to(DEVICE)

        def step(run, weights):
            def run_step():
                for tensor in [*leaves, *weights]:
                    tensor.grad = None
                run(*leaves).backward(grad)
                return [tensor.grad for tensor in [*leaves, *weights]]

            return run_step

        reference_step, our_step = step(run_reference, reference_weights), step(run_ours, our_weights)
        relative = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(our_step(), reference_step()))
        ref_time, our_time, ratio = measure.paired_medians(*interleaved(reference_step, our_step, repeats, warmup))
        notes = f"gradients ({'inputs, weights' if our_weights else 'inputs'}): max relative difference {relative:.1e}"
        rows.append(Row(f"{name}, forward + backward", fmt_time(ref_time), fmt_time(our_time), ratio, notes))

    for workload, (query, reference_points) in workloads.items():

        def reference_layer(query, memory):
            return reference(
                hidden_states=query, attention_mask=value_mask, encoder_hidden_states=memory, reference_points=reference_points,
                spatial_shapes=spatial_shapes, spatial_shapes_list=shapes_list, level_start_index=level_start,
            )[0]  # fmt: skip

        def our_layer(query, memory):
            return ours(query, reference_points, memory, value_mask, spatial_shapes)[0]

        name = f"deformable attn, {workload}, batch {batch}, {query.shape[1]} queries"
        compare(f"{name}: layer", reference_layer, our_layer, [query, memory], list(reference.parameters()), list(ours.parameters()))
        with torch.no_grad():  # the op's inputs as the layer makes them
            _, (locations, weights) = ours(query, reference_points, memory, value_mask, spatial_shapes, output_sampling=True)
            value = ours.value_proj(memory).view(batch, length, heads, d_model // heads)
        compare(
            "  sampling op alone",
            lambda value, locations, weights: reference_op(value, spatial_shapes, shapes_list, level_start, locations, weights, 64),
            lambda value, locations, weights: multi_scale_deformable_attention(value, spatial_shapes, locations, weights),
            [value, locations, weights],
        )  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------ optional modes


def mode_rows(ours, sizes: Sizes, include_compile: bool) -> list[list[str]]:
    """hf_detr's opt-in modes (hf_detr.speed) against hf_detr fp32 eager, interleaved the same way."""
    import copy

    from hf_detr.speed import enable_fast_mode

    generator = torch.Generator().manual_seed(1)
    pixel_values, pixel_mask = padded_batch(sizes.infer_real_sizes, sizes.infer_size, 1, generator)
    repeats, warmup = sizes.repeats["modes"], sizes.warmup["modes"]
    h, w = sizes.infer_size
    rows = []

    def compare(name, fast, what, compile_seconds=None):
        with torch.no_grad():
            base = ours(pixel_values=pixel_values, pixel_mask=pixel_mask)
            start = time.perf_counter()
            out = fast(pixel_values=pixel_values, pixel_mask=pixel_mask)
            first = time.perf_counter() - start
            times = interleaved(
                lambda: ours(pixel_values=pixel_values, pixel_mask=pixel_mask),
                lambda: fast(pixel_values=pixel_values, pixel_mask=pixel_mask),
                repeats, warmup,
            )  # fmt: skip
        base_time, fast_time, ratio = measure.paired_medians(*times)
        logits = (base.logits - out.logits.float()).abs().max().item()
        boxes = (base.pred_boxes - out.pred_boxes.float()).abs().max().item()
        notes = f"first call {fmt_time(first)}" if compile_seconds else ""
        rows.append([name, what, fmt_time(base_time), fmt_time(fast_time), f"{ratio:.2f}x", f"{logits:.1e}", f"{boxes:.1e}", notes])

    what = f"inference, batch 1, {h}x{w}"
    bf16 = f"bf16 autocast ({DEVICE.type.upper()})"
    compare(bf16, enable_fast_mode(copy.deepcopy(ours), bf16=True), what)
    for backend in ("math", "flash") if DEVICE.type == "cpu" else ("math", "flash", "efficient", "cudnn"):
        try:
            compare(f"SDPA backend: {backend}", enable_fast_mode(copy.deepcopy(ours), sdpa_backend=backend), what)
        except RuntimeError as err:  # e.g. a GPU kernel that does not take an attention mask: report it
            rows.append([f"SDPA backend: {backend}", what, "", "", "failed", "", "", f"{type(err).__name__}: {str(err)[:100]}"])
    if include_compile:
        compiled = copy.deepcopy(ours)
        try:
            enable_fast_mode(compiled, compile=True)
            compare("torch.compile (inductor)", compiled, what, compile_seconds=True)
        except Exception as err:  # report, do not hide: compile support on CPU varies
            rows.append(["torch.compile (inductor)", what, "", "", "failed", "", "", f"{type(err).__name__}: {str(err)[:100]}"])
    else:
        rows.append(["torch.compile (inductor)", what, "", "", "skipped", "", "", "--quick, or --no-compile"])

    # training step in bf16 autocast: loss relative difference with the same dropout masks (same seed)
    pixel_values_t, pixel_mask_t, labels = training_inputs(sizes, ours.config.num_labels)
    fast = enable_fast_mode(copy.deepcopy(ours), bf16=True)
    losses = {}

    def step(model, key):
        def run():
            torch.manual_seed(0)
            losses[key] = training_step(model, pixel_values_t, pixel_mask_t, labels).item()
        return run

    ours.train()
    fast.train()
    try:
        times = interleaved(step(ours, "fp32"), step(fast, "bf16"), repeats, warmup)
    finally:
        ours.eval()
        ours.zero_grad(set_to_none=True)
    base_time, fast_time, ratio = measure.paired_medians(*times)
    difference = abs(losses["bf16"] - losses["fp32"]) / abs(losses["fp32"])
    th, tw = sizes.train_size
    rows.append([bf16, f"training step, batch 2, {th}x{tw}", fmt_time(base_time), fmt_time(fast_time),
                 f"{ratio:.2f}x", "", "", f"loss rel diff {difference:.1e} (same dropout masks)"])  # fmt: skip
    return rows


# ------------------------------------------------------------------------------- training throughput


def throughput_rows(reference, ours, sizes: Sizes) -> list[list[str]]:
    """Full training steps (forward + loss with aux losses + backward + AdamW step), one batch of
    `throughput_batch` images at `throughput_size`, for transformers at fp32 and at bf16 autocast and
    for hf_detr at bf16 autocast and at fp32, interleaved round by round. Each side trains its own copy
    of the same weights (DETR's trainable backbone) with its own optimizer. On a GPU, each side's peak
    memory is what it would hold running alone: its own model and optimizer state, plus the most
    `torch.cuda.max_memory_allocated` rose above the memory allocated at the start of a step (all four
    sides' models stay on the GPU)."""
    import copy

    from hf_detr.speed import enable_fast_mode

    generator = torch.Generator().manual_seed(4)
    batch = sizes.throughput_batch
    pixel_values, pixel_mask = padded_batch([sizes.throughput_size], sizes.throughput_size, batch, generator)
    labels = random_labels([sizes.objects_per_image] * batch, ours.config.num_labels, generator)
    # DETR's trainable backbone (hf_detr's default; transformers' own rule misses its AutoBackbone's names)
    references = [copy.deepcopy(reference) for _ in range(2)]
    for model in references:
        copy_backbone_trainability(ours, model)
    sides = {  # the same bf16 autocast around both models' forward (enable_fast_mode wraps any module's)
        "transformers fp32": references[0],
        "transformers bf16 autocast": enable_fast_mode(references[1], bf16=True),
        "hf_detr bf16 autocast": enable_fast_mode(copy.deepcopy(ours), bf16=True),
        "hf_detr fp32": copy.deepcopy(ours),
    }
    optimizers = {name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5) for name, model in sides.items()}
    step_peaks = dict.fromkeys(sides, 0)  # the most a step allocated above what was resident at its start

    def step(name):
        model, optimizer = sides[name].train(), optimizers[name]

        def run():
            model.zero_grad(set_to_none=True)  # before the memory baseline: the last step's gradients are gone
            if DEVICE.type == "cuda":
                torch.cuda.reset_peak_memory_stats(DEVICE)
                start = torch.cuda.memory_allocated(DEVICE)
            training_step(model, pixel_values, pixel_mask, labels)
            optimizer.step()
            if DEVICE.type == "cuda":
                step_peaks[name] = max(step_peaks[name], torch.cuda.max_memory_allocated(DEVICE) - start)

        return run

    times = measure.interleaved([step(name) for name in sides], sizes.repeats["throughput"], sizes.warmup["throughput"], synchronize)
    times = dict(zip(sides, times))
    peaks = {}  # each side's own model and optimizer state (the same after every step), plus its step peak
    for name, model in sides.items():
        resident = [*model.parameters(), *model.buffers()]
        resident += [t for state in optimizers[name].state.values() for t in state.values() if torch.is_tensor(t)]
        peaks[name] = sum(t.nbytes for t in resident) + step_peaks[name]
    del sides, references, optimizers  # the copies, their gradients and optimizer state

    def ratio(name, baseline):  # median over rounds of time(baseline) / time(name)
        return statistics.median(a / b for a, b in zip(times[baseline], times[name]))

    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        memory = f"{peaks[name] / 2**30:.2f} GiB" if DEVICE.type == "cuda" else "n/a (CPU: the memory row)"
        rows.append([
            name, fmt_time(median), f"{batch / median:.1f}", memory,
            f"{ratio(name, 'transformers fp32'):.2f}x", f"{ratio(name, 'transformers bf16 autocast'):.2f}x",
        ])  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------- main


def machine_lines() -> list[str]:
    import numpy
    import PIL
    import scipy
    import transformers

    import hf_detr

    return [
        measure.machine_line(),
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, oneDNN {torch.backends.mkldnn.is_available()}), "
        f"transformers {transformers.__version__}, hf_detr {hf_detr.__version__}, scipy {scipy.__version__}, "
        f"numpy {numpy.__version__}, Pillow {PIL.__version__}, Python {platform.python_version()}",
        "dtype float32 (the optional-modes table aside)",
    ] + gpu_lines()


def gpu_lines() -> list[str]:
    if DEVICE.type != "cuda":
        return []
    properties = torch.cuda.get_device_properties(DEVICE)
    return [
        f"device: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}; "
        f"TF32 for convolutions {torch.backends.cudnn.allow_tf32}, for matmuls {torch.backends.cuda.matmul.allow_tf32} (torch's defaults)"
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and inputs: a smoke run in seconds")
    parser.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)} (default: all on a GPU, all but throughput on CPU)")
    parser.add_argument("--repeats", type=int, help="timed pairs per row (default: per row, see Sizes)")
    parser.add_argument("--warmup", type=int, help="warm-up pairs per row")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--device", default="cpu", help="cpu (the default), or cuda[:N]: the models and inputs on that GPU")
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the modes table")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-worker", choices=("ref", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--train-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.quick)))
        return
    if args.train_worker:
        print(json.dumps(train_worker(args.quick)))
        return
    global DEVICE
    try:
        DEVICE = torch.device(args.device)
    except RuntimeError:
        DEVICE = None
    if DEVICE is None or DEVICE.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU")
    rows = [row.strip() for row in (args.rows or ",".join(DEFAULT_ROWS[DEVICE.type])).split(",") if row.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {','.join(ROWS)}")
    sizes = QUICK if args.quick else Sizes()
    if args.repeats:
        sizes.repeats = dict.fromkeys(sizes.repeats, args.repeats)
    if args.warmup is not None:
        sizes.warmup = dict.fromkeys(sizes.warmup, args.warmup)

    started = time.perf_counter()
    header = machine_lines()
    if (measure.load_average() or (0,))[0] > 0.5:
        header.append("WARNING: other processes are using the CPU (load average above); timings will be noisy")
    print("\n".join(header))
    print(f"timings: median of interleaved (transformers, hf_detr) pairs; repeats {sizes.repeats}, warm-up {sizes.warmup}")
    sys.stdout.flush()
    need_models = set(rows) & {"infer1", "infer4", "train", "loss", "modes", "throughput"}
    reference, ours = build_models(args.quick) if need_models else (None, None)
    deformable = build_models(args.quick, "deformable") if {"deformable-infer1", "deformable-train"} & set(rows) else None

    table = []
    for row in rows:
        if row == "infer1":
            table.append(row_inference(reference, ours, sizes, 1, "infer1"))
        elif row == "infer4":
            table.append(row_inference(reference, ours, sizes, 4, "infer4"))
        elif row == "train":
            table.append(row_training(reference, ours, sizes, "detr"))
            table.append(row_training(reference, ours, sizes, "frozen"))
            table.append(row_training_without_page_faults(sizes))
        elif row == "loss":
            table.append(row_loss(reference, ours, sizes))
        elif row == "data":
            table.extend(row_data(sizes))
        elif row == "memory":
            table.append(row_memory(sizes))
        elif row == "deform":
            table.extend(deform_rows(sizes))
        elif row == "deformable-infer1":
            table.append(row_inference(*deformable, sizes, 1, row, label="Deformable DETR: "))
        elif row == "deformable-train":
            table.append(row_training(*deformable, sizes, "detr", key=row, label="Deformable DETR: "))
        if row not in ("modes", "throughput"):
            print(f"  done: {table[-1].name} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    header_cells = ["row", "transformers", "hf_detr", "speed-up (ours)", "notes"]
    print_table("hf_detr vs transformers DETR (same weights, same inputs)", header_cells, [r.cells() for r in table])

    modes = []
    if "modes" in rows:
        modes = mode_rows(ours, sizes, include_compile=not (args.quick or args.no_compile))
        print_table(
            "Optional modes (hf_detr.speed.enable_fast_mode) vs hf_detr fp32 eager",
            ["mode", "workload", "fp32 eager", "mode", "speed-up", "max|d logits|", "max|d boxes|", "notes"],
            modes,
        )  # fmt: skip
    throughput = []
    if "throughput" in rows:
        throughput = throughput_rows(reference, ours, sizes)
        h, w = sizes.throughput_size
        print_table(
            f"Training throughput, batch {sizes.throughput_batch} at {h}x{w} (fwd + loss (aux) + bwd + AdamW step), {DEVICE.type}",
            ["side", "step", "images/s", "peak memory", "speed-up vs transformers fp32", "vs transformers bf16 autocast"],
            throughput,
        )  # fmt: skip
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end {measure.load_text()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": [r.cells() for r in table], "modes": modes, "throughput": throughput}, indent=1))


if __name__ == "__main__":
    main()
