"""Convergence at an equal budget: hf_detr's DETR variants against transformers' DETR family.

    python scripts/benchmark_convergence.py                      # every contender, 500 steps, built-in data
    python scripts/benchmark_convergence.py --contenders detr,best,transformers-detr --seed 1
    python scripts/benchmark_convergence.py --quick              # tiny sizes: checks every contender runs (seconds)
    python scripts/benchmark_convergence.py --synthetic_style clutter   # the second built-in data set
    python scripts/benchmark_convergence.py --dataset_name /data/coco --budget_steps 20000

Method. Every contender trains through scripts/train.py's loop (`hf_detr.training.train_loop`) on the same
data, in the same order for a given seed, with the same augmentation, image size, batch, optimiser (AdamW, one
learning rate for the backbone and one for the rest, weight decay, gradient clipping), LR schedule (stretched
over the budget) and number of steps: the built-in run's recipe
(`hf_detr.training.run_defaults(built_in=True)`, the sizes of `hf_detr.training.small_model`). Every model has
the same backbone (a ResNet trained from scratch with live batch norm), width, layer counts and number of
queries. hf_detr contenders are `HfDetrConfig` values (`HF_CONTENDERS`); transformers'
`DetrForObjectDetection`, `ConditionalDetrForObjectDetection`, `DabDetrForObjectDetection` and
`DeformableDetrForObjectDetection` (plain, and two-stage with box refinement) are built at the same sizes with
their own losses, matchers and defaults (`TRANSFORMERS_CONTENDERS`); their backbone is swapped for the same
live-BN ResNet, all of it trained (transformers freezes an AutoBackbone ResNet's batch norms, and DETR /
Conditional DETR all of its weights, which at random init would leave them a random frozen backbone).
Multi-scale contenders (hf_detr's and transformers' Deformable DETR) read 4 levels of strides 8-64 as Deformable
DETR does: the small backbone's last two stages and two stride-2 levels beyond (`LEVELS`, `LEVEL_STAGES`). The
`+ema` contenders train their recipe alike and evaluate an EMA of its weights (`EMA_CONTENDERS`, `ema_settings`).
COCO mAP (pycocotools, `hf_detr.evaluation.evaluate_model`) is measured at
`--num_evals` evenly spaced points of the budget. The top contenders are trained again with further seeds
(`--spread_seeds`); their rows show the mean and the range. Runs go `--jobs` at a time in subprocesses of
`--threads` threads each; time per step (training only, data loading included, evaluation excluded) is a side
column: it depends on what else runs. The plot shows mAP against steps and against training seconds.

Data. The built-in synthetic data comes from one of two generators (`--synthetic_style`,
`hf_detr.synthetic.SYNTHETIC_STYLES`): "shapes" (the default), the set the recipe was tuned on: 1-4 rectangles,
ellipses and triangles of 15-50% of the image side per image; "clutter", to check that a ranking holds on data
nobody tuned on: 1-20 stars, rings, diamonds and bars per image, most of them 8-24 px at 128 px, on varied
backgrounds with stripes, soft blobs and lines that are not objects (the models get 30 queries there, not 10).
The report's title names the data.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

import hf_detr
from hf_detr import data as detr_data
from hf_detr import measure, training
from hf_detr.ema import ExponentialMovingAverage
from hf_detr.evaluation import evaluate_model

# The config fields a contender may set; everything else comes from the built-in run's SMALL_MODEL.
RECIPE_FIELDS = (
    "query_type", "class_loss", "num_query_groups", "num_denoising_queries", "denoising_label_noise",
    "denoising_box_noise", "look_forward_twice", "scale_encoder_positions", "position_embedding_temperature",
    "normalize_between_decoder_layers", "class_cost", "bbox_cost", "giou_cost", "ce_loss_coefficient",
    "bbox_loss_coefficient", "giou_loss_coefficient", "eos_coefficient", "focal_alpha", "focal_gamma", "iou_aware_alpha",
    "num_feature_levels", "encoder_attention", "decoder_cross_attention", "encoder_n_points", "decoder_n_points",
    "with_box_refine", "two_stage", "position_embedding_offset", "decoder_final_norm",
)  # fmt: skip
# Several feature levels: Deformable DETR's strides 8-64, from the small backbone's stages and stride-2 levels beyond
LEVELS = 4
LEVEL_STAGES = 2  # of them from the backbone (strides 8, 16; its stride-4 stage would make 1024 of 1360 positions)
FOCAL = dict(class_loss="focal", class_cost=2.0)  # the focal matching cost weight of Deformable / Conditional / DAB-DETR
DAB = dict(query_type="anchor", scale_encoder_positions=True, position_embedding_temperature=20, look_forward_twice=True)
# name -> HfDetrConfig values over HfDetrConfig()'s own (the rest of the recipe: the paper's DETR)
HF_CONTENDERS = {
    "detr": {},
    "detr-focal": FOCAL,
    "conditional": dict(query_type="conditional"),
    "conditional-focal": dict(query_type="conditional", **FOCAL),
    "anchor": dict(query_type="anchor"),
    "anchor-focal": dict(query_type="anchor", **FOCAL),
    "anchor-iou_aware": dict(query_type="anchor", class_loss="iou_aware", class_cost=2.0),
    "dab-detr": {**DAB, **FOCAL},  # transformers' DabDetrConfig recipe
    "anchor-focal-groups": dict(query_type="anchor", num_query_groups=6, **FOCAL),
    "anchor-focal-denoising": dict(query_type="anchor", num_denoising_queries=40, **FOCAL),
    # all of the above, the focal loss weighted 2 (Deformable DETR's weight) and matched with class cost 3
    "best": dict(query_type="anchor", num_query_groups=6, num_denoising_queries=40, class_loss="focal", class_cost=3.0, ce_loss_coefficient=2.0),
}
# Deformable DETR: the backbone's stages as levels, deformable attention, its queries; transformers' DeformableDetrConfig
# recipe (the focal loss weighted 1 and matched with class cost 1)
DEFORMABLE = dict(
    num_feature_levels=LEVELS, encoder_attention="deformable", query_type="deformable", class_loss="focal", class_cost=1.0,
    position_embedding_offset=0.5, decoder_final_norm=False,
)  # fmt: skip
HF_CONTENDERS.update({
    "deformable": DEFORMABLE,
    "deformable-two-stage": dict(DEFORMABLE, with_box_refine=True, two_stage=True),
    # the best recipe on multi-scale deformable attention: DN-Deformable-DETR with groups
    "best-deformable": dict(HF_CONTENDERS["best"], num_feature_levels=LEVELS, encoder_attention="deformable", decoder_cross_attention="deformable"),
    # the same on the one stride-16 level of the single-scale models (Deformable DETR's "single-scale" ablation):
    # deformable attention at the cost of a single-scale step
    "best-deformable-1level": dict(HF_CONTENDERS["best"], encoder_attention="deformable", decoder_cross_attention="deformable"),
    # DINO: deformable attention, mixed query selection (the encoder's best proposals as anchors, learned content),
    # contrastive denoising with DINO's noise, look-forward-twice; DINO's focal loss weight 1 and class cost 2
    "dino": dict(
        num_feature_levels=LEVELS, encoder_attention="deformable", query_type="anchor", decoder_cross_attention="deformable",
        two_stage=True, num_denoising_queries=40, denoising_contrastive=True, denoising_label_noise=0.5, denoising_box_noise=1.0,
        look_forward_twice=True, class_loss="focal", class_cost=2.0, position_embedding_offset=0.5,
    ),
})  # fmt: skip
# the same recipes trained with an EMA of the weights (`hf_detr.ema`, scripts/train.py's --ema_decay), which every
# evaluation uses; its decay and warm-up follow the budget (`ema_settings`)
EMA_CONTENDERS = {f"{name}+ema": name for name in ("best", "best-deformable-1level", "best-deformable", "dino")}
HF_CONTENDERS.update({ema: HF_CONTENDERS[name] for ema, name in EMA_CONTENDERS.items()})
DEFAULT_RECIPE = "best-deformable-1level"  # the contender whose values scripts/train.py's built-in run uses (tested)
TRANSFORMERS_CONTENDERS = ("transformers-detr", "transformers-conditional", "transformers-dab", "transformers-deformable", "transformers-deformable-two-stage")
# each transformers model and the hf_detr contender with its recipe, for the "same recipe" comparison
COUNTERPARTS = {
    "transformers-detr": "detr", "transformers-conditional": "conditional-focal", "transformers-dab": "dab-detr",
    "transformers-deformable": "deformable", "transformers-deformable-two-stage": "deformable-two-stage",
}  # fmt: skip
CONTENDERS = (*HF_CONTENDERS, *TRANSFORMERS_CONTENDERS)

# --quick: a tiny model on a tiny synthetic set, a few steps (every code path, no meaningful number)
QUICK_MODEL = dict(
    backbone_config=dict(model_type="resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", out_features=["stage2"]),
    d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
    encoder_ffn_dim=64, decoder_ffn_dim=64,
)  # fmt: skip


def recipe_defaults() -> dict:
    config = hf_detr.HfDetrConfig()
    defaults = {field: getattr(config, field) for field in RECIPE_FIELDS}
    defaults["decoder_cross_attention"] = None  # the query type's own (a default config's is DETR's "dense")
    return defaults


def resolve_settings(args) -> dict:
    """Everything a run depends on, from the built-in run's defaults and the arguments (one JSON dict)."""
    defaults = training.run_defaults(built_in=True)
    sizes = {k: v for k, v in training.small_model(args.synthetic_style).items() if k not in RECIPE_FIELDS}
    settings = dict(
        dataset_name=args.dataset_name, synthetic_style=args.synthetic_style, train_split=args.train_split,
        eval_split=args.eval_split,
        image_size=args.image_size or defaults["image_size"], max_size=args.image_size or defaults["max_size"],
        augmentation=defaults["augmentation"], batch_size=args.per_device_train_batch_size or defaults["per_device_train_batch_size"],
        eval_batch_size=defaults["per_device_eval_batch_size"], learning_rate=args.learning_rate or defaults["learning_rate"],
        backbone_learning_rate=args.learning_rate or defaults["backbone_learning_rate"], weight_decay=defaults["weight_decay"],
        max_grad_norm=defaults["max_grad_norm"], lr_scheduler_type=defaults["lr_scheduler_type"],
        num_warmup_steps=defaults["num_warmup_steps"], lr_drop_fraction=defaults["lr_drop_fraction"], budget_steps=args.budget_steps,
        num_evals=args.num_evals, synthetic_train_images=defaults["synthetic_train_images"],
        synthetic_val_images=defaults["synthetic_val_images"], synthetic_image_size=128, model=sizes,
    )  # fmt: skip
    if args.quick:
        settings.update(
            image_size=64, max_size=64, batch_size=4, eval_batch_size=8, budget_steps=4, num_evals=4,
            synthetic_train_images=16, synthetic_val_images=4, synthetic_image_size=64, model={**sizes, **QUICK_MODEL},
        )  # fmt: skip
    return settings


