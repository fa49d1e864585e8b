import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fewlabels.cli import main as cli_main
from fewlabels.data.fashion_mnist import read_train_labels_for_label_database
from fewlabels.oracle import BudgetExceeded, LabelDatabaseError, Oracle, stats
from fewlabels.oracle.database import sqlite_path


def _rows(run_id: str) -> list[tuple[int, str]]:
    path = sqlite_path(os.environ["FEWLABELS_LABEL_DB"])
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT image_id, purpose FROM queries WHERE run_id = ? "
                            "ORDER BY image_id", (run_id,)).fetchall()


def test_labels_are_the_official_ones_and_every_reveal_is_recorded():
    truth = read_train_labels_for_label_database()
    ids = [59999, 0, 31337, 7]
    with Oracle("r", budget=10) as oracle:
        assert oracle.query(ids).tolist() == truth[ids].tolist()
        assert oracle.used == 4 and oracle.remaining == 6
    assert [i for i, _ in _rows("r")] == sorted(ids)
    assert {p for _, p in _rows("r")} == {"probe"}


def test_asking_again_costs_nothing_and_returns_the_same_labels():
    with Oracle("r", budget=5) as oracle:
        first = oracle.query([1, 2, 3])
        assert oracle.query(np.array([3, 2, 1])).tolist() == first[::-1].tolist()
        oracle.query([3, 4])  # one new id
        assert oracle.used == 4
    with Oracle("r", budget=5) as again:  # another process, same run: still free
        assert again.query([1, 2, 3, 4]).shape == (4,) and again.used == 4


def test_budget_refuses_the_whole_query_and_says_what_remains():
    with Oracle("r", budget=5) as oracle:
        oracle.query([10, 11, 12])
        with pytest.raises(BudgetExceeded, match="needs 3 new labels but only 2 of the budget "
                                                 "of 5 remain; nothing was revealed"):
            oracle.query([12, 13, 14, 15])
        assert oracle.used == 3 and len(_rows("r")) == 3
        oracle.query([12, 13, 14])  # exactly at budget is fine
    with pytest.raises(ValueError, match="created with budget 5, not 7"):
        Oracle("r", budget=7)


@pytest.mark.parametrize("bad, message", [
    ([-1], "out of range"), ([60000], "out of range"), ([3, 4, 3], "repeated within one query"),
    ([1.0], "must be integers"), (["5"], "must be integers"), ([True], "must be integers"),
])
def test_bad_ids_are_refused_and_nothing_is_recorded(bad, message):
    with Oracle("r", budget=100) as oracle, pytest.raises(ValueError, match=message):
        oracle.query(bad)
    assert _rows("r") == []


def test_only_sqlite_urls_and_a_clear_error_otherwise():
    with pytest.raises(LabelDatabaseError, match="only 'sqlite:///PATH' is implemented"):
        Oracle("r", url="postgresql://db/labels")


WORKER = """
import sys
from fewlabels.oracle import BudgetExceeded, Oracle
start, count, budget = map(int, sys.argv[1:4])
ok = refused = 0
with Oracle("shared", budget=budget) as oracle:
    for image_id in range(start, start + count):
        try:
            oracle.query([image_id])
            ok += 1
        except BudgetExceeded:
            refused += 1
print(ok, refused)
"""


def test_two_processes_lose_no_rows_and_never_overspend(tmp_path):
    Oracle("shared", budget=1500).close()  # build the database once
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(start), "1000", "1500"],
                              stdout=subprocess.PIPE, text=True) for start in (0, 1000)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ok = sum(int(o[0]) for o in outs)
    refused = sum(int(o[1]) for o in outs)
    assert ok == 1500 and refused == 500
    assert len(_rows("shared")) == 1500


KILLED = """
import sys
from fewlabels.oracle import Oracle
with Oracle("killed", budget=None) as oracle:
    for image_id in range(60000):
        label = oracle.query([image_id])[0]
        print(image_id, label, flush=True)
"""


def test_kill_9_mid_run_leaves_a_consistent_database_that_recorded_what_it_told():
    Oracle("killed").close()
    proc = subprocess.Popen([sys.executable, "-c", KILLED], stdout=subprocess.PIPE, text=True)
    told = [int(proc.stdout.readline().split()[0]) for _ in range(300)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    path = sqlite_path(os.environ["FEWLABELS_LABEL_DB"])
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    recorded = {i for i, _ in _rows("killed")}
    assert set(told) <= recorded
    with Oracle("killed") as oracle:  # still usable; the recorded ids are free again
        assert oracle.used == len(recorded)
        oracle.query(told[:10])
        assert oracle.used == len(recorded)


def test_stats_command(capsys):
    with Oracle("a", budget=10) as oracle:
        oracle.query([1, 2, 3])
    Oracle("b").close()
    assert [(r.run_id, r.budget, r.labels_revealed) for r in stats()] == [("a", 10, 3),
                                                                          ("b", None, 0)]
    assert cli_main(["oracle", "stats", "--run", "a"]) == 0
    out = capsys.readouterr().out
    assert "a" in out and " 3 " in out and "30%" in out and "1 runs, 3 labels" in out
    assert cli_main(["oracle", "stats", "--run", "nope"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_database_is_built_atomically_once(tmp_path):
    path = sqlite_path(os.environ["FEWLABELS_LABEL_DB"])
    assert not path.exists()
    Oracle("x").close()
    assert path.exists() and not list(Path(path.parent).glob(".*building"))
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 60000
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
