"""Reading our own JSONL files (prepared splits, RL prompts, judge inputs) with one-line errors naming file and line.

Raw source data is read by ``medrl.data.readers``, which records bad rows instead of failing; this module is for
files medrl wrote (or a user hands to a command), where a bad row is an error."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from medrl.errors import UsageError


def iter_jsonl(path: Path, required: tuple[str, ...] = (), missing_hint: str = "") -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)``; every key in ``required`` must hold a non-empty string."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory, expected a JSONL file" + (f" ({missing_hint})" if missing_hint else ""))
    if not path.is_file():
        raise UsageError(f"{path} not found" + (f": {missing_hint}" if missing_hint else ""))
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:  # a BOM from a spreadsheet export is not an error
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                 f"{exc.start + 1}): is this a JSONL file?") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise UsageError(f"{path}:{lineno}: JSON nested too deeply to read (over ~1,000 levels)") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise UsageError(f"{path}:{lineno}: key '{key}' must be a non-empty string")
            yield lineno, row


def read_jsonl(path: Path, required: tuple[str, ...] = (), missing_hint: str = "") -> list[dict]:
    return [row for _, row in iter_jsonl(path, required, missing_hint)]
