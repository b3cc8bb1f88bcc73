"""scripts/benchmark.py runs end to end (tiny sizes) and prints its table. This checks that the script
works, never a speed: timings are only meaningful side by side in the script's own full run."""

import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def test_quick_run_prints_every_row():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "hf_detr vs transformers DETR" in out and "| row" in out
    for row in ("inference, batch 1", "inference, batch 4", "training step", "backbone frozen", "no page faults", "matching + loss",
                "data path", "peak memory", "bf16 autocast", "SDPA backend: math", "torch.compile"):  # fmt: skip
        assert row in out, row
    assert "machine:" in out and "torch " in out and "transformers " in out
    assert "error" not in out.split("hf_detr vs transformers DETR")[1]
    header = next(line for line in out.splitlines() if line.startswith("| row"))
    # measurements and ratios, never verdicts against targets
    assert [cell.strip() for cell in header.strip("|").split("|")] == ["row", "transformers", "hf_detr", "speed-up (ours)", "notes"]


def test_unknown_row_is_rejected():
    done = subprocess.run([sys.executable, str(SCRIPT), "--rows", "nope"], capture_output=True, text=True)
    assert done.returncode != 0 and "unknown rows" in done.stderr


def test_throughput_table_times_every_side():
    """The GPU throughput table (run by default on a GPU) also runs on CPU at tiny sizes: four sides,
    each with a positive rate."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--rows", "throughput"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.split("Training throughput, batch 2 at 64x96")[1]
    rows = {cells[0]: cells[1:] for line in table.splitlines() if line.startswith("| ") for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    for side in ("transformers fp32", "transformers bf16 autocast", "hf_detr bf16 autocast", "hf_detr fp32"):
        assert float(rows[side][1]) > 0, rows[side]
    assert rows["transformers fp32"][3] == "1.00x"
    assert set(rows) == {"side", "transformers fp32", "transformers bf16 autocast", "hf_detr bf16 autocast", "hf_detr fp32"}


def test_device_is_checked():
    for device, message in (("tpu", "must be cpu or cuda"), ("cuda", "sees no CUDA GPU")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        done = subprocess.run([sys.executable, str(SCRIPT), "--device", device, "--quick"], capture_output=True, text=True)
        assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]


def test_deform_rows_run_and_agree_with_transformers():
    """--rows deform (not a default CPU row) at tiny sizes: encoder and decoder, layer and op alone, forward
    and forward + backward, each with a speed-up and outputs / gradients that agree with transformers'."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--rows", "deform"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]  # the header row aside
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    names = [row[0] for row in rows]
    for i, workload in ((0, "encoder self-attention, batch 1, 206 queries"), (4, "decoder cross-attention, batch 1, 300 queries")):
        assert names[i : i + 4] == [
            f"deformable attn, {workload}: layer, forward", f"deformable attn, {workload}: layer, forward + backward",
            "sampling op alone, forward", "sampling op alone, forward + backward",
        ]  # fmt: skip
    assert len(rows) == 8
    for line, row in zip(lines, rows):
        assert row[3].endswith("x") and float(row[3][:-1]) > 0, row
        assert float(line.rstrip(" |").split()[-1]) < 1e-4, line  # max|d out| or the gradients' relative difference
