"""Read what wandb wrote to an offline run file (``run-<id>.wandb``), to check what really got logged.

The file is wandb's LevelDB-style log: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of
records (crc32 4 bytes, length 2 bytes little-endian, type 1 byte: 1 full, 2 first, 3 middle, 4 last),
each payload a protobuf ``Record``.
"""
from __future__ import annotations

import json
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_HEADER = 7
_BLOCK = 32768
_RECORD_HEADER = 7


def read_records(path: str | Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    records, pending, pos = [], b"", _HEADER
    while pos + _RECORD_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER:  # trailer padding
            pos += left_in_block
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + _RECORD_HEADER:pos + _RECORD_HEADER + length]
        pos += _RECORD_HEADER + length
        if kind == 0 and length == 0:
            break
        pending += payload
        if kind in (1, 4):  # full or last fragment
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def logged(path: str | Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of an offline run file, values decoded from JSON."""
    config, history = {}, []
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            for item in updates:
                key = item.key or "/".join(item.nested_key)
                config[key] = json.loads(item.value_json)
        elif kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return config, history


def run_file(run_dir: str | Path, timeout: float = 60.0) -> Path:
    """The run's offline wandb file, once wandb has written all of it (up to its exit record).

    ``wandb.finish()`` can return before wandb's writer process has flushed the file: read right after a
    run it is sometimes only its 7-byte header. So wait (up to ``timeout`` s) for the exit record.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
        if files:
            try:
                if any(r.WhichOneof("record_type") == "exit" for r in read_records(files[-1])):
                    return files[-1]
            except Exception:  # noqa: BLE001 - a record still being written
                pass
        if time.monotonic() > deadline:
            assert files, f"no offline wandb run under {run_dir}"
            raise AssertionError(f"wandb did not finish writing {files[-1]} within {timeout} s")
        time.sleep(0.2)
