"""Pass 1 of ``prepare``: validated records go to a spool file on disk, compact per-record columns stay in memory.

Also the per-source statistics and the rejects file (``rejects.jsonl``) the data card is written from.
"""
from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medrl.config import Config
from medrl.data.clean import MinHasher, key64, skeleton
from medrl.data.schema import conversation_text
from medrl.data.sources import Row
from medrl.errors import UsageError
from medrl.models.loading import TokenCounter

RISK_CODE = {"high": 0, "medium": 1, "low": 2}
POOL, BENCHMARK, REDTEAM = 0, 1, 2  # record kinds: training pool, benchmark item, red-team item
GRADED_BY_REFERENCE, GRADED_BY_RUBRIC = 1, 2
"""Column ``graded``: what a judge can grade a record's answer against (0: nothing)."""
BATCH = 512
NUM_PERM = 32


@dataclass
class SourceStats:
    origin: str = ""
    license: str = ""
    role: str = "sft"
    rows: int = 0
    invalid: int = 0
    over_limit: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None


class Columns:
    """Compact per-record columns of the spooled records (no text): ~120 bytes per record, MinHash included."""

    def __init__(self):
        self.offset, self.qkey, self.idkey = array("Q"), array("Q"), array("Q")
        self.source, self.file, self.line, self.qtok, self.otok = (array("I") for _ in range(5))
        self.kind, self.risk, self.lang, self.graded = (array("B") for _ in range(4))
        self.sig = array("H")  # NUM_PERM uint16 per record, row-major

    def numpy(self) -> dict[str, np.ndarray]:
        """Zero-copy numpy views (the arrays must not grow afterwards)."""
        cols = {k: np.frombuffer(v, dtype=v.typecode) if len(v) else np.zeros(0, v.typecode)
                for k, v in vars(self).items()}
        cols["sig"] = cols["sig"].reshape(-1, NUM_PERM)
        return cols


class Rejects:
    def __init__(self, path: Path, strict: bool):
        self.fh = open(path, "w", encoding="utf-8")
        self.strict = strict
        self.count = 0
        self.by_reason: dict[tuple[str, str], int] = {}

    def add(self, file: str, line: int, source: str, stage: str, reason: str, summary: str | None = None,
            record_id: str | None = None) -> None:
        if self.strict and stage == "parse":
            raise UsageError(f"{file}:{line}: {reason} (--strict: rejected rows are errors)")
        row = {"file": file, "line": line, "source": source, "stage": stage, "reason": reason, "id": record_id}
        self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.count += 1
        key = (stage, summary or reason)
        self.by_reason[key] = self.by_reason.get(key, 0) + 1

    def close(self) -> None:
        self.fh.close()


class Spool:
    """Pass 1: validated records -> spool file + columns."""

    def __init__(self, path: Path, cfg: Config, rejects: Rejects):
        self.fh = open(path, "wb")
        self.path, self.cfg, self.rejects = path, cfg, rejects
        self.cols = Columns()
        self.tokens = TokenCounter(cfg.model.path, cfg.model.cache_dir)
        self.minhash = MinHasher(num_perm=NUM_PERM, shingle=5, seed=0)
        self.stats: dict[str, SourceStats] = {}
        self._file_ids: dict[str, int] = {}
        self._source_ids: dict[str, int] = {}

    @property
    def files(self) -> list[str]:
        return list(self._file_ids)

    @property
    def sources(self) -> list[str]:
        return list(self._source_ids)

    def source_id(self, name: str) -> int:
        return self._source_ids.setdefault(name, len(self._source_ids))

    def add_batch(self, rows: list[Row], kinds: list[int]) -> None:
        d = self.cfg.data
        recs = [r.record for r in rows]
        asked = [conversation_text(r) for r in recs]  # a conversation counts, dedupes and matches whole
        qtok = self.tokens.count(asked)
        otok = self.tokens.count([r["output"] for r in recs])
        atok = self.tokens.count([r["answer"] for r in recs]) if d.min_answer_tokens > 1 else [1] * len(recs)
        keep = []
        for i, (row, rec) in enumerate(zip(rows, recs)):
            bound = None
            if kinds[i] == POOL:
                if qtok[i] < d.min_question_tokens:
                    bound = ("question", qtok[i], "<", "min_question_tokens")
                elif qtok[i] > d.max_question_tokens:
                    bound = ("question", qtok[i], ">", "max_question_tokens")
                elif otok[i] > d.max_output_tokens:
                    bound = ("output", otok[i], ">", "max_output_tokens")
                elif atok[i] < d.min_answer_tokens:
                    bound = ("answer", atok[i], "<", "min_answer_tokens")
            if bound:
                what, size, op, key = bound
                reason = f"{what} has {size} tokens {op} data.{key}={getattr(d, key)}"
                self.rejects.add(row.file, row.line, rec["source"], "length", reason, f"{what} {op} data.{key}",
                                 rec["id"])
                filtered = self.stats[rec["source"]].filtered
                filtered["length"] = filtered.get("length", 0) + 1
            else:
                keep.append(i)
        if not keep:
            return
        self.cols.sig.frombytes(self.minhash.signatures([skeleton(asked[i]) for i in keep]).tobytes())
        c = self.cols
        for i in keep:
            row, rec = rows[i], recs[i]
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
            c.offset.append(self.fh.tell())
            self.fh.write(line)
            c.qkey.append(key64(skeleton(asked[i])))
            c.idkey.append(int(rec["id"], 16))
            c.source.append(self.source_id(rec["source"]))
            c.file.append(self._file_ids.setdefault(row.file, len(self._file_ids)))
            c.line.append(row.line)
            c.qtok.append(qtok[i])
            c.otok.append(otok[i])
            c.kind.append(kinds[i])
            c.risk.append(RISK_CODE[rec["risk"]])
            c.lang.append(rec["language"] == "zh")
            c.graded.append(GRADED_BY_RUBRIC if rec["rubrics"] else GRADED_BY_REFERENCE if rec["reference"] is not None
                            else 0)

    def close(self) -> None:
        self.fh.close()