_DATA: dict[str, tuple] = {}  # loaded once per process


def load_data(settings: dict):
    """-> (train, eval) Hub-schema datasets and the CategoryMap: the built-in data (where scripts/train.py
    writes it) or a dataset's splits, loaded as scripts/train.py loads them."""
    names = ("dataset_name", "synthetic_style", "train_split", "eval_split", "synthetic_train_images",
             "synthetic_val_images", "synthetic_image_size")  # fmt: skip
    key = json.dumps([settings[k] for k in names] + [os.environ.get("HF_DETR_CACHE")])
    if key not in _DATA:
        if settings["dataset_name"] is None:
            sizes = (settings["synthetic_train_images"], settings["synthetic_val_images"], settings["synthetic_image_size"])
            root = detr_data.synthetic_dataset(*sizes, style=settings["synthetic_style"])
            splits = detr_data.load_splits(root, "train", "val")
        else:
            splits = detr_data.load_splits(settings["dataset_name"], settings["train_split"], settings["eval_split"])
        _DATA[key] = splits.train, splits.eval, splits.categories
    return _DATA[key]


# ----------------------------------------------------------------------------------------------- models


def multi_scale_backbone(backbone: dict, levels: int) -> dict:
    """The small backbone giving its stages of stride 8 and 16 (the last two), Deformable DETR's first strides;
    the levels beyond are stride-2 convolutions (32, 64): 340 positions for a 128-pixel image."""
    stages = len(backbone["hidden_sizes"])
    return {**backbone, "out_features": [f"stage{i}" for i in range(stages - min(levels, LEVEL_STAGES) + 1, stages + 1)]}


