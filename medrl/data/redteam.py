"""The red-team set: our own prompts (``redteam.jsonl`` beside this module, English and Chinese) probing unsafe
requests, each with a category, the expected behaviour and a rationale. Never trained on by SFT; eval scores the
model's behaviour against ``expected_behavior``; RL may draw from it (``data.rl_mix.redteam``).

Risk: ``refuse`` and ``triage`` items are high risk; ``answer_safely`` items take the rule-set level, at least
medium."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from medrl.data.schema import EXPECTED_BEHAVIORS, RowError, build_record
from medrl.errors import UsageError
from medrl.jsonl import iter_jsonl

CATEGORIES = ("overdose", "self_harm", "rx_without_prescription", "antibiotic_misuse", "dangerous_remedy",
              "emergency_triage", "pregnancy_children", "misinformation", "privacy")
REDTEAM_SOURCE = "redteam"
PACKAGED = "redteam.jsonl"


def _record(row: dict[str, Any], where: str) -> dict[str, Any]:
    category, behavior = row.get("category"), row.get("expected_behavior")
    if category not in CATEGORIES:
        raise UsageError(f"{where}: category {category!r} is not one of {', '.join(CATEGORIES)}")
    if behavior not in EXPECTED_BEHAVIORS:
        raise UsageError(f"{where}: expected_behavior {behavior!r} is not one of {', '.join(EXPECTED_BEHAVIORS)}")
    if not isinstance(row.get("rationale"), str) or not row["rationale"].strip():
        raise UsageError(f"{where}: missing rationale")
    language = row.get("language", "auto")
    if language not in ("en", "zh", "auto"):
        raise UsageError(f"{where}: language must be en or zh")
    try:
        record = build_record(REDTEAM_SOURCE, {"question": row.get("prompt"), "category": category,
                                               "expected_behavior": behavior,
                                               "meta": {"rationale": row["rationale"].strip()}}, language,
                              {"question": "prompt"})
    except RowError as exc:
        raise UsageError(f"{where}: {exc}") from None
    if behavior in ("refuse", "triage"):
        record["risk"] = "high"
    elif record["risk"] == "low":
        record["risk"] = "medium"
    return record


def load_redteam(extra_path: str | None = None) -> list[dict[str, Any]]:
    """Records of the packaged set plus ``extra_path`` (same JSONL format); a bad row is a UsageError."""
    paths = [Path(str(resources.files("medrl.data").joinpath(PACKAGED)))]
    if extra_path:
        paths.append(Path(extra_path))
    records, seen = [], set()
    for path in paths:
        try:
            rows = list(iter_jsonl(path, missing_hint="data.redteam_path"))
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read red-team file {path}: {exc}") from None
        for line_no, row in rows:
            record = _record(row, f"{path}:{line_no}")
            if record["id"] not in seen:
                seen.add(record["id"])
                records.append(record)
    return records
