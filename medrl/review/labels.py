"""Reviewer labels: validation of filled rows (pure) and the run's label store ``review/labels.jsonl``.

A label is one reviewer's verdict on one item: ``review_id, reviewer, accuracy, safety, completeness, clarity``
(integers 0-10, each may be blank), ``verdict`` (``safe``/``unsafe`` or blank), ``criteria_met`` (rubric items: one
mark per criterion, ``y`` / ``n`` / ``-``, stored as a list of true / false / null), ``comment``. A row whose label
fields are all blank is skipped. A bad row is reported with its place in the file and the reason, and the good rows are
kept. Several reviewers may label the same items; importing again replaces that reviewer's earlier label of the
same item.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from medrl.jsonl import read_jsonl
from medrl.review.calibration import parse_criteria_met
from medrl.reward.rubric import DIMENSIONS

VERDICTS = ("safe", "unsafe")
_INT = re.compile(r"[+]?\d+(?:\.0+)?")


def _score(value: str, name: str) -> int | None:
    if value == "":
        return None
    if not _INT.fullmatch(value) or not 0 <= float(value) <= 10:
        raise ValueError(f"{name} must be an integer from 0 to 10, got {value!r}")
    return int(float(value))


def validate_rows(rows: list[tuple[str, dict]], known: dict[str, int], reviewer: str | None = None,
                  source: str = "") -> tuple[list[dict], list[str], int]:
    """(labels, error lines, blank rows skipped). ``known``: review id -> number of rubric criteria of the item (0:
    none); ``reviewer`` fills rows without a reviewer name (``--reviewer``, or the name saved in the HTML form's
    file). Within one file a later row for the same (reviewer, item) wins, with an error line naming the earlier
    row."""
    labels: dict[tuple[str, str], dict] = {}
    where_of: dict[tuple[str, str], str] = {}
    errors: list[str] = []
    blank = 0
    for where, row in rows:
        rid = row.get("review_id", "")
        fields = [row.get(k, "") for k in (*DIMENSIONS, "verdict", "criteria_met", "comment")]
        if not any(fields):
            blank += 1
            continue
        tag = f"{where} (review_id {rid or '?'})"
        try:
            if not rid:
                raise ValueError("review_id is empty")
            if rid not in known:
                raise ValueError("review_id is not in this review package (was the package exported again?)")
            name = row.get("reviewer") or reviewer or ""
            if not name:
                raise ValueError("reviewer is empty (fill the reviewer column or pass --reviewer)")
            label = {"review_id": rid, "reviewer": name}
            for d in DIMENSIONS:
                label[d] = _score(row.get(d, ""), d)
            verdict = row.get("verdict", "").lower()
            if verdict not in ("", *VERDICTS):
                raise ValueError(f"verdict must be safe or unsafe, got {row.get('verdict')!r}")
            label["verdict"] = verdict or None
            ticks = row.get("criteria_met", "")
            if ticks and not known[rid]:
                raise ValueError("criteria_met is filled but this item has no rubric criteria")
            label["criteria_met"] = parse_criteria_met(ticks, known[rid]) if ticks else None
            label["comment"] = row.get("comment", "")
            label["source"] = source
        except ValueError as exc:
            errors.append(f"{tag}: {exc}")
            continue
        key = (name, rid)
        if key in labels:
            errors.append(f"{tag}: reviewer {name!r} labelled this item already in {where_of[key]}; this row is kept")
        labels[key] = label
        where_of[key] = where
    return list(labels.values()), errors, blank


def read_labels(path: Path) -> list[dict]:
    """The label store (none yet: empty); a damaged line is a one-line error naming the file and line."""
    return read_jsonl(Path(path), ("reviewer", "review_id")) if Path(path).is_file() else []


def merge_labels(path: Path, new: list[dict]) -> tuple[int, int]:
    """Add ``new`` labels to the store at ``path`` (one (reviewer, item) label each, the newest wins); returns
    (added, replaced). Written atomically."""
    stored = {(lab["reviewer"], lab["review_id"]): lab for lab in read_labels(path)}
    replaced = sum((lab["reviewer"], lab["review_id"]) in stored for lab in new)
    for lab in new:
        stored[(lab["reviewer"], lab["review_id"])] = lab
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for lab in stored.values():
            f.write(json.dumps(lab, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return len(new) - replaced, replaced
