"""Bad input fails early with a clear error, before any file or database row is written; damaged
caches are rebuilt (issue 10's hostile-user findings that concern this stage)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from fewlabels.config import compose
from fewlabels.models import open_checkpoint
from fewlabels.names import safe_name
from fewlabels.oracle import stats
from fewlabels.probe import features as features_module
from fewlabels.probe import run as probe_run
from fewlabels.ssl.train import pretrain


@pytest.mark.parametrize("bad", ["/tmp/victim", "..", ".", "../../evil", "a/b", ".hidden",
                                 "-rf", "", "x" * 129, "/../../../evilcurve-"])
def test_unsafe_names_are_refused(bad):
    with pytest.raises(ValueError, match="one plain name"):
        safe_name(bad, "run_name")


def test_safe_names_pass():
    assert safe_name("simclr-cpu_seed0.v2", "run_name") == "simclr-cpu_seed0.v2"
    assert safe_name("", "run_tag", allow_empty=True) == ""


@pytest.mark.parametrize("override", ["run_name=..", "run_name=../../evil",
                                      f"run_name=/tmp/victim-{uuid.uuid4().hex}"])
def test_pretrain_refuses_a_run_name_that_escapes_its_folder(tiny_config, tmp_path, override):
    victim = Path(override.split("=", 1)[1])
    with pytest.raises(ValueError, match="run_name"):
        pretrain(tiny_config(tmp_path, override))
    assert not (tmp_path / "ckpt").exists()
    assert not (victim.is_absolute() and victim.exists())


@pytest.mark.parametrize("override, message", [("trainer.max_epochs=0", "max_epochs=0"),
                                               ("data.batch_size=100000", "data.batch_size")])
def test_pretrain_refuses_bad_lengths_before_writing(tiny_config, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        pretrain(tiny_config(tmp_path, override))
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("command, overrides, message", [
    ("probe", ["seeds=0"], "seeds=0"), ("probe", ["n=0"], "n=0"),
    ("probe", ["n=60001", "pool_limit=null"], "n=60001"),
    ("probe", ["strategy=nope"], "strategy='nope'"),
    ("probe", ["probe=nope"], "probe='nope'"),
    ("curve", ["run_tag=/../../../evilcurve-"], "run_tag"),
    ("search", ["run_tag=../x"], "run_tag"),
])
def test_probe_commands_validate_before_any_work(tiny_checkpoint, tmp_path, monkeypatch, command,
                                                 overrides, message):
    monkeypatch.setattr(probe_run, "features", lambda *a, **k: pytest.fail("did work first"))
    cfg = compose("probe", [f"checkpoint={tiny_checkpoint}", f"results_dir={tmp_path / 'r'}",
                            "pool_limit=2048", *overrides])
    with pytest.raises(ValueError, match=message):
        getattr(probe_run, command)(cfg)
    assert not (tmp_path / "r").exists()
    assert not Path(str(tmp_path / "labels.sqlite")).exists() or stats() == []


def test_a_truncated_feature_cache_is_rebuilt(tiny_checkpoint, tmp_path):
    ckpt_dir = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, ckpt_dir, ignore=shutil.ignore_patterns("features"))
    images = probe_run.load_train_images().images[:300]
    test_images = probe_run.load_test_set().images[:100]
    first = features_module.features(open_checkpoint(ckpt_dir), images, test_images)
    (cache,) = (ckpt_dir / "features").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:500])
    again = features_module.features(open_checkpoint(ckpt_dir), images, test_images)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    with np.load(cache, allow_pickle=False) as repaired:  # replaced by a whole file
        assert np.array_equal(repaired["train"], first[0])


def test_a_truncated_graph_cache_is_rebuilt(tiny_checkpoint, tmp_path):
    ckpt_dir = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, ckpt_dir, ignore=shutil.ignore_patterns("features"))
    cfg = compose("probe", [f"checkpoint={ckpt_dir}", "pool_limit=500"])
    first = probe_run.embedded(cfg).graph(5)
    (graph,) = (ckpt_dir / "features").glob("*knn5.npz")
    graph.write_bytes(graph.read_bytes()[:300])
    again = probe_run.embedded(cfg).graph(5)
    assert np.array_equal(first[0], again[0]) and np.allclose(first[1], again[1])


def test_a_damaged_last_ckpt_is_named_with_the_fix(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path, "trainer.max_epochs=1")
    folder = pretrain(cfg)
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ValueError, match="last.ckpt cannot be loaded.*Move it away"):
        pretrain(tiny_config(tmp_path, "trainer.max_epochs=2"))


def _db_path() -> Path:
    import os

    from fewlabels.oracle.database import sqlite_path

    return sqlite_path(os.environ["FEWLABELS_LABEL_DB"])


@pytest.mark.parametrize("damage, message", [
    ("garbage", "not a readable SQLite label database"),
    ("no_tables", "lacks the tables"),
])
def test_a_damaged_label_database_is_named_with_the_fix(damage, message):
    import sqlite3

    from fewlabels.oracle import LabelDatabaseError, Oracle

    path = _db_path()
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 100)
    else:
        sqlite3.connect(path).execute("CREATE TABLE other (x)").connection.close()
    with pytest.raises(LabelDatabaseError, match=message) as caught:
        Oracle("r", budget=1).query([0])
    assert str(path) in str(caught.value)


def test_sqlite_errors_are_explained(tmp_path):
    """A read-only file cannot be made as root (CI runs as root), so the mapping is checked on
    the error sqlite3 raises for it."""
    import sqlite3

    from fewlabels.oracle.database import explain

    path = tmp_path / "labels.sqlite"
    for text, expected in [("attempt to write a readonly database", "cannot be written"),
                           ("unable to open database file", "cannot be written"),
                           ("file is not a database", "not a readable SQLite"),
                           ("database is locked", "locked by another process"),
                           ("no such table: labels", "lacks the tables")]:
        err = explain(sqlite3.OperationalError(text), path)
        assert expected in str(err) and str(path) in str(err)


def test_a_lock_held_too_long_is_named_and_the_wait_is_said(monkeypatch, capsys):
    import sqlite3

    from fewlabels.oracle import LabelDatabaseError, Oracle, database, ensure_database

    path = ensure_database()
    monkeypatch.setattr(database, "LOCK_TIMEOUT_S", 0.5)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(LabelDatabaseError, match="locked by another process"):
            Oracle("r", budget=1)
        assert "waiting up to" in capsys.readouterr().err
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert Oracle("r", budget=1).query([0]).shape == (1,)


def test_a_new_database_is_announced(capsys):
    from fewlabels.oracle import ensure_database

    ensure_database()
    assert "building a new one" in capsys.readouterr().err
