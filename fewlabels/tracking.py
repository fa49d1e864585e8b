"""Weights & Biases: mode resolution and reading an offline run back."""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path
from typing import Any


def wandb_mode(configured: str | None = None) -> str:
    """``configured``, else ``$WANDB_MODE``, else online when an API key is known, else offline."""
    if configured:
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return "online" if netrc.is_file() and "api.wandb.ai" in netrc.read_text() else "offline"


_FILE_HEADER = 7  # b":W&B", magic 0xBEE1, version
_BLOCK, _RECORD_HEADER = 32768, 7  # leveldb log: crc32, length, type per chunk
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class IncompleteRunFile(RuntimeError):
    """A ``.wandb`` file whose writer has not finished: W&B's service may still be writing it
    for a moment after ``wandb.finish()`` returns, or the run was killed mid-write."""


def _wandb_records(path: str | os.PathLike[str]) -> list[bytes]:
    """The protobuf payloads of a ``.wandb`` file (a leveldb-style log of 32 KiB blocks, each
    chunk checked against its CRC-32). A chunk cut off by the end of the file, or zeroed space,
    ends the list there (the writer is still at work, or preallocated); a bad checksum before
    that is corruption and raises."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    records: list[bytes] = []
    pending: bytes | None = None
    pos = _FILE_HEADER
    while pos + _RECORD_HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _RECORD_HEADER:  # block trailer: zero padding
            pos += _BLOCK - pos % _BLOCK
            continue
        checksum = int.from_bytes(data[pos:pos + 4], "little")
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        if checksum == length == kind == 0:
            break  # preallocated, unwritten space after the records
        payload = data[pos + _RECORD_HEADER:pos + _RECORD_HEADER + length]
        if len(payload) < length:
            break  # the last chunk is still being written
        if zlib.crc32(bytes([kind]) + payload) != checksum:
            raise ValueError(f"{path} is corrupt: the chunk at byte {pos} fails its checksum")
        pos += _RECORD_HEADER + length
        if kind == _FULL:
            records.append(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += payload
            if kind == _LAST:
                records.append(pending)
                pending = None
    return records


def read_offline_run(run_file: str | os.PathLike[str],
                     wait_for_exit_s: float = 30.0) -> dict[str, Any]:
    """History rows, summary and config recorded in a ``run-*.wandb`` file.

    A finished run's file ends with its ``exit`` record; W&B's service can still be writing the
    last records for a moment after ``wandb.finish()`` returns, so this re-reads the file until
    that record is there, for up to ``wait_for_exit_s`` seconds, then raises
    :class:`IncompleteRunFile`. ``wait_for_exit_s=0`` reads a run in progress: the records
    written so far."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + wait_for_exit_s
    while True:
        records = []
        for data in _wandb_records(run_file):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            records.append(record)
        finished = bool(records) and records[-1].WhichOneof("record_type") == "exit"
        if finished or wait_for_exit_s <= 0:
            break
        if time.monotonic() > deadline:
            raise IncompleteRunFile(
                f"{run_file} has no exit record after {wait_for_exit_s:.0f} s: the run is still "
                "being written or was killed. Pass wait_for_exit_s=0 to read what it holds.")
        time.sleep(0.1)
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind in ("config", "run"):
            items = record.config.update if kind == "config" else record.run.config.update
            config.update({_key(i): json.loads(i.value_json) for i in items})
    return {"history": history, "summary": summary, "config": config}


def init_run(cfg: Any, **kwargs: Any) -> Any:
    """A W&B run of a stage that is not a Lightning fit (probes, curves), configured from its
    ``logger`` section, the resolved config attached."""
    import wandb
    from omegaconf import OmegaConf

    Path(cfg.logger.dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(project=cfg.logger.project, dir=cfg.logger.dir,
                      mode=wandb_mode(cfg.logger.mode), reinit="finish_previous",
                      config=OmegaConf.to_container(cfg, resolve=True), **kwargs)


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def offline_run_file(wandb_dir: str | os.PathLike[str], run_id: str) -> Path:
    matches = sorted(Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    if not matches:
        raise FileNotFoundError(f"no offline W&B run {run_id} under {wandb_dir}")
    return matches[-1]
