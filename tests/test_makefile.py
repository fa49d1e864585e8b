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


def _check_space(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    return subprocess.run(["make", "--no-print-directory", "check-space",
                           f"VENV={tmp_path / 'new' / '.venv'}", *args],
                          cwd=ROOT, capture_output=True, text=True)


def test_check_space_stops_setup_with_what_to_do_when_the_disk_is_short(tmp_path):
    done = _check_space(tmp_path, "SETUP_MIN_FREE_GB=100000000")
    assert done.returncode == 2
    assert f"GB free on the disk of {tmp_path}" in done.stdout
    assert "needs 100000000 GB free" in done.stdout and "SETUP_MIN_FREE_GB=0" in done.stdout


def test_check_space_passes_when_enough_is_free_or_torch_is_already_installed(tmp_path):
    assert _check_space(tmp_path, "SETUP_MIN_FREE_GB=0").returncode == 0
    (tmp_path / "new" / ".venv" / "lib" / "python3.11" / "site-packages" / "torch").mkdir(
        parents=True)
    done = _check_space(tmp_path, "SETUP_MIN_FREE_GB=100000000")
    assert done.returncode == 0 and done.stdout == ""


@pytest.mark.parametrize("value", ["", "7GB", "-1"])
def test_check_space_refuses_a_size_that_is_not_a_whole_number(tmp_path, value):
    done = _check_space(tmp_path, f"SETUP_MIN_FREE_GB={value}")
    assert done.returncode == 2 and "give a whole number of GB" in done.stdout