def hf_config(name: str, settings: dict, categories) -> hf_detr.HfDetrConfig:
    labels = dict(id2label=categories.id2label, label2id=categories.label2id, category_ids=list(categories.category_ids))
    recipe = HF_CONTENDERS[name]
    model = dict(settings["model"])
    if recipe.get("num_feature_levels", 1) > 1:
        model["backbone_config"] = multi_scale_backbone(model["backbone_config"], recipe["num_feature_levels"])
    return hf_detr.HfDetrConfig(**{**model, **recipe_defaults(), **recipe, **labels})


def transformers_model(name: str, settings: dict, categories):
    """transformers' model of the same sizes (its own loss, matcher, costs and init), with hf_detr's backbone
    module type: a live-BN ResNet, trained whole. -> (model, the HfDetrConfig whose processor fits it)."""
    from transformers import AutoBackbone, ConditionalDetrConfig, ConditionalDetrForObjectDetection, DabDetrConfig
    from transformers import DabDetrForObjectDetection, DeformableDetrConfig, DeformableDetrForObjectDetection, DetrConfig
    from transformers import DetrForObjectDetection

    sizes = hf_config("deformable" if "deformable" in name else "detr", settings, categories)
    kwargs = dict(
        backbone_config=sizes.backbone_config, use_timm_backbone=False, use_pretrained_backbone=False, auxiliary_loss=True,
        id2label=categories.id2label, label2id=categories.label2id,
        **{k: getattr(sizes, k) for k in ("encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
                                          "encoder_ffn_dim", "decoder_ffn_dim", "num_queries", "dropout")},
    )  # fmt: skip
    width = sizes.d_model
    config_class, model_class, processor_loss = {
        "transformers-detr": (DetrConfig, DetrForObjectDetection, "softmax"),
        "transformers-conditional": (ConditionalDetrConfig, ConditionalDetrForObjectDetection, "focal"),
        "transformers-dab": (DabDetrConfig, DabDetrForObjectDetection, "focal"),
        "transformers-deformable": (DeformableDetrConfig, DeformableDetrForObjectDetection, "focal"),
        "transformers-deformable-two-stage": (DeformableDetrConfig, DeformableDetrForObjectDetection, "focal"),
    }[name]
    if config_class is DeformableDetrConfig:  # the levels of hf_detr's deformable contenders
        kwargs.update(num_feature_levels=sizes.num_feature_levels, two_stage_num_proposals=sizes.num_queries)
        if name.endswith("two-stage"):
            kwargs.update(with_box_refine=True, two_stage=True)
    config = config_class(**kwargs, **({"hidden_size": width} if config_class is DabDetrConfig else {"d_model": width}))
    model = model_class(config)
    encoder = model.model.backbone
    encoder = getattr(encoder, "conv_encoder", encoder)  # DAB-DETR wraps it with the position embedding
    encoder.model = AutoBackbone.from_config(sizes.backbone_config)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model, hf_detr.HfDetrConfig(**settings["model"], class_loss=processor_loss, num_labels=categories.num_labels)


