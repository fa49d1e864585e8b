import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fewlabels.cli import main as cli_main
from fewlabels.data.fashion_mnist import read_train_labels_for_label_database
from fewlabels.oracle import BudgetExceeded, LabelDatabaseError, Oracle, init_database, stats
from fewlabels.oracle.database import sqlite_path


def _sql(statement: str, *args: object) -> list[tuple]:
    """A statement on the test's database as its owner, whichever the backend."""
    url = os.environ["FEWLABELS_LABEL_DB"]
    if url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(statement.replace("?", "%s"), args or None)
            return cur.fetchall() if cur.description else []
    with sqlite3.connect(sqlite_path(url)) as conn:
        return conn.execute(statement, args).fetchall()


def _rows(run_id: str) -> list[tuple[int, str]]:
    return [tuple(r) for r in _sql("SELECT image_id, purpose FROM queries WHERE run_id = ? "
                                   "ORDER BY image_id", run_id)]


def test_labels_are_the_official_ones_and_every_reveal_is_recorded(backend):
    truth = read_train_labels_for_label_database()
    ids = [59999, 0, 31337, 7]
    with Oracle("r", budget=10) as oracle:
        assert oracle.query(ids).tolist() == truth[ids].tolist()
        assert oracle.used == 4 and oracle.remaining == 6
    assert [i for i, _ in _rows("r")] == sorted(ids)
    assert {p for _, p in _rows("r")} == {"probe"}


def test_asking_again_costs_nothing_and_returns_the_same_labels(backend):
    with Oracle("r", budget=5) as oracle:
        first = oracle.query([1, 2, 3])
        assert oracle.query(np.array([3, 2, 1])).tolist() == first[::-1].tolist()
        oracle.query([3, 4])  # one new id
        assert oracle.used == 4
    with Oracle("r", budget=5) as again:  # another process, same run: still free
        assert again.query([1, 2, 3, 4]).shape == (4,) and again.used == 4


def test_budget_refuses_the_whole_query_and_says_what_remains(backend):
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
def test_bad_ids_are_refused_and_nothing_is_recorded(bad, message, backend):
    with Oracle("r", budget=100) as oracle, pytest.raises(ValueError, match=message):
        oracle.query(bad)
    assert _rows("r") == []


@pytest.mark.parametrize("url, message", [
    ("mysql://db/labels", "use sqlite:///PATH or postgresql://"),
    ("labels.sqlite", "use sqlite:///PATH or postgresql://"),
    ("postgresql://nobody@127.0.0.1:9/labels", "cannot connect to PostgreSQL"),
])
def test_unknown_or_unreachable_urls_are_clear_errors(url, message):
    with pytest.raises(LabelDatabaseError, match=message):
        Oracle("r", url=url)


WORKER = """
import sys
import time
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


def test_four_processes_share_one_budget_exactly(tmp_path, backend):
    """4 processes x 1,000 one-id queries against one budget of 2,500: exactly 2,500 rows, the
    other 1,500 refused."""
    Oracle("shared", budget=2500).close()  # build the database once
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(start), "1000", "2500"],
                              stdout=subprocess.PIPE, text=True) for start in range(0, 4000, 1000)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ok = sum(int(o[0]) for o in outs)
    refused = sum(int(o[1]) for o in outs)
    assert ok == 2500 and refused == 1500
    assert len(_rows("shared")) == 2500


def _assert_integrity() -> None:
    """The database's own checks: SQLite's integrity_check; on PostgreSQL, amcheck over the
    primary keys, and no query row without its run or label."""
    url = os.environ["FEWLABELS_LABEL_DB"]
    if url.startswith("postgresql://"):
        _sql("CREATE EXTENSION IF NOT EXISTS amcheck")
        for index in ("labels_pkey", "runs_pkey", "queries_pkey"):
            _sql("SELECT bt_index_check(?::regclass, true)", index)
        assert _sql("SELECT count(*) FROM queries q LEFT JOIN labels l USING (image_id) "
                    "WHERE l.image_id IS NULL")[0][0] == 0
    else:
        assert _sql("PRAGMA integrity_check")[0][0] == "ok"


KILLED = """
import sys
import time
from fewlabels.oracle import Oracle
with Oracle("killed", budget=None) as oracle:
    for image_id in range(60000):
        label = oracle.query([image_id])[0]
        print(image_id, label, flush=True)
