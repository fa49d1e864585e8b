"""Weights & Biases: mode resolution and reading an offline run back."""

from __future__ import annotations

import json
import os
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
_BLOCK, _RECORD_HEADER = 32768, 7  # leveldb log: crc32, length, type per record
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: str | os.PathLike[str]) -> list[bytes]:
    """The protobuf payloads of a ``.wandb`` file (a leveldb-style log of 32 KiB blocks)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    records, pending, pos = [], b"", _FILE_HEADER
    while pos + _RECORD_HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _RECORD_HEADER:  # block trailer: zero padding
            pos += _BLOCK - pos % _BLOCK
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + _RECORD_HEADER:pos + _RECORD_HEADER + length]
        pos += _RECORD_HEADER + length
        if kind == 0 and length == 0:
            break  # preallocated, unwritten space
        if kind == _FULL:
            records.append(payload)
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            records.append(pending + payload)
    return records


def read_offline_run(run_file: str | os.PathLike[str]) -> dict[str, Any]:
    """History rows, summary and config recorded in a ``run-*.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for data in _wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
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