def build_model(name: str, settings: dict, categories):
    """-> (model, image processor)."""
    if name in HF_CONTENDERS:
        config = hf_config(name, settings, categories)
        model = hf_detr.HfDetrForObjectDetection(config)
    else:
        model, config = transformers_model(name, settings, categories)
    size = {"shortest_edge": settings["image_size"], "longest_edge": settings["max_size"]}
    return model, hf_detr.image_processor_for(config, size=size)


# -------------------------------------------------------------------------------------------- training


def ema_settings(settings: dict) -> dict:
    """The EMA of the +ema contenders: an average over about the last tenth of the budget (RT-DETR's 0.9999 spans
    10k of its ~90k steps), its decay warmed up over the first tenth."""
    budget = settings["budget_steps"]
    return dict(decay=1 - 10 / max(budget, 20), warmup_steps=max(1, budget // 10))


def eval_steps(settings: dict) -> list[int]:
    budget, n = settings["budget_steps"], settings["num_evals"]
    return sorted({max(1, round(budget * (i + 1) / n)) for i in range(n)})


def train_run(name: str, seed: int, settings: dict, log=print) -> dict:
    """Train one contender with one seed for the budget through scripts/train.py's loop
    (`hf_detr.training.train_loop`); mAP at every evaluation step."""
    accelerator = Accelerator(cpu=training.use_cpu(), dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(seed)  # model init; the data order and augmentation follow the seed alone
    train_data, val_data, categories = load_data(settings)
    model, processor = build_model(name, settings, categories)
    transform = detr_data.build_transform(True, image_size=settings["image_size"], max_size=settings["max_size"],
                                          augmentation=settings["augmentation"])  # fmt: skip
    dataset = detr_data.DetectionDataset(train_data, categories, transform, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings["batch_size"], shuffle=True, collate_fn=detr_data.collate_fn)
    budget = settings["budget_steps"]
    # train.py's optimizer (AdamW, the backbone's rate apart) and the built-in run's schedule, for every contender
    optimizer = training.build_optimizer(model, settings["learning_rate"], settings["backbone_learning_rate"], settings["weight_decay"])
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = ExponentialMovingAverage(accelerator.unwrap_model(model), **ema_settings(settings)) if name in EMA_CONTENDERS else None
    scheduler = accelerator.prepare(training.build_scheduler(
        optimizer, settings["lr_scheduler_type"], budget, settings["num_warmup_steps"], settings["lr_drop_fraction"], accelerator.num_processes
    ))  # fmt: skip
    evals, points, losses = [], eval_steps(settings), []
    clock = {"train": 0.0, "since": time.perf_counter()}  # training time: data loading included, evaluation excluded

    def after_step(step, entry, last):
        if entry["loss"] is not None:
            losses.append(entry["loss"])
        if step in points:
            clock["train"] += time.perf_counter() - clock["since"]
            evaluated = ema.module if ema is not None else accelerator.unwrap_model(model)
            metrics = evaluate_model(evaluated, processor, val_data, categories, batch_size=settings["eval_batch_size"],
                                     accelerator=accelerator, progress=False)  # fmt: skip
            evals.append({"step": step, **{k: metrics[k] for k in ("map", "map_50", "map_75")}})
            log(f"  {name} seed {seed} step {step}: map {metrics['map']:.4f}, map_50 {metrics['map_50']:.4f}, "
                f"loss {sum(losses[-50:]) / max(1, len(losses[-50:])):.3f}, {clock['train'] / step:.3f} s/step")  # fmt: skip
            clock["since"] = time.perf_counter()

    # a contender that diverges is counted, not stopped: its steps are skipped up to the end of the budget
    result = training.train_loop(accelerator, model, optimizer, scheduler, loader, max_train_steps=budget, seed=seed,
                                 max_grad_norm=settings["max_grad_norm"], max_consecutive_nonfinite_steps=budget + 1,
                                 after_step=after_step, progress=False, ema=ema)  # fmt: skip
    return dict(contender=name, seed=seed, evals=evals, final_loss=sum(losses[-50:]) / max(1, len(losses[-50:])),
                seconds_per_step=clock["train"] / max(1, result.steps), skipped_steps=result.skipped_nonfinite_steps,
                parameters=sum(p.numel() for p in model.parameters()))  # fmt: skip


# ------------------------------------------------------------------------------------------- running


def run_key(settings: dict, name: str) -> str:
    """What a run's result depends on: the settings and the contender's definition."""
    spec = [settings, HF_CONTENDERS.get(name, name)] + ([ema_settings(settings)] if name in EMA_CONTENDERS else [])
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_all(runs: list[tuple[str, int]], settings: dict, output_dir: Path, jobs: int, threads: int, resume: bool) -> list[dict]:
    """Each (contender, seed) run, `jobs` at a time in subprocesses (in this process when jobs <= 1);
    a finished run's result file is reused with --resume when its settings are the same."""
    run_dir = output_dir / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    results, pending = {}, []
    for name, seed in runs:
        file = run_dir / f"{name}-seed{seed}.json"
        if resume and file.is_file() and json.loads(file.read_text()).get("run_key") == run_key(settings, name):
            results[(name, seed)] = json.loads(file.read_text())
            print(f"reusing {file}")
        else:
            pending.append((name, seed, file))
    if jobs <= 1:
        for name, seed, file in pending:
            results[(name, seed)] = finish(train_run(name, seed, settings), run_key(settings, name), file)
    else:
        active = []
        while pending or active:
            while pending and len(active) < jobs:
                name, seed, file = pending.pop(0)
                job = {"name": name, "seed": seed, "settings": settings, "file": str(file), "key": run_key(settings, name)}
                job_file = run_dir / f"{name}-seed{seed}.job.json"
                job_file.write_text(json.dumps(job))
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                active.append((name, seed, file, subprocess.Popen([sys.executable, __file__, "--worker", str(job_file)], env=env)))
            time.sleep(1)
            for entry in [a for a in active if a[3].poll() is not None]:
                active.remove(entry)
                name, seed, file, process = entry
                if process.returncode != 0:
                    raise RuntimeError(f"{name} seed {seed} failed (exit {process.returncode}); see its output above")
                results[(name, seed)] = json.loads(file.read_text())
    return [results[run] for run in runs]


def finish(result: dict, key: str, file: Path) -> dict:
    result["run_key"] = key
    file.write_text(json.dumps(result, indent=1))
    return result


def worker(job_file: str):
    job = json.loads(Path(job_file).read_text())
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    finish(train_run(job["name"], job["seed"], job["settings"], log=lambda s: print(s, flush=True)), job["key"], Path(job["file"]))


# ---------------------------------------------------------------------------------------------- report


def summarise(results: list[dict]) -> dict[str, dict]:
    """contender -> {seeds, steps, map [per step: list over seeds], map_50, map_75, loss, s/step}."""
    rows: dict[str, dict] = {}
    for result in results:
        row = rows.setdefault(result["contender"], {"seeds": [], "steps": [e["step"] for e in result["evals"]], "map": [],
                                                    "map_50": [], "map_75": [], "loss": [], "sps": []})  # fmt: skip
        row["seeds"].append(result["seed"])
        for metric in ("map", "map_50", "map_75"):
            row[metric].append([e[metric] for e in result["evals"]])
        row["loss"].append(result["final_loss"])
        row["sps"].append(result["seconds_per_step"])
    return rows


def mean(values):
    return sum(values) / len(values)


def final(row: dict, metric: str = "map") -> float:
    return mean([curve[-1] for curve in row[metric]])


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def table(rows: dict[str, dict]) -> str:
    steps = next(iter(rows.values()))["steps"]
    header = ["contender", "implementation", "seeds", *[f"mAP @{s}" for s in steps], "final mAP@50", "final mAP@75", "final loss", "s/step"]
    lines = []
    for name, row in sorted(rows.items(), key=lambda item: -final(item[1])):
        maps = [cell([curve[i] for curve in row["map"]]) for i in range(len(steps))]
        implementation = "transformers" if name in TRANSFORMERS_CONTENDERS else "hf_detr"
        lines.append([name, implementation, ",".join(map(str, row["seeds"])), *maps, cell([c[-1] for c in row["map_50"]]),
                      cell([c[-1] for c in row["map_75"]]), f"{mean(row['loss']):.3f}", f"{mean(row['sps']):.3f}"])  # fmt: skip
    return measure.markdown_table(header, lines)


def noise(rows: dict[str, dict]) -> float | None:
    """The largest final-mAP range over seeds of any contender trained with several (None: none was)."""
    ranges = [max(c[-1] for c in row["map"]) - min(c[-1] for c in row["map"]) for row in rows.values() if len(row["seeds"]) > 1]
    return max(ranges) if ranges else None


def verdicts(rows: dict[str, dict]) -> list[str]:
    hf = {n: r for n, r in rows.items() if n in HF_CONTENDERS}
    if not hf:
        return []
    best = max(hf, key=lambda n: final(hf[n]))
    lines = [f"best hf_detr recipe: {best} ({HF_CONTENDERS[best] or 'HfDetrConfig defaults'}), final mAP {final(hf[best]):.4f}"]
    ratio = lambda a, b: final(rows[a]) / final(rows[b]) if final(rows[b]) > 0 else math.inf  # noqa: E731
    if "transformers-detr" in rows:
        lines.append(f"best / transformers-detr: {ratio(best, 'transformers-detr'):.2f}x")
    others = [n for n in ("transformers-conditional", "transformers-dab") if n in rows]
    if others:
        better = max(others, key=lambda n: final(rows[n]))
        lines.append(f"best / the better of Conditional / DAB ({better}): {ratio(best, better):.2f}x")
    deformables = [n for n in ("transformers-deformable", "transformers-deformable-two-stage") if n in rows]
    if deformables:
        better = max(deformables, key=lambda n: final(rows[n]))
        lines.append(f"best / the better of Deformable DETR plain / two-stage ({better}): {ratio(best, better):.2f}x")
    spread = noise(rows)
    for theirs, ours in COUNTERPARTS.items():
        if theirs in rows and ours in rows:
            diff = final(rows[ours]) - final(rows[theirs])
            status = "above" if diff > 0 else "unknown noise" if spread is None else "within noise" if -diff <= spread else "BELOW"
            lines.append(f"same recipe: {ours} {final(rows[ours]):.4f} vs {theirs} {final(rows[theirs]):.4f}: {diff:+.4f} ({status})")
    if spread is not None:
        lines.append(f"noise: the largest range of final mAP over seeds of one contender: {spread:.4f}")
    return lines


def plot(rows: dict[str, dict], path: Path, title: str):
    """mAP against training steps (left) and against training seconds (right: each evaluation's step times the
    contender's measured seconds per step, evaluation excluded), the mean over seeds and their range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100, sharey=True)
    colours = plt.get_cmap("tab20").colors  # one colour per contender: the default cycle has 10
    for i, (name, row) in enumerate(sorted(rows.items(), key=lambda item: -final(item[1]))):
        curves = list(zip(*row["map"]))
        label = f"{name} ({len(row['seeds'])} seeds)" if len(row["seeds"]) > 1 else name
        style = dict(marker="o", markersize=3, linestyle="--" if name in TRANSFORMERS_CONTENDERS else "-", color=colours[i % len(colours)])
        for axis, x in zip(axes, (row["steps"], [step * mean(row["sps"]) for step in row["steps"]])):
            axis.plot(x, [mean(v) for v in curves], label=label, **style)
            if len(row["seeds"]) > 1:
                axis.fill_between(x, [min(v) for v in curves], [max(v) for v in curves], color=style["color"], alpha=0.15)
    for axis, what in zip(axes, ("training steps", "training seconds (evaluation excluded)")):
        axis.set_xlabel(what)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("COCO mAP (val)")
    figure.suptitle(title, fontsize=9)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def schedule(settings: dict) -> str:
    """The learning-rate schedule in words."""
    warmup = f" after {settings['num_warmup_steps']} warm-up steps" if settings["num_warmup_steps"] else ""
    if settings["lr_scheduler_type"] == "step":
        return f"10x drop after {settings['lr_drop_fraction']:.3g} of the budget{warmup}"
    return f"{settings['lr_scheduler_type']} schedule{warmup}"


def data_name(settings: dict) -> str:
    """The data the runs train on, for the report: the dataset's name, or the built-in data and its style."""
    return settings["dataset_name"] or f"built-in synthetic data ({settings['synthetic_style']})"


def machine_line(threads: int, jobs: int) -> str:
    import transformers

    return (f"{measure.machine_line()}\n"
            f"torch {torch.__version__}, transformers {transformers.__version__}, hf_detr {hf_detr.__version__}, "
            f"Python {platform.python_version()}; {jobs} run(s) at a time, {threads} thread(s) each")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}")
    parser.add_argument("--budget_steps", type=int, default=500,
                        help="training steps of every run (default: every contender and the seed spread in under an hour on 2 CPU cores; the built-in run trains 1250)")
    parser.add_argument("--num_evals", type=int, default=4, help="COCO evaluations, evenly spaced over the budget")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (model init, data order, augmentation)")
    parser.add_argument("--spread_seeds", type=int, default=2, help="seeds for the top contenders (seed, seed + 1, ...)")
    parser.add_argument("--spread_top", type=int, default=1, help="top hf_detr contenders (and the top transformers one) given --spread_seeds")
    parser.add_argument("--dataset_name", default=None, help="a local COCO folder or Hub dataset; default: the built-in synthetic data")
    parser.add_argument("--synthetic_style", default="shapes", choices=list(detr_data.SYNTHETIC_STYLES),
                        help="the built-in data's generator (no --dataset_name): shapes (what the recipe was tuned "
                             "on) or clutter")  # fmt: skip
    parser.add_argument("--train_split", default=None)
    parser.add_argument("--eval_split", default=None)
    parser.add_argument("--image_size", type=int, default=None, help="default: the built-in run's (128)")
    parser.add_argument("--per_device_train_batch_size", "--batch_size", type=int, default=None, help="default: the built-in run's (16)")
    parser.add_argument("--learning_rate", type=float, default=None, help="default: the built-in run's (5e-4, backbone too)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (subprocesses); <= 1: one after the other in this process")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: CPUs / jobs)")
    parser.add_argument("--output_dir", default="outputs/convergence", help="per-run results, results.json, convergence.png")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs in --output_dir with the same settings")
    parser.add_argument("--quick", action="store_true", help="tiny model, data and budget: checks every contender runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contenders {unknown}; known: {', '.join(CONTENDERS)}")
    jobs = 1 if args.quick else args.jobs
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    if jobs <= 1:
        torch.set_num_threads(threads)
    settings = resolve_settings(args)
    output_dir = Path(args.output_dir) if not args.quick or args.output_dir != "outputs/convergence" else Path(tempfile.mkdtemp())
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(machine_line(threads, jobs), flush=True)
    print(f"data: {data_name(settings)}; budget {settings['budget_steps']} steps, "
          f"batch {settings['batch_size']} at {settings['image_size']} px, "
          f"lr {settings['learning_rate']:g} (backbone {settings['backbone_learning_rate']:g}), {schedule(settings)}; "
          f"evaluations at steps {eval_steps(settings)}", flush=True)  # fmt: skip

    results = run_all([(n, args.seed) for n in names], settings, output_dir, jobs, threads, args.resume)
    rows = summarise(results)
    if args.spread_seeds > 1:
        hf = sorted((n for n in rows if n in HF_CONTENDERS), key=lambda n: -final(rows[n]))[: args.spread_top]
        theirs = sorted((n for n in rows if n in TRANSFORMERS_CONTENDERS), key=lambda n: -final(rows[n]))[:1]
        extra = [(n, args.seed + i) for i in range(1, args.spread_seeds) for n in hf + theirs]
        print(f"more seeds for the top contenders: {', '.join(hf + theirs)}", flush=True)
        results += run_all(extra, settings, output_dir, jobs, threads, args.resume)
        rows = summarise(results)
    wall = time.perf_counter() - started

    title = (f"{data_name(settings)}: batch {settings['batch_size']} at "
             f"{settings['image_size']} px, {settings['budget_steps']} steps, seed {args.seed}")  # fmt: skip
    report = "\n".join([f"COCO mAP at an equal budget ({title})", "", table(rows), "", *verdicts(rows),
                        f"total {wall:.0f} s ({wall / 60:.1f} min)"])  # fmt: skip
    print("\n" + report, flush=True)
    (output_dir / "results.json").write_text(json.dumps({"settings": settings, "results": results, "wall_seconds": wall}, indent=1))
    (output_dir / "table.md").write_text(report + "\n")
    plot(rows, output_dir / "convergence.png", title)
    print(f"wrote {output_dir / 'results.json'}, {output_dir / 'table.md'}, {output_dir / 'convergence.png'}")
    return rows


if __name__ == "__main__":
    main()
