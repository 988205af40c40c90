"""Reading back what the trackers wrote: W&B's offline transaction log (no W&B API reads it without a server)."""
from __future__ import annotations

import json
import struct
from pathlib import Path


def wandb_records(wandb_dir: Path) -> dict[str, list]:
    """Every offline run under ``wandb_dir``: run id -> its records (history rows, config updates, run headers) as
    ``(kind, dict)``, read from the transaction log in the format W&B writes (32 KiB blocks of checksum, length,
    type, payload after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs: dict[str, list] = {}
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, payload, records = path.read_bytes(), 7, b"", []
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or (kind == 0 and length == 0):
                pos += left
                continue
            payload += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST
                rec = pb.Record()
                rec.ParseFromString(payload)
                records.append(rec)
                payload = b""
        out = []
        for rec in records:
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                out.append(("history", {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                        for i in rec.history.item}))
            elif kind == "config":
                out.append(("config", {i.key: json.loads(i.value_json) for i in rec.config.update}))
            elif kind == "run":
                out.append(("run", {"id": rec.run.run_id, "name": rec.run.display_name, "project": rec.run.project}))
        run_id = path.stem.removeprefix("run-")
        runs.setdefault(run_id, []).extend(out)
    return runs
