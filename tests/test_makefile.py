"""The Makefile passes its variables on as the overrides they name (`make -n`: printed only)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return " ".join(done.stdout.split())


@pytest.mark.parametrize(("value", "override"), [("1", "ensemble=true"), ("true", "ensemble=true"),
                                                 ("0", "ensemble=false"), ("yes", "ensemble=yes")])
def test_evaluate_passes_ensemble_on_and_leaves_a_bad_value_for_the_cli_to_refuse(value,
                                                                                   override):
    command = _dry_run("evaluate", "RUNS=a-seed0 b-seed0", f"ENSEMBLE={value}")
    assert "runs=[a-seed0,b-seed0]" in command and f" {override} " in f"{command} "


def test_evaluate_without_ensemble_passes_no_ensemble_override():
    command = _dry_run("evaluate", "RUNS=a-seed0", "VIEWS=none")
    assert "runs=[a-seed0] views=none" in command and "ensemble=" not in command
