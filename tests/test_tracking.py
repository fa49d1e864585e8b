"""Reading an offline W&B run back: the tests read metrics this way, and W&B's service may still be
writing the file for a moment after ``wandb.finish()`` returns (a CI run once read such a file
and failed on a half-written record)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fewlabels.tracking import IncompleteRunFile, offline_run_file, read_offline_run

ROWS = 700  # enough history to span several 32 KiB blocks (records split across blocks)


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import wandb

    tmp = tmp_path_factory.mktemp("wandb-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        run = wandb.init(project="fewlabels-test", dir=tmp, id="reader-test", mode="offline",
                         config={"lr": 0.03, "name": "tiny"})
        for step in range(ROWS):
            run.log({"train/loss": 1.0 / (step + 1), "train/step_name": f"step-{step:04d}"})
        run.summary["final"] = 0.5
        run.finish()
    return offline_run_file(tmp / "wandb", "reader-test")


def test_a_finished_run_reads_back_whole(run_file):
    assert run_file.stat().st_size > 3 * 32768
    run = read_offline_run(run_file)
    losses = [row["train/loss"] for row in run["history"] if "train/loss" in row]
    assert losses == pytest.approx([1.0 / (step + 1) for step in range(ROWS)])
    assert run["summary"]["final"] == 0.5
    assert run["config"]["lr"] == 0.03 and run["config"]["name"] == "tiny"


def test_a_file_still_being_written_is_waited_for(run_file, tmp_path):
    """The file lacks its last 2,000 bytes (the last rows, the summary, the exit record) when it
    is first read; they land a moment later, as when W&B's service is still flushing after
    ``finish()``."""
    data = run_file.read_bytes()
    live = tmp_path / run_file.name
    live.write_bytes(data[:-2000])

    def finish_writing() -> None:
        time.sleep(0.5)
        with live.open("ab") as f:
            f.write(data[-2000:])

    writer = threading.Thread(target=finish_writing)
    writer.start()
    run = read_offline_run(live, wait_for_exit_s=20)
    writer.join()
    assert run == read_offline_run(run_file)


def test_a_run_that_never_finishes_says_so(run_file, tmp_path):
    data = run_file.read_bytes()
    cut = tmp_path / run_file.name
    cut.write_bytes(data[:40_000])  # a kill mid-run: part of the second block
    with pytest.raises(IncompleteRunFile, match="no exit record.*wait_for_exit_s=0"):
        read_offline_run(cut, wait_for_exit_s=0.3)
    so_far = read_offline_run(cut, wait_for_exit_s=0)["history"]
    whole = read_offline_run(run_file)["history"]
    assert 0 < len(so_far) < len(whole) and so_far == whole[:len(so_far)]


def test_a_corrupt_file_is_named_not_misread(run_file, tmp_path):
    data = bytearray(run_file.read_bytes())
    data[50_000] ^= 0xFF  # one byte flipped inside the second block
    bad = tmp_path / run_file.name
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt.*checksum"):
        read_offline_run(bad, wait_for_exit_s=0)
    not_wandb = tmp_path / "notes.wandb"
    not_wandb.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a W&B run file"):
        read_offline_run(not_wandb)


def test_zeroed_space_after_the_records_is_not_waited_for(run_file, tmp_path):
    """Some writers preallocate: zeros after the exit record are unwritten space, not a record."""
    padded = tmp_path / run_file.name
    padded.write_bytes(run_file.read_bytes() + bytes(1000))
    assert read_offline_run(padded, wait_for_exit_s=0.3) == read_offline_run(run_file)
