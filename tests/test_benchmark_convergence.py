"""scripts/benchmark_convergence.py: every contender builds at the same sizes with the same trainable
backbone, and --quick runs the whole pipeline (training, COCO mAP at 4 points, more seeds for the top
contenders, table, plot, --resume) in seconds. No mAP is checked: at --quick sizes it means nothing."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import benchmark_convergence as bench  # noqa: E402


@pytest.fixture
def quick_settings():
    return bench.resolve_settings(quick_args())


def quick_args(**overrides) -> argparse.Namespace:
    args = dict(dataset_name=None, synthetic_style="shapes", train_split=None, eval_split=None, image_size=None,
                per_device_train_batch_size=None, learning_rate=None, budget_steps=1500, num_evals=5, quick=True)  # fmt: skip
    return argparse.Namespace(**{**args, **overrides})


def test_every_contender_has_the_same_sizes_and_backbone(quick_settings, tmp_path):
    root = tmp_path / "synthetic"
    import hf_detr.data as detr_data

    detr_data.make_synthetic_coco(root, num_train=2, num_val=1, image_size=32)
    categories = detr_data.load_coco_folder(root, "train").categories
    shapes = {}
    for name in bench.CONTENDERS:
        model, processor = bench.build_model(name, quick_settings, categories)
        config = model.config
        width = getattr(config, "d_model", None) or config.hidden_size
        shapes[name] = (width, config.encoder_layers, config.decoder_layers, config.num_queries, config.encoder_ffn_dim)
        backbone = [(n, p) for n, p in model.named_parameters() if n.startswith("model.backbone.")]
        assert backbone and all(p.requires_grad for _, p in backbone), name  # trained whole
        norms = [m for n, m in model.named_modules() if "backbone" in n and "BatchNorm" in type(m).__name__]
        assert norms and all(isinstance(m, torch.nn.BatchNorm2d) for m in norms), name  # live batch norm
        # the same backbone layout everywhere: same parameter shapes
        shapes[name] += (tuple(p.shape for _, p in backbone),)
        sigmoid = name not in ("transformers-detr",) and getattr(config, "class_loss", "focal") != "softmax"
        assert type(processor).__name__.startswith("ConditionalDetr" if sigmoid else "Detr"), (name, type(processor))
    assert len(set(shapes.values())) == 1, shapes


def test_the_default_run_trains_the_winning_recipe():
    from hf_detr.training import SMALL_MODEL  # scripts/train.py's built-in run

    recipe = {field: SMALL_MODEL.get(field, default) for field, default in bench.recipe_defaults().items()}
    assert recipe == {**bench.recipe_defaults(), **bench.HF_CONTENDERS[bench.DEFAULT_RECIPE]}


def test_synthetic_style_picks_the_data_the_queries_and_the_reports_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DETR_CACHE", str(tmp_path))
    shapes, clutter = bench.resolve_settings(quick_args()), bench.resolve_settings(quick_args(synthetic_style="clutter"))
    assert bench.data_name(shapes) == "built-in synthetic data (shapes)"
    assert bench.data_name(clutter) == "built-in synthetic data (clutter)"
    assert bench.data_name(bench.resolve_settings(quick_args(dataset_name="/data/coco"))) == "/data/coco"
    assert (shapes["model"]["num_queries"], clutter["model"]["num_queries"]) == (10, 30)
    assert bench.run_key(shapes, "detr") != bench.run_key(clutter, "detr")  # --resume never mixes the two
    assert bench.load_data(clutter)[2].names == ["star", "ring", "diamond", "bar"]
    assert bench.load_data(shapes)[2].names == ["rectangle", "ellipse", "triangle"]
    with pytest.raises(SystemExit):  # argparse's error, before anything trains
        bench.main(["--synthetic_style", "stripes"])


def run(tmp_path, *args):
    env = {**os.environ, "HF_DETR_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(SCRIPTS / "benchmark_convergence.py"), "--quick", "--output_dir", str(tmp_path / "out"), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quick_run_prints_the_table_and_writes_the_plot(tmp_path):
    contenders = ["detr", bench.DEFAULT_RECIPE, "transformers-detr", "transformers-dab"]
    out = run(tmp_path, "--contenders", ",".join(contenders), "--spread_top", "1")
    table = out.split("COCO mAP at an equal budget")[1]
    rows = {cells[0]: cells for line in table.splitlines() if line.startswith("| ") for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    header = rows.pop("contender")
    assert [c for c in header if c.startswith("mAP @")] == ["mAP @1", "mAP @2", "mAP @3", "mAP @4"]
    assert set(rows) == set(contenders)
    seeds = {name: cells[2] for name, cells in rows.items()}
    assert sorted(seeds.values()).count("0,1") == 2 and "transformers" in " ".join(n for n, s in seeds.items() if s == "0,1")
    assert "best / transformers-detr: " in table and "same recipe: detr" in table and "machine:" in out
    assert "target" not in out.lower()  # ratios, never verdicts against a target
    assert (tmp_path / "out" / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert len(results) == 6 and all([e["step"] for e in r["evals"]] == [1, 2, 3, 4] for r in results)
    assert all(0.0 <= e["map"] <= 1.0 for r in results for e in r["evals"])

    again = run(tmp_path, "--contenders", "detr", "--spread_seeds", "1", "--resume")
    assert "reusing" in again and "detr-seed0.json" in again


def test_unknown_contender_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's error, before anything trains
        bench.main(["--contenders", "detr,nope"])
    assert exit_info.value.code != 0 and "unknown contenders ['nope']" in capsys.readouterr().err


def test_verdicts_compare_the_best_recipe_with_each_transformers_family():
    row = lambda *finals: {"seeds": list(range(len(finals))), "map": [[0.0, f] for f in finals]}  # noqa: E731
    rows = {"best": row(0.6), "deformable": row(0.2), "transformers-detr": row(0.1),
            "transformers-deformable": row(0.2), "transformers-deformable-two-stage": row(0.25, 0.35)}
    lines = bench.verdicts(rows)
    assert "best / transformers-detr: 6.00x" in lines
    assert "best / the better of Deformable DETR plain / two-stage (transformers-deformable-two-stage): 2.00x" in lines
    assert "same recipe: deformable 0.2000 vs transformers-deformable 0.2000: +0.0000 (within noise)" in lines


def test_ema_contenders_train_alike_and_evaluate_the_average(quick_settings, tmp_path, monkeypatch):
    """A +ema contender trains exactly as its recipe (same seed: same losses) and every evaluation gets the
    average's frozen copy, not the trained model; its run key tells them apart."""
    monkeypatch.setenv("HF_DETR_CACHE", str(tmp_path))
    evaluated = []

    def fake_evaluate(model, *args, **kwargs):
        evaluated.append({n: p.detach().clone() for n, p in model.named_parameters()} | {"trained": any(p.requires_grad for p in model.parameters())})
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}

    monkeypatch.setattr(bench, "evaluate_model", fake_evaluate)
    plain = bench.train_run("best", 0, quick_settings, log=lambda s: None)
    plain_evals, evaluated[:] = list(evaluated), []
    averaged = bench.train_run("best+ema", 0, quick_settings, log=lambda s: None)
    assert averaged["final_loss"] == plain["final_loss"]
    assert all(e["trained"] for e in plain_evals) and not any(e["trained"] for e in evaluated)
    last_plain, last_average = plain_evals[-1], evaluated[-1]
    assert any(not torch.equal(last_plain[n], last_average[n]) for n in last_plain if n != "trained")
    assert bench.run_key(quick_settings, "best+ema") != bench.run_key(quick_settings, "best")
    assert set(bench.EMA_CONTENDERS) <= set(bench.CONTENDERS) and bench.HF_CONTENDERS["best+ema"] == bench.HF_CONTENDERS["best"]
