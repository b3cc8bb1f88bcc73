"""Side-by-side timing and the machine it ran on, for the benchmark scripts (scripts/benchmark.py,
scripts/benchmark_convergence.py, scripts/export_onnx.py --benchmark).

Speed claims in this project are ratios of two things timed in turn in one process: a slow moment of the
machine then hits both sides of a pair, and the median of the per-pair ratios is the claim. Every report
starts with the machine and its load average, since the same command takes other times on other hosts.
"""

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence


def interleaved(functions: Sequence[Callable[[], object]], repeats: int, warmup: int, synchronize: Callable[[], object] = lambda: None) -> list[list[float]]:  # fmt: skip
    """Run every function in turn, `warmup + repeats` rounds; per function, its seconds in the rounds after
    the warm-up. `synchronize` waits for queued device work (torch.cuda.synchronize on a GPU), so that a
    call's time includes it."""
    times = [[] for _ in functions]
    synchronize()
    for i in range(warmup + repeats):
        for function, seconds in zip(functions, times):
            start = time.perf_counter()
            function()
            synchronize()
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
    return times


def paired_medians(first: Sequence[float], second: Sequence[float]) -> tuple[float, float, float]:
    """(median of first, median of second, median of the per-round ratios first / second)."""
    return statistics.median(first), statistics.median(second), statistics.median(a / b for a, b in zip(first, second))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table with every column padded to its widest cell."""
    lines = [[str(cell) for cell in line] for line in (header, *rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    row = lambda line: "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"  # noqa: E731
    return "\n".join([row(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(row, lines[1:])])


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages (None where the system does not say)."""
    with contextlib.suppress(OSError, ValueError):
        return os.getloadavg()
    return None


def load_text() -> str:
    """The load averages as text, for a report's header and its last line."""
    load = load_average()
    return " ".join(f"{x:.2f}" for x in load) if load else "unknown"


def machine_line() -> str:
    """'machine: <CPU model>, <n> logical CPUs, <OS> <release>; load average <1> <5> <15>'."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    return f"machine: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}; load average {load_text()}"
