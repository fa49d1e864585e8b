"""The benchmarks measure their variants taking turns, so machine noise hits them alike."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from turns import median, take_turns  # noqa: E402


def test_variants_take_turns_and_medians_are_compared():
    calls: list[str] = []

    def measure(name: str, value: float):
        def run() -> float:
            calls.append(name)
            return value + len(calls)
        return run

    runs = take_turns({"a": measure("a", 100.0), "b": measure("b", 200.0)}, repeats=3)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert runs == {"a": [101.0, 103.0, 105.0], "b": [202.0, 204.0, 206.0]}
    assert median(runs["a"]) == 103.0
