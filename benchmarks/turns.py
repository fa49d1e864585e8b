"""What the benchmarks share: their command line, and variants measured taking turns
(a, b, c, a, b, c, ...) so that a noisy machine slows every variant alike; medians compared."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch


def parser(doc: str | None, steps: int, repeats: int = 3) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=steps, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--repeats", type=int, default=repeats, help="runs of each variant, in turns")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p


def take_turns(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each variant's measurements, the variants run in turns ``repeats`` times."""
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, measure in variants.items():
            runs[name].append(measure())
    return runs


def median(values: list[float]) -> float:
    return statistics.median(values)


def runs_text(values: list[float]) -> str:
    return "runs: " + ", ".join(f"{v:.0f}" for v in values)
