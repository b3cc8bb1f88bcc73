"""scripts/benchmark.py runs end to end (tiny sizes) and prints its table. This checks that the script
works, never a speed: timings are only meaningful side by side in the script's own full run."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def test_quick_run_prints_every_row():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "hf_detr vs transformers DETR" in out and "| row" in out
    for row in ("inference, batch 1", "inference, batch 4", "training step", "backbone frozen", "no page faults", "matching + loss",
                "data path", "peak memory", "bf16 autocast", "SDPA backend: math", "torch.compile"):  # fmt: skip
        assert row in out, row
    assert "machine:" in out and "torch " in out and "transformers " in out
    assert "error" not in out.split("hf_detr vs transformers DETR")[1]


def test_unknown_row_is_rejected():
    done = subprocess.run([sys.executable, str(SCRIPT), "--rows", "nope"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "unknown rows" in done.stderr
