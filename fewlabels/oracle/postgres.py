"""The label database on PostgreSQL: many workers on many hosts sharing one budget.

psycopg 3 directly, not SQLAlchemy: the backend is seven server-side functions and one COPY, so a
query builder would add a dependency and hide the one thing that matters here, the transaction.

Honesty is enforced by the server, not promised: ``fewlabels oracle init --db URL`` (run as the
database's owner) creates the tables ``labels``, ``runs``, ``queries`` and ``meta``, and the
functions below as ``SECURITY DEFINER``; PUBLIC may use none of them. A worker logs in as a role
that is a member of ``fewlabels_worker``: it may call the functions, and cannot read ``labels``
nor write ``queries``, so every label it sees is recorded and counted.

``fewlabels_query`` locks the run's row (``SELECT ... FOR UPDATE``), counts what the run has
used and what the ids would add, refuses the whole query above the budget, and records the new
ids, all in one transaction that commits before the labels leave the server. Concurrent
workers on one run queue on that lock; a worker killed mid-query either committed (its rows are
there, asking again is free) or did not (nothing was revealed).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from fewlabels.oracle.common import (
    SCHEMA_VERSION,
    LabelDatabaseError,
    RunStats,
    budget_exceeded,
    labels_checksum,
)

WORKER_ROLE = "fewlabels_worker"
BUDGET_SQLSTATE = "FB001"
FUNCTIONS = ("fewlabels_n_images()", "fewlabels_schema_version()",
             "fewlabels_open_run(text, integer)", "fewlabels_used(text)",
             "fewlabels_query(text, integer[], text)", "fewlabels_stats(text)",
             "fewlabels_distinct(text[])")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS labels (image_id integer PRIMARY KEY, label smallint NOT NULL);
CREATE TABLE IF NOT EXISTS runs (run_id text PRIMARY KEY, budget integer,
                                 created_at double precision NOT NULL);
CREATE TABLE IF NOT EXISTS queries (
    run_id text NOT NULL REFERENCES runs(run_id),
    image_id integer NOT NULL REFERENCES labels(image_id),
    purpose text NOT NULL,
    queried_at double precision NOT NULL,
    PRIMARY KEY (run_id, image_id));
CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL);
INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}') ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION fewlabels_n_images() RETURNS bigint LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = public, pg_temp AS $$ SELECT count(*) FROM labels $$;

CREATE OR REPLACE FUNCTION fewlabels_schema_version() RETURNS integer LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = public, pg_temp
AS $$ SELECT value::integer FROM meta WHERE key = 'schema_version' $$;

CREATE OR REPLACE FUNCTION fewlabels_open_run(p_run text, p_budget integer)
RETURNS TABLE(stored_budget integer) LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp AS $$
BEGIN
    INSERT INTO runs VALUES (p_run, p_budget, extract(epoch FROM clock_timestamp()))
    ON CONFLICT (run_id) DO NOTHING;
    RETURN QUERY SELECT r.budget FROM runs r WHERE r.run_id = p_run;
END $$;

CREATE OR REPLACE FUNCTION fewlabels_used(p_run text) RETURNS bigint LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = public, pg_temp
AS $$ SELECT count(*) FROM queries WHERE run_id = p_run $$;

CREATE OR REPLACE FUNCTION fewlabels_query(p_run text, p_ids integer[], p_purpose text)
RETURNS TABLE(label smallint) LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp AS $$
DECLARE
    v_budget integer;
    v_used bigint;
    v_new bigint;
BEGIN
    SELECT r.budget INTO v_budget FROM runs r WHERE r.run_id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no run %', p_run USING ERRCODE = 'no_data_found';
    END IF;
    SELECT count(*) INTO v_used FROM queries q WHERE q.run_id = p_run;
    SELECT count(*) INTO v_new FROM unnest(p_ids) AS w(image_id) WHERE NOT EXISTS (
        SELECT 1 FROM queries q WHERE q.run_id = p_run AND q.image_id = w.image_id);
    IF v_budget IS NOT NULL AND v_used + v_new > v_budget THEN
        RAISE EXCEPTION 'budget' USING ERRCODE = '{BUDGET_SQLSTATE}',
            DETAIL = v_new || ' ' || (v_budget - v_used);
    END IF;
    INSERT INTO queries SELECT p_run, w.image_id, p_purpose, extract(epoch FROM clock_timestamp())
        FROM unnest(p_ids) AS w(image_id) ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT l.label FROM unnest(p_ids) WITH ORDINALITY AS w(image_id, pos)
        JOIN labels l ON l.image_id = w.image_id ORDER BY w.pos;
END $$;

CREATE OR REPLACE FUNCTION fewlabels_stats(p_run text)
RETURNS TABLE(run_id text, budget integer, revealed bigint, first_query double precision,
              last_query double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp AS $$
    SELECT r.run_id, r.budget, count(q.image_id), min(q.queried_at), max(q.queried_at)
    FROM runs r LEFT JOIN queries q ON q.run_id = r.run_id
    WHERE p_run IS NULL OR r.run_id = p_run
    GROUP BY r.run_id, r.budget, r.created_at ORDER BY r.created_at $$;

CREATE OR REPLACE FUNCTION fewlabels_distinct(p_runs text[]) RETURNS bigint LANGUAGE sql STABLE
SECURITY DEFINER SET search_path = public, pg_temp
AS $$ SELECT count(DISTINCT image_id) FROM queries WHERE run_id = ANY(p_runs) $$;

DO $$ BEGIN
    CREATE ROLE {WORKER_ROLE} NOLOGIN;
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
REVOKE ALL ON labels, runs, queries, meta FROM PUBLIC;
""" + "".join(f"REVOKE ALL ON FUNCTION {f} FROM PUBLIC;\n"
              f"GRANT EXECUTE ON FUNCTION {f} TO {WORKER_ROLE};\n" for f in FUNCTIONS)