"""


def test_kill_9_mid_run_leaves_a_consistent_database_that_recorded_what_it_told(backend):
    Oracle("killed").close()
    proc = subprocess.Popen([sys.executable, "-c", KILLED], stdout=subprocess.PIPE, text=True)
    told = [int(proc.stdout.readline().split()[0]) for _ in range(300)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _assert_integrity()
    recorded = {i for i, _ in _rows("killed")}
    assert set(told) <= recorded
    with Oracle("killed") as oracle:  # still usable; the recorded ids are free again
        assert oracle.used == len(recorded)
        oracle.query(told[:10])
        assert oracle.used == len(recorded)


def test_stats_command(capsys, backend):
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


BARRIER_WORKER = """
import sys, time
from pathlib import Path
from fewlabels.oracle import BudgetExceeded, Oracle
index, start, batches, size, budget, gate = sys.argv[1:7]
index, start, batches, size, budget = map(int, (index, start, batches, size, budget))
oracle = Oracle("raced", budget=budget)
Path(gate, f"ready-{index}").touch()
while not Path(gate, "go").exists():
    time.sleep(0.001)
for b in range(batches):
    ids = list(range(start + b * size, start + (b + 1) * size))
    try:
        labels = oracle.query(ids)
        print(" ".join(map(str, ids)), flush=True)
    except BudgetExceeded:
        pass
oracle.close()
"""


def test_processes_released_together_never_overspend_and_lose_no_row(tmp_path, backend):
    """Six processes wait at a barrier, then query batches of 7 that straddle a budget of 100:
    the total stays within the budget and every label a process was given is recorded."""
    Oracle("raced", budget=100).close()
    gate = tmp_path / "gate"
    gate.mkdir()
    n, batches, size = 6, 5, 7
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER_WORKER, str(i), str(i * 1000),
                               str(batches), str(size), "100", str(gate)],
                              stdout=subprocess.PIPE, text=True) for i in range(n)]
    deadline = time.time() + 120
    while len(list(gate.glob("ready-*"))) < n and time.time() < deadline:
        time.sleep(0.01)
    (gate / "go").touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    received = {int(i) for out in outs for line in out.splitlines() for i in line.split()}
    recorded = {i for i, _ in _rows("raced")}
    assert recorded == received  # every label given is on record, nothing else is
    assert 100 - size < len(recorded) <= 100  # the budget is filled up to its last batch


BUILDER = """
import sys, time
from pathlib import Path
from fewlabels.oracle import ensure_database
gate = Path(sys.argv[1])
while not (gate / "go").exists():
    time.sleep(0.001)
