"""Rules the test suite keeps. A test asserts behaviour, never wall time: a timeout on a subprocess (or any
call) trips on a slow or busy machine while the code is right, as `make test` on a loaded clean clone once did
on tests/test_benchmark.py's 120 s."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_puts_a_wall_clock_limit_on_a_call():
    limits = []
    for file in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Call) and any(keyword.arg == "timeout" for keyword in node.keywords):
                limits.append(f"{file.name}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "timeout" and getattr(node.value, "attr", None) == "mark":
                limits.append(f"{file.name}:{node.lineno} (pytest.mark.timeout)")
    assert not limits, f"wall-clock limits in tests: {limits}"
