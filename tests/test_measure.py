"""hf_detr.measure: interleaved timing, paired medians, tables and the machine line of the benchmark scripts."""

import os

from hf_detr import measure


def test_interleaved_runs_the_functions_in_turn_and_drops_the_warm_up_rounds():
    calls, syncs = [], []
    times = measure.interleaved([lambda: calls.append("a"), lambda: calls.append("b")], repeats=3, warmup=2, synchronize=lambda: syncs.append(1))  # fmt: skip
    assert calls == ["a", "b"] * 5
    assert [len(t) for t in times] == [3, 3] and all(s >= 0 for t in times for s in t)
    assert len(syncs) == 1 + 10  # once before the first call, then after every call, so a call's time includes its device work


def test_paired_medians_take_the_median_of_the_per_round_ratios():
    # the ratio of medians would be 2 / 2 = 1; the rounds' own ratios are 0.5, 1, 4
    assert measure.paired_medians([1.0, 2.0, 4.0], [2.0, 2.0, 1.0]) == (2.0, 2.0, 1.0)
    assert measure.paired_medians([1.0, 3.0, 8.0], [2.0, 1.0, 1.0]) == (3.0, 1.0, 3.0)


def test_markdown_table_pads_each_column_to_its_widest_cell():
    text = measure.markdown_table(["a", "long header"], [["wide cell", 1], ["x", 2.5]])
    assert text.splitlines() == [
        "| a         | long header |",
        "|-----------|-------------|",
        "| wide cell | 1           |",
        "| x         | 2.5         |",
    ]


def test_machine_line_names_the_cpus_and_the_load():
    line = measure.machine_line()
    assert line.startswith("machine: ") and f"{os.cpu_count()} logical CPUs" in line
    assert "; load average " in line  # the figures move between two reads, so only their form is checked
    load = measure.load_average()
    assert load is None or (len(load) == 3 and all(x >= 0 for x in load))
    assert len(measure.load_text().split()) == (1 if load is None else 3)