print(ensure_database())
"""


def test_racing_first_builds_make_one_whole_database(tmp_path):
    gate = tmp_path / "gate"
    gate.mkdir()
    path = sqlite_path(os.environ["FEWLABELS_LABEL_DB"])
    assert not path.exists()
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(gate)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    time.sleep(1.0)
    (gate / "go").touch()
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and set(outs) == {str(path)}
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 60000
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert not list(path.parent.glob(f".{path.name}.*"))  # no leftover half-built file


def test_an_old_database_is_migrated_and_a_newer_one_refused():
    from fewlabels.oracle.database import SCHEMA_VERSION, schema_version

    with Oracle("before", budget=5) as oracle:
        oracle.query([1, 2])
    path = sqlite_path(os.environ["FEWLABELS_LABEL_DB"])
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE meta")  # as databases were before the meta table
        assert schema_version(conn) == 0
    with Oracle("before", budget=5) as oracle:
        assert oracle.used == 2  # the ledger survives the migration
    with sqlite3.connect(path) as conn:
        assert schema_version(conn) == SCHEMA_VERSION
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LabelDatabaseError, match="schema version 99, newer"):
        Oracle("before", budget=5)


def test_oracle_init_is_idempotent_and_refuses_altered_labels(capsys, backend):
    assert cli_main(["oracle", "init"]) == 0
    assert cli_main(["oracle", "init"]) == 0
    out = capsys.readouterr().out
    assert out.count("60000 labels, the official ones; schema version 1") == 2
    _sql("UPDATE labels SET label = (label + 1) % 10 WHERE image_id = 7")
    assert cli_main(["oracle", "init"]) == 2
    assert "differ from the official training label file" in capsys.readouterr().err


def test_a_server_restart_between_queries_reconnects_and_records_once(postgres_server,
                                                                      postgres_url):
    with Oracle("restarted", budget=10) as oracle:
        first = oracle.query([1, 2, 3])
        postgres_server.restart()  # the open connection dies with the old server
        assert oracle.query([3, 2, 1]).tolist() == first[::-1].tolist()
        assert oracle.query([4]).shape == (1,)
        assert oracle.used == 4
    assert [i for i, _ in _rows("restarted")] == [1, 2, 3, 4]


def test_a_worker_role_can_only_ask_through_the_functions(postgres_server, postgres_url):
    """On PostgreSQL the rules are the server's: a member of fewlabels_worker gets labels only
    through fewlabels_query (recorded and counted), and cannot read labels or edit the ledger."""
    import uuid

    import psycopg

    from fewlabels.oracle.postgres import WORKER_ROLE

    role = f"w_{uuid.uuid4().hex[:8]}"
    _sql(f"CREATE ROLE {role} LOGIN IN ROLE {WORKER_ROLE}")
    worker_url = postgres_url.replace("//postgres@", f"//{role}@")
    with Oracle("worker", budget=3, url=worker_url) as oracle:
        assert oracle.query([5, 6]).tolist() == read_train_labels_for_label_database()[
            [5, 6]].tolist()
        with pytest.raises(BudgetExceeded, match="needs 2 new labels but only 1"):
            oracle.query([7, 8])
    assert [i for i, _ in _rows("worker")] == [5, 6]
    with psycopg.connect(worker_url, autocommit=True) as conn:
        for statement in ("SELECT label FROM labels LIMIT 1",
                          "DELETE FROM queries",
                          "INSERT INTO queries VALUES ('worker', 9, 'x', 0)",
                          "UPDATE runs SET budget = NULL"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    assert [i for i, _ in _rows("worker")] == [5, 6]
    outsider = f"o_{uuid.uuid4().hex[:8]}"  # logs in, but is not a worker
    _sql(f"CREATE ROLE {outsider} LOGIN")
    with pytest.raises(LabelDatabaseError, match=f"member of {WORKER_ROLE}"):
        Oracle("outsider", url=postgres_url.replace("//postgres@", f"//{outsider}@"))


def test_a_ledger_moves_from_sqlite_to_postgresql(tmp_path, postgres_url, capsys, monkeypatch):
    """`oracle export` from the SQLite file, `oracle import` into PostgreSQL: the same runs,
    budgets and rows; importing again adds nothing; a clashing budget is refused whole."""
    sqlite_url = f"sqlite:///{tmp_path / 'labels.sqlite'}"
    with Oracle("moved", budget=5, url=sqlite_url) as oracle:
        oracle.query([4, 8, 15])
    Oracle("empty", url=sqlite_url).close()
    ledger = tmp_path / "ledger.json"
    assert cli_main(["oracle", "export", "--db", sqlite_url, "--out", str(ledger)]) == 0
    pg_url = postgres_url
    for _ in range(2):
        assert cli_main(["oracle", "import", str(ledger), "--db", pg_url]) == 0
    rows = [(r.run_id, r.budget, r.labels_revealed) for r in stats(pg_url)]
    assert rows == [("moved", 5, 3), ("empty", None, 0)]
    with Oracle("moved", budget=5, url=pg_url) as oracle:  # the imported budget holds
        assert oracle.used == 3
        with pytest.raises(BudgetExceeded):
            oracle.query([16, 23, 42])
    monkeypatch.setenv("FEWLABELS_LABEL_DB", sqlite_url)
    _sql("UPDATE runs SET budget = 6 WHERE run_id = 'moved'")
    assert cli_main(["oracle", "export", "--out", str(ledger)]) == 0
    assert cli_main(["oracle", "import", str(ledger), "--db", pg_url]) == 2
    assert "exist in" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert cli_main(["oracle", "import", str(tmp_path / "bad.json"), "--db", pg_url]) == 2
    assert "cannot be read as a ledger" in capsys.readouterr().err


def test_a_postgresql_database_of_a_newer_schema_is_refused(postgres_url):
    with Oracle("kept", budget=3) as oracle:
        oracle.query([1])
    _sql("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LabelDatabaseError, match="schema version 99: newer than this fewlabels"):
        Oracle("kept", budget=3)
    with pytest.raises(LabelDatabaseError, match="schema version 99, newer"):
        init_database(postgres_url)
    _sql("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with Oracle("kept", budget=3) as oracle:
        assert oracle.used == 1