# version -> SQL taking a database from it to the next (run by `oracle init` as the owner).
MIGRATIONS: dict[int, str] = {}

T = TypeVar("T")


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(//[^:/@]+):[^@]*@", r"\1:***@", url)


def _connect(url: str) -> Any:
    import psycopg

    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as err:
        raise LabelDatabaseError(
            f"label database {safe_url(url)}: cannot connect to PostgreSQL ({str(err).strip()}). "
            "Check that the server runs and the URL's host, port, user and database are right"
        ) from err


def _explain(err: Exception, url: str) -> LabelDatabaseError:
    import psycopg

    text = str(err).strip()
    if isinstance(err, psycopg.errors.UndefinedFunction | psycopg.errors.UndefinedTable):
        why = ("is not a fewlabels label database yet: run 'fewlabels oracle init --db URL' as "
               "the database's owner")
    elif isinstance(err, psycopg.errors.InsufficientPrivilege):
        why = (f"refused this role: a worker's role must be a member of {WORKER_ROLE} "
               f"(as the owner: GRANT {WORKER_ROLE} TO <role>)")
    elif isinstance(err, psycopg.OperationalError):
        why = "lost its connection and could not reconnect; nothing was recorded for this query"
    else:
        why = "could not be used"
    return LabelDatabaseError(f"label database {safe_url(url)} {why} (postgresql: {text})")


class PostgresStore:
    """A connection used through the ``fewlabels_*`` functions only, as a worker role would."""

    def __init__(self, url: str) -> None:
        self.url, self.location = url, safe_url(url)
        self._conn = _connect(url)
        version = self._call(lambda c: c.execute("SELECT fewlabels_schema_version()")
                             .fetchone()[0])
        if version != SCHEMA_VERSION:
            newer = version > SCHEMA_VERSION
            raise LabelDatabaseError(
                f"label database {self.location} has schema version {version}: "
                + ("newer than this fewlabels knows; upgrade fewlabels" if newer else
                   "run 'fewlabels oracle init --db URL' as its owner to migrate it"))
        self.n_images = self._call(lambda c: c.execute("SELECT fewlabels_n_images()")
                                   .fetchone()[0])

    def _call(self, work: Callable[[Any], T]) -> T:
        """Run ``work`` (one statement: one transaction); after a lost connection, reconnect
        once and run it again. A statement that did not commit revealed nothing, and one that
        did is free to repeat, so the retry can neither lose nor double-count a label."""
        import psycopg

        for attempt in (0, 1):
            try:
                return work(self._conn)
            except psycopg.Error as err:
                if err.sqlstate == BUDGET_SQLSTATE:
                    raise
                lost = isinstance(err, psycopg.OperationalError) and (
                    self._conn.broken or self._conn.closed)
                if attempt == 1 or not lost:
                    raise _explain(err, self.url) from err
                self._conn = _connect(self.url)  # a server that is still down: a clear error
        raise AssertionError("unreachable")

    def open_run(self, run_id: str, budget: int | None) -> int | None:
        return self._call(lambda c: c.execute("SELECT * FROM fewlabels_open_run(%s, %s)",
                                              (run_id, budget)).fetchone()[0])

    def used(self, run_id: str) -> int:
        return self._call(lambda c: c.execute("SELECT fewlabels_used(%s)", (run_id,))
                          .fetchone()[0])

    def query(self, run_id: str, ids: list[int], purpose: str, budget: int | None) -> np.ndarray:
        import psycopg

        try:
            rows = self._call(lambda c: c.execute("SELECT * FROM fewlabels_query(%s, %s, %s)",
                                                  (run_id, ids, purpose)).fetchall())
        except psycopg.Error as err:
            if err.sqlstate != BUDGET_SQLSTATE:
                raise
            n_new, remaining = (int(v) for v in (err.diag.message_detail or "0 0").split())
            raise budget_exceeded(run_id, n_new, remaining, budget) from None
        return np.array([r[0] for r in rows], dtype=np.int64)

    def stats(self, run_id: str | None) -> list[RunStats]:
        rows = self._call(lambda c: c.execute("SELECT * FROM fewlabels_stats(%s)", (run_id,))
                          .fetchall())
        return [RunStats(*row) for row in rows]

    def distinct(self, run_ids: list[str]) -> int:
        return self._call(lambda c: c.execute("SELECT fewlabels_distinct(%s)", (run_ids,))
                          .fetchone()[0])

    def ledger(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Runs and queries, read directly: the owner's access (a worker is refused)."""
        return self._call(lambda c: (
            c.execute("SELECT run_id, budget, created_at FROM runs "
                      "ORDER BY created_at, run_id").fetchall(),
            c.execute("SELECT run_id, image_id, purpose, queried_at FROM queries "
                      "ORDER BY run_id, image_id").fetchall()))

    def load_ledger(self, runs: list[list[Any]], queries: list[list[Any]]) -> None:
        def work(conn: Any) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany("INSERT INTO runs VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                                runs)
                cur.executemany("INSERT INTO queries VALUES (%s, %s, %s, %s) "
                                "ON CONFLICT DO NOTHING", queries)

        self._call(work)

    def close(self) -> None:
        self._conn.close()


def init_postgres(url: str, labels: np.ndarray) -> tuple[str, int, int]:
    """Create or update the schema, functions and worker role, load the labels into an empty
    ``labels`` table, and check them against the official file. Idempotent; concurrent calls
    serialize on an advisory lock. Run it as the database's owner."""
    import psycopg

    conn = _connect(url)
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('fewlabels-oracle-init'))")
            conn.execute(SCHEMA)
            version = int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
                          .fetchone()[0])
            while version < SCHEMA_VERSION:
                conn.execute(MIGRATIONS[version])
                version += 1
                conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'",
                             (str(version),))
            if version > SCHEMA_VERSION:
                raise LabelDatabaseError(
                    f"label database {safe_url(url)} has schema version {version}, newer than "
                    f"this fewlabels knows ({SCHEMA_VERSION}): upgrade fewlabels to use it")
            if conn.execute("SELECT count(*) FROM labels").fetchone()[0] == 0:
                with conn.cursor().copy("COPY labels (image_id, label) FROM STDIN") as copy:
                    for i, y in enumerate(labels):
                        copy.write_row((i, int(y)))
        checksum, count = conn.execute(
            "SELECT md5(coalesce(string_agg(image_id || ':' || label || E'\\n', '' "
            "ORDER BY image_id), '')), count(*) FROM labels").fetchone()
    except psycopg.Error as err:
        raise _explain(err, url) from err
    finally:
        conn.close()
    if checksum != labels_checksum(enumerate(labels)):
        raise LabelDatabaseError(
            f"label database {safe_url(url)} holds labels that differ from the official training "
            "label file: it was altered or built from other data. Load it into an empty "
            "database with 'fewlabels oracle init --db URL'")
    return safe_url(url), count, version


__all__ = ["PostgresStore", "WORKER_ROLE", "init_postgres", "safe_url"]
