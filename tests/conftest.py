"""Shared fixtures: the real dataset (cached by `make setup`), a tiny pretrained checkpoint, and a
label database per test in a temporary folder."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from omegaconf import DictConfig

from fewlabels.config import compose


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("FEWLABELS_LABEL_DB", f"sqlite:///{tmp_path / 'labels.sqlite'}")


def tiny_pretrain_config(tmp: Path, *overrides: str) -> DictConfig:
    return compose("pretrain", ["preset=tiny", f"checkpoint_dir={tmp / 'ckpt'}",
                                f"logger.dir={tmp}", *overrides])


@pytest.fixture(name="tiny_config")
def _tiny_config() -> Callable[..., DictConfig]:
    """``tiny_config(tmp, *overrides)``: the tiny preset writing under ``tmp``."""
    return tiny_pretrain_config


@pytest.fixture(name="keep", scope="session")
def _keep() -> ModuleType:
    """scripts/keep.py (what ``make keep`` stages) as a module: it is a script, not part of the
    package."""
    spec = importlib.util.spec_from_file_location(
        "keep", Path(__file__).resolve().parent.parent / "scripts" / "keep.py")
    keep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(keep)
    return keep


@pytest.fixture(name="subprocess_env")
def _subprocess_env() -> Callable[..., dict[str, str]]:
    """Environment for a child process: without this process's W&B service address, which a
    child would otherwise share (a killed child's run id then stays "in use" there)."""

    def make(**extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
        return {**env, **extra}

    return make


@pytest.fixture(name="kill_when")
def _kill_when() -> Callable[..., None]:
    """``kill_when(args, ready, env, cwd)``: start a child process and kill it (SIGKILL) as soon
    as ``ready()`` is true, or when it ends by itself first (5 minutes at most)."""

    def kill(args: list[str], ready: Callable[[], bool], env: dict[str, str],
             cwd: Path | None = None) -> None:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait()

    return kill


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SimCLR run of the tiny preset (seconds), shared by the probe tests."""
    from fewlabels.ssl.train import pretrain

    tmp = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        return pretrain(tiny_pretrain_config(tmp, "data.limit=2048", "trainer.max_epochs=2"))


# -- PostgreSQL: a throwaway cluster for the label-database tests (no mock) ---------------------
def _postgres_binary(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(p.split("/")[4]))
    return versions[-1] if versions else None


class PostgresServer:
    """A cluster started by the tests in a temporary folder; ``url(db)`` connects as its
    superuser over TCP on localhost."""

    def __init__(self) -> None:
        import pwd
        import shutil
        import socket
        import tempfile

        initdb, self.pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
        if not initdb or not self.pg_ctl:
            pytest.fail("PostgreSQL's initdb/pg_ctl are missing: 'make setup' installs Debian's "
                        "postgresql package (as root), or install it yourself")
        self.root = Path(tempfile.mkdtemp(prefix="fewlabels-pg-"))
        self.user = None
        if os.geteuid() == 0:  # initdb refuses root: run the cluster as an unprivileged user
            names = {p.pw_name for p in pwd.getpwall()}
            self.user = "postgres" if "postgres" in names else "nobody"
            shutil.chown(self.root, self.user)
        self.data = self.root / "data"
        self._run([initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                   "--no-sync"])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                        "-c fsync=off -c max_connections=50")
        self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "log"), "-w",
                   "-o", self.options, "start"])

    def _run(self, cmd: list[str]) -> None:
        import subprocess

        full = ["runuser", "-u", self.user, "--", *cmd] if self.user else cmd
        done = subprocess.run(full, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stdout}{done.stderr}")

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def restart(self) -> None:
        self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "log"), "-w",
                   "-m", "fast", "-o", self.options, "restart"])

    def stop(self) -> None:
        import shutil

        try:
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"])
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh database on the test cluster, initialized with the 60,000 labels, and set as
    ``FEWLABELS_LABEL_DB``; dropped afterwards."""
    import uuid

    import psycopg

    from fewlabels.oracle import init_database

    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = postgres_server.url(name)
    init_database(url)
    monkeypatch.setenv("FEWLABELS_LABEL_DB", url)
    yield url
    with psycopg.connect(postgres_server.url(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each oracle test on both backends: the per-test SQLite file, or a fresh PostgreSQL
    database on the throwaway cluster."""
    if request.param == "postgresql":
        request.getfixturevalue("postgres_url")
    return request.param
