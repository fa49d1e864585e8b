"""The label database: the only way a training label reaches code, and every reveal is counted.

:class:`Oracle` is what every stage uses; the URL (``FEWLABELS_LABEL_DB`` or ``url=``) picks the
backend in :data:`BACKENDS`: ``sqlite:///PATH`` (the default, this module) or
``postgresql://user@host:port/db`` (:mod:`fewlabels.oracle.postgres`, for workers on several
hosts sharing one budget). Both keep the tables ``labels``, ``runs``, ``queries`` and ``meta``.

SQLite in WAL mode. ``labels(image_id, label)`` is filled once from the official training
label file; ``queries(run_id, image_id, purpose, queried_at)`` gets one row per label revealed
to a run, written in the same transaction that reads the label and committed before the label
is returned. So a process killed at any point leaves a consistent file, and every label it was
told is on record. A run's cost is its number of distinct ids: asking again is free.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fewlabels.data.fashion_mnist import data_root, read_train_labels_for_label_database
from fewlabels.oracle.common import (
    SCHEMA_VERSION,
    BudgetExceeded,
    LabelDatabaseError,
    RunStats,
    budget_exceeded,
    labels_checksum,
    validate_ids,
)

SCHEMA = """
CREATE TABLE labels (image_id INTEGER PRIMARY KEY, label INTEGER NOT NULL);
CREATE TABLE runs (run_id TEXT PRIMARY KEY, budget INTEGER, created_at REAL NOT NULL);
CREATE TABLE queries (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    image_id INTEGER NOT NULL REFERENCES labels(image_id),
    purpose TEXT NOT NULL,
    queried_at REAL NOT NULL,
    PRIMARY KEY (run_id, image_id)
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
"""
# version -> the SQL that takes a database from it to the next; version 0 is a database made
# before the meta table existed. A later schema change adds one entry here.
MIGRATIONS: dict[int, str] = {
    0: "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL); "
       "INSERT INTO meta VALUES ('schema_version', '1');",
}


def default_url() -> str:
    return os.environ.get("FEWLABELS_LABEL_DB", f"sqlite:///{data_root() / 'labels.sqlite'}")


def sqlite_path(url: str) -> Path:
    """The file of a SQLAlchemy-style ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise LabelDatabaseError(
            f"label database URL {url!r} is not a SQLite URL: use sqlite:///relative/path or "
            "sqlite:////absolute/path")
    return Path(url[len(prefix):])


def backend_of(url: str) -> str:
    """``sqlite`` or ``postgresql``, from the URL's scheme; a clear error for anything else."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    scheme = {"postgres": "postgresql", "postgresql+psycopg": "postgresql"}.get(scheme, scheme)
    if scheme not in ("sqlite", "postgresql"):
        raise LabelDatabaseError(
            f"label database URL {url!r}: use sqlite:///PATH or "
            "postgresql://user@host:port/database (FEWLABELS_LABEL_DB or --db)")
    return scheme


LOCK_TIMEOUT_S = 60.0


def explain(err: sqlite3.Error, path: Path) -> LabelDatabaseError:
    """A sqlite3 error as a LabelDatabaseError that names the file, the fault and the fix."""
    text = str(err)
    if "not a database" in text or "malformed" in text:
        why = ("is not a readable SQLite label database (damaged, or another kind of file). Move "
               "it away and run 'make setup' to build a new one; the record of past queries "
               "lives in that file")
    elif "readonly" in text or "unable to open" in text:
        why = ("cannot be written (a read-only file or folder). The database records every label "
               "it reveals, so it must be writable: fix its permissions or point "
               "FEWLABELS_LABEL_DB at a writable copy")
    elif "no such table" in text:
        why = ("lacks the tables of a fewlabels label database (labels, runs, queries). Point "
               "FEWLABELS_LABEL_DB at the database 'make setup' built, or move this file away")
    elif "locked" in text or "busy" in text:
        why = (f"stayed locked by another process for more than {LOCK_TIMEOUT_S:.0f} s. Wait "
               "for that process to finish, or stop it")
    else:
        why = "could not be used"
    return LabelDatabaseError(f"label database {path} {why} (sqlite: {text})")


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, timeout=LOCK_TIMEOUT_S, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a killed process loses no commit
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("SELECT 1 FROM labels LIMIT 1")
        _migrate(conn, path)
    except sqlite3.Error as err:
        raise explain(err, path) from err
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
                            ).fetchone()
    if not has_meta:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring an older database up to SCHEMA_VERSION, one step at a time, each in a transaction
    (a process racing us finds the work done); refuse one made by a newer fewlabels."""
    if schema_version(conn) == SCHEMA_VERSION:
        return
    while True:
        _begin_immediate(conn, path)
        try:
            version = schema_version(conn)
            if version > SCHEMA_VERSION:
                raise LabelDatabaseError(
                    f"label database {path} has schema version {version}, newer than this "
                    f"fewlabels knows ({SCHEMA_VERSION}): upgrade fewlabels to use it")
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                return
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def init_database(url: str | None = None) -> tuple[str, int, int]:
    """``fewlabels oracle init``: build the database if needed (idempotent) and check that its
    labels are the official training labels. Returns (where, labels, schema version)."""
    url = url or default_url()
    labels = read_train_labels_for_label_database()
    if backend_of(url) == "postgresql":
        from fewlabels.oracle.postgres import init_postgres

        return init_postgres(url, labels)
    path = _ensure_sqlite(url)
    conn = _connect(path)
    try:
        stored = conn.execute("SELECT image_id, label FROM labels ORDER BY image_id")
        if labels_checksum(stored) != labels_checksum(enumerate(labels)):
            raise LabelDatabaseError(
                f"label database {path} holds labels that differ from the official training "
                "label file: it was altered or built from other data. Move it away and run "
                "'fewlabels oracle init' again")
        count = conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
        return str(path), count, schema_version(conn)
    finally:
        conn.close()


def _begin_immediate(conn: sqlite3.Connection, path: Path) -> None:
    """Take the write lock; say so when another process holds it and we have to wait."""
    conn.execute("PRAGMA busy_timeout=0")
    try:
        conn.execute("BEGIN IMMEDIATE")
        return
    except sqlite3.OperationalError as err:
        if "locked" not in str(err) and "busy" not in str(err):
            raise explain(err, path) from err
    finally:
        conn.execute(f"PRAGMA busy_timeout={int(LOCK_TIMEOUT_S * 1000)}")
    print(f"fewlabels: waiting up to {LOCK_TIMEOUT_S:.0f} s for the label database {path}, "
          "locked by another process", file=sys.stderr, flush=True)
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as err:
        raise explain(err, path) from err


def ensure_database(url: str | None = None) -> Path | str:
    """The SQLite file, built from the training label file if it does not exist yet; for
    PostgreSQL, a check that the database was initialized (``fewlabels oracle init``)."""
    url = url or default_url()
    if backend_of(url) == "postgresql":
        store = open_store(url)
        store.close()
        return store.location
    return _ensure_sqlite(url)


def _ensure_sqlite(url: str) -> Path:
    path = sqlite_path(url)
    if path.exists():
        return path
    print(f"fewlabels: no label database at {path}: building a new one (60,000 labels, no "
          "query recorded yet). If you meant an existing one, check FEWLABELS_LABEL_DB.",
          file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = read_train_labels_for_label_database()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.building")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        conn.executescript(SCHEMA)
        conn.executemany("INSERT INTO labels VALUES (?, ?)",
                         ((i, int(y)) for i, y in enumerate(labels)))
        conn.commit()
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()
    try:
        os.link(tmp, path)  # atomic, and never replaces a database another process made
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path


class SQLiteStore:
    """One SQLite file: the budget check and the insert of the query rows under one
    ``BEGIN IMMEDIATE`` (one writer at a time, so the check cannot race)."""

    def __init__(self, url: str, build: bool = True) -> None:
        self.path = _ensure_sqlite(url) if build else sqlite_path(url)
        if not self.path.exists():
            raise LabelDatabaseError(f"no label database at {self.path}; it is created on the "
                                     "first query, or by 'fewlabels oracle init'")
        self.location = str(self.path)
        self._conn = _connect(self.path)
        self.n_images = self._conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0]

    def _transaction(self, work: Any) -> Any:
        _begin_immediate(self._conn, self.path)
        try:
            out = work(self._conn)
            self._conn.execute("COMMIT")
            return out
        except BaseException as err:
            self._conn.execute("ROLLBACK")
            if isinstance(err, sqlite3.Error):
                raise explain(err, self.path) from err
            raise

    def open_run(self, run_id: str, budget: int | None) -> int | None:
        def work(conn: sqlite3.Connection) -> int | None:
            conn.execute("INSERT OR IGNORE INTO runs VALUES (?, ?, ?)",
                         (run_id, budget, time.time()))
            return conn.execute("SELECT budget FROM runs WHERE run_id = ?",
                                (run_id,)).fetchone()[0]

        return self._transaction(work)

    def used(self, run_id: str) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM queries WHERE run_id = ?",
                                  (run_id,)).fetchone()[0]

    def query(self, run_id: str, ids: list[int], purpose: str, budget: int | None) -> np.ndarray:
        def work(conn: sqlite3.Connection) -> list[Any]:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (pos INTEGER, image_id INTEGER)")
            conn.execute("DELETE FROM wanted")
            conn.executemany("INSERT INTO wanted VALUES (?, ?)", enumerate(ids))
            (n_new,) = conn.execute(
                "SELECT COUNT(*) FROM wanted w WHERE NOT EXISTS (SELECT 1 FROM queries q "
                "WHERE q.run_id = ? AND q.image_id = w.image_id)", (run_id,)).fetchone()
            (n_used,) = conn.execute("SELECT COUNT(*) FROM queries WHERE run_id = ?",
                                     (run_id,)).fetchone()
            if budget is not None and n_used + n_new > budget:
                raise budget_exceeded(run_id, n_new, budget - n_used, budget)
            conn.execute("INSERT OR IGNORE INTO queries SELECT ?, image_id, ?, ? FROM wanted",
                         (run_id, purpose, time.time()))
            return conn.execute("SELECT l.label FROM wanted w JOIN labels l "
                                "ON l.image_id = w.image_id ORDER BY w.pos").fetchall()

        return np.array([r[0] for r in self._transaction(work)], dtype=np.int64)

    def stats(self, run_id: str | None) -> list[RunStats]:
        sql = ("SELECT r.run_id, r.budget, COUNT(q.image_id), MIN(q.queried_at), "
               "MAX(q.queried_at) FROM runs r LEFT JOIN queries q ON q.run_id = r.run_id")
        args: tuple[str, ...] = ()
        if run_id is not None:
            sql, args = sql + " WHERE r.run_id = ?", (run_id,)
        rows = self._conn.execute(sql + " GROUP BY r.run_id ORDER BY r.created_at",
                                  args).fetchall()
        return [RunStats(*row) for row in rows]

    def distinct(self, run_ids: list[str]) -> int:
        marks = ",".join("?" * len(run_ids)) or "NULL"
        return self._conn.execute(f"SELECT COUNT(DISTINCT image_id) FROM queries "
                                  f"WHERE run_id IN ({marks})", run_ids).fetchone()[0]

    def ledger(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        return (self._conn.execute("SELECT run_id, budget, created_at FROM runs "
                                   "ORDER BY created_at, run_id").fetchall(),
                self._conn.execute("SELECT run_id, image_id, purpose, queried_at FROM queries "
                                   "ORDER BY run_id, image_id").fetchall())

    def load_ledger(self, runs: list[list[Any]], queries: list[list[Any]]) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR IGNORE INTO runs VALUES (?, ?, ?)", runs)
            conn.executemany("INSERT OR IGNORE INTO queries VALUES (?, ?, ?, ?)", queries)

        self._transaction(work)

    def close(self) -> None:
        self._conn.close()


def _postgres(url: str, build: bool = True) -> Any:
    from fewlabels.oracle.postgres import PostgresStore

    return PostgresStore(url)


# URL scheme -> the store class (the PostgreSQL module, and psycopg, load only when used).
BACKENDS: dict[str, Callable[..., Any]] = {"sqlite": SQLiteStore, "postgresql": _postgres}


def open_store(url: str | None = None, build: bool = True) -> Any:
    """The store behind ``url``: ``open_run``, ``used``, ``query``, ``stats``, ``distinct``,
    ``close``, ``n_images`` and ``location``. ``build``: make a missing SQLite file."""
    url = url or default_url()
    return BACKENDS[backend_of(url)](url, build=build)


class Oracle:
    """Labels for a run, counted against its budget (``None``: no budget)."""

    def __init__(self, run_id: str, budget: int | None = None, url: str | None = None,
                 purpose: str = "probe") -> None:
        if not run_id:
            raise ValueError("run_id must be a non-empty string")
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None, got {budget}")
        self.run_id, self.purpose = run_id, purpose
        self._store = open_store(url)
        try:
            stored = self._store.open_run(run_id, budget)
        except BaseException:
            self._store.close()
            raise
        if stored != budget:
            self._store.close()
            raise ValueError(f"run {run_id!r} was created with budget {stored}, not {budget}: "
                             "pass the same budget or use a new run id")
        self.budget = budget

    @property
    def used(self) -> int:
        """Distinct labels revealed to this run so far."""
        return self._store.used(self.run_id)

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.used

    def query(self, ids: Sequence[int] | np.ndarray, purpose: str | None = None) -> np.ndarray:
        """Labels of ``ids`` (same order). New ids are recorded and counted before returning."""
        wanted = validate_ids(ids, self._store.n_images)
        if not wanted:
            return np.zeros(0, dtype=np.int64)
        return self._store.query(self.run_id, wanted, purpose or self.purpose, self.budget)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Oracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stats(url: str | None = None, run_id: str | None = None) -> list[RunStats]:
    """Labels revealed per run (optionally one run), read without building anything."""
    store = open_store(url, build=False)
    try:
        rows = store.stats(run_id)
    finally:
        store.close()
    if run_id is not None and not rows:
        raise LabelDatabaseError(f"no run {run_id!r} in {store.location}")
    return rows


def export_ledger(url: str | None = None) -> dict[str, Any]:
    """The record of what was revealed (``runs`` and ``queries``, not the labels), to move a
    ledger between databases or back it up. Needs the owner's access on PostgreSQL."""
    store = open_store(url, build=False)
    try:
        runs, queries = store.ledger()
    finally:
        store.close()
    return {"schema_version": SCHEMA_VERSION, "runs": [list(r) for r in runs],
            "queries": [list(q) for q in queries]}


def import_ledger(ledger: dict[str, Any], url: str | None = None) -> tuple[int, int]:
    """Add an exported ledger to a database holding the same labels; rows already there are
    kept. A run whose budget differs from the one already there is refused before any row."""
    if ledger.get("schema_version") != SCHEMA_VERSION or not isinstance(ledger.get("runs"), list) \
            or not isinstance(ledger.get("queries"), list):
        raise LabelDatabaseError("not a fewlabels ledger of schema version "
                                 f"{SCHEMA_VERSION}: make it with 'fewlabels oracle export'")
    store = open_store(url)
    try:
        known = {r.run_id: r.budget for r in store.stats(None)}
        clash = [r[0] for r in ledger["runs"] if r[0] in known and known[r[0]] != r[1]]
        if clash:
            raise LabelDatabaseError(f"runs {clash[:5]} exist in {store.location} with another "
                                     "budget: nothing was imported")
        bad = [q[1] for q in ledger["queries"] if isinstance(q[1], bool)
               or not isinstance(q[1], int) or not 0 <= q[1] < store.n_images]
        if bad:
            raise LabelDatabaseError(f"the ledger names image ids {bad[:5]} that this database "
                                     "does not have: nothing was imported")
        store.load_ledger(ledger["runs"], ledger["queries"])
    finally:
        store.close()
    return len(ledger["runs"]), len(ledger["queries"])


def distinct_ids_revealed(run_ids: Iterable[str], url: str | None = None) -> int:
    """Distinct images whose label was revealed to any of ``run_ids``."""
    store = open_store(url)
    try:
        return store.distinct(list(run_ids))
    finally:
        store.close()


def check_recorded(run_id: str, n_queries: int, where: str | Path, url: str | None = None,
                   ) -> None:
    """A finished result read back from ``where`` reports ``n_queries`` labels of ``run_id``: this
    database must hold them on record, or the count it reports would not be this database's (its
    folder came from another machine, or the database was built anew). The fix: import the ledger
    that recorded them, or run it again."""
    store = open_store(url)
    try:
        have, location = store.distinct([run_id]), store.location  # no password in a location
    finally:
        store.close()
    if have < n_queries:
        raise LabelDatabaseError(
            f"{where} is a finished result of run {run_id!r} that used {n_queries} labels, but "
            f"the label database {location} has {have} of them on record. Import "
            "the ledger that recorded them ('fewlabels oracle import FILE', written by "
            "'fewlabels oracle export' where the run was made), or move the result away to run "
            "it again")


__all__ = ["BACKENDS", "BudgetExceeded", "LabelDatabaseError", "Oracle", "RunStats",
           "SCHEMA_VERSION", "check_recorded", "distinct_ids_revealed", "ensure_database",
           "export_ledger",
           "import_ledger", "init_database",
           "open_store", "stats"]
