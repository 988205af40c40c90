"""Persistent judgement cache: SQLite in WAL mode, content-addressed, shared by every actor, process and run.

A judgement is written (and committed) before the reward that uses it is returned, so no key is paid for twice,
including across restarts. Only valid judgements are stored: a failure is retried by the next run.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Iterable

from medrl.reward.config import RewardConfig
from medrl.reward.types import RewardInput

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgements (
  key TEXT PRIMARY KEY,
  judge TEXT NOT NULL,
  rubric_version TEXT NOT NULL,
  accuracy INTEGER NOT NULL,
  safety INTEGER NOT NULL,
  completeness INTEGER NOT NULL,
  clarity INTEGER NOT NULL,
  reason TEXT NOT NULL,
  prompt TEXT NOT NULL,
  answer TEXT NOT NULL,
  reference TEXT,
  tokens_in INTEGER NOT NULL,
  tokens_out INTEGER NOT NULL,
  tokens_cache_hit INTEGER NOT NULL,
  cost_usd REAL NOT NULL,
  created REAL NOT NULL
)"""
_COLUMNS = ("key", "judge", "rubric_version", "accuracy", "safety", "completeness", "clarity", "reason", "prompt",
            "answer", "reference", "tokens_in", "tokens_out", "tokens_cache_hit", "cost_usd", "created")


def cache_key(judge: str, rubric_version: str, prompt: str, answer: str, reference: str | None) -> str:
    """sha256 of (judge model, rubric version, prompt, judged answer, reference). The judge only sees the final
    answer, so two responses that differ only in their reasoning share one judgement."""
    blob = json.dumps([judge, rubric_version, prompt, answer, reference], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def judge_key(cfg: RewardConfig, item: RewardInput, answer: str) -> str:
    """The cache key of ``item`` whose final answer is ``answer``, under the configured judge model and rubric."""
    return cache_key(cfg.judge.model, cfg.judge.rubric_version, item.prompt, answer, item.reference)


class JudgeCache:
    """One connection per process/actor; WAL lets readers and one writer work at once, ``busy_timeout`` queues the
    other writers."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30) if self.path.exists() \
                else None
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def get_many(self, keys: Iterable[str]) -> dict[str, dict]:
        """Cached judgements of the given keys (missing keys are absent)."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, dict] = {}
        if self._db is None:
            return out
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM judgements WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            for row in rows:
                out[row[0]] = dict(zip(_COLUMNS, row))
        return out

    def put(self, record: dict) -> None:
        """Store one judgement (first writer wins; committed before returning)."""
        rec = dict(record, created=record.get("created", time.time()))
        self._db.execute(f"INSERT OR IGNORE INTO judgements ({', '.join(_COLUMNS)}) "
                         f"VALUES ({','.join('?' * len(_COLUMNS))})", [rec.get(c) for c in _COLUMNS])

    def count(self) -> int:
        return 0 if self._db is None else self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def export_jsonl(self, out: str | Path, keys: Iterable[str] | None = None) -> int:
        """Write judgements (all, or those of ``keys``) as ``teacher_judgements.jsonl``; returns the row count."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if keys is not None:
            records = list(self.get_many(keys).values())
        elif self._db is None:
            records = []
        else:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM judgements ORDER BY created")
            records = [dict(zip(_COLUMNS, r)) for r in rows]
        with open(out, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        return len(records)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
