"""Grader calibration (pure): how well the rubric grader's criterion verdicts agree with clinicians'.

A pair is (grader verdict, clinician label) for one criterion of one graded response, both met / not met. As
HealthBench's meta-evaluation (``healthbench_meta_eval.py`` in openai/simple-evals) the clinician label is the
reference and the statistic is the **macro F1**: the mean of the F1 of the class "met" and the F1 of the class "not
met" (both classes count the same, however rare one is). Beside it the **balanced accuracy** (mean of the share of
clinician-met criteria the grader calls met and of clinician-not-met ones it calls not met). A criterion labelled by
several clinicians gives one pair per label (HealthBench's pairwise scheme).

Physician labels in HealthBench's meta-eval layout (one JSONL row per completion and criterion) are read by
``read_meta_eval``: ``prompt`` (the conversation, a list of ``{role, content}`` ending with a user turn),
``completion`` (the graded response), ``rubric`` (the criterion text), ``binary_labels`` (one bool per physician),
and optionally ``prompt_id``, ``completion_id``, ``category`` (e.g. ``cluster:emergency_referrals_emergent``) and
``anonymized_physician_ids``; other keys (``canary`` ...) are ignored.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable

from medrl.errors import UsageError
from medrl.jsonl import iter_jsonl

_YES = ("y", "yes", "1", "met", "true", "t")
_NO = ("n", "no", "0", "not", "false", "f", "unmet")
_BLANK = ("-", "?", "_")


def _f1(tp: int, fp: int, fn: int) -> float | None:
    return None if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def rounded(v: float | None) -> float | None:
    """A figure as the review tables show it: 4 decimals (None stays None)."""
    return None if v is None else round(v, 4)


def binary_agreement(grader: list[bool], truth: list[bool]) -> dict:
    """Macro F1, balanced accuracy, F1 per class and the confusion counts of grader verdicts against clinician
    labels (None where undefined: no pair, or a class absent from the clinicians' labels)."""
    tp = sum(g and t for g, t in zip(grader, truth))
    fp = sum(g and not t for g, t in zip(grader, truth))
    fn = sum(not g and t for g, t in zip(grader, truth))
    tn = len(truth) - tp - fp - fn
    f1_met, f1_not = _f1(tp, fp, fn), _f1(tn, fn, fp)
    macro = None if f1_met is None or f1_not is None else (f1_met + f1_not) / 2
    tpr = tp / (tp + fn) if tp + fn else None
    tnr = tn / (tn + fp) if tn + fp else None
    balanced = None if tpr is None or tnr is None else (tpr + tnr) / 2
    return {"n": len(truth), "macro_f1": rounded(macro), "balanced_accuracy": rounded(balanced),
            "f1_met": rounded(f1_met), "f1_not_met": rounded(f1_not), "agreement": rounded((tp + tn) / len(truth)) if truth else None,
            "confusion": {"met|met": tp, "met|not_met": fp, "not_met|met": fn, "not_met|not_met": tn}}


def parse_criteria_met(text: str, count: int) -> list[bool | None]:
    """A reviewer's ticks as the form and the spreadsheets store them: one token per criterion, in order, separated
    by spaces or commas: ``y`` / ``n`` (also yes/no, 1/0, met/not, true/false) or ``-`` for not labelled."""
    tokens = [t for t in re.split(r"[\s,;]+", text.strip().lower()) if t]
    if len(tokens) != count:
        raise ValueError(f"criteria_met needs {count} mark(s) (y, n or -), one per criterion in order, "
                         f"got {len(tokens)}")
    out: list[bool | None] = []
    for k, t in enumerate(tokens, 1):
        if t not in (*_YES, *_NO, *_BLANK):
            raise ValueError(f"criteria_met mark {k} must be y, n or -, got {t!r}")
        out.append(True if t in _YES else False if t in _NO else None)
    return out


def criteria_agreement(items: dict[str, dict], labels: Iterable[dict], top: int = 10) -> dict:
    """Grader vs reviewers over every ticked criterion of the review items (``criteria`` with the grader's ``met``):
    overall, per ``axis:*`` tag, and the criteria where they disagree (first ``top``)."""
    pairs: list[tuple[bool, bool, dict, dict, str]] = []
    for lab in labels:
        item = items.get(lab["review_id"])
        ticks = lab.get("criteria_met")
        if item is None or not ticks or not item.get("criteria"):
            continue
        for c, tick in zip(item["criteria"], ticks):
            if tick is not None and c.get("met") is not None:
                pairs.append((c["met"], tick, c, item, lab["reviewer"]))
    by_axis: dict[str, list] = defaultdict(list)
    for p in pairs:
        for tag in p[2].get("tags") or []:
            if tag.startswith("axis:"):
                by_axis[tag[len("axis:"):]].append(p)
    differ = [{"review_id": item["review_id"], "reviewer": who, "criterion": c["criterion"], "points": c["points"],
               "grader": g, "reviewer_met": t, "explanation": c.get("explanation", ""), "model": item["model"],
               "set": item["set"]} for g, t, c, item, who in pairs if g != t]
    return {**binary_agreement([p[0] for p in pairs], [p[1] for p in pairs]),
            "by_axis": {a: binary_agreement([p[0] for p in ps], [p[1] for p in ps])
                        for a, ps in sorted(by_axis.items())},
            "disagreements": differ[:top]}


def read_meta_eval(path, limit: int | None = None) -> list[dict]:
    """Rows of a HealthBench meta-eval JSONL (layout above), validated; a bad row is a one-line error naming the file
    and line."""
    rows = []
    for lineno, row in iter_jsonl(path, ("completion", "rubric"), missing_hint="a HealthBench meta-eval JSONL"):
        if limit is not None and len(rows) >= limit:
            break
        prompt, labels = row.get("prompt"), row.get("binary_labels")
        if not (isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in prompt) and prompt[-1]["role"] == "user"):
            raise UsageError(f"{path}:{lineno}: key 'prompt' must be a list of {{role, content}} turns ending with a "
                             f"user turn")
        if not (isinstance(labels, list) and labels and all(isinstance(v, bool) for v in labels)):
            raise UsageError(f"{path}:{lineno}: key 'binary_labels' must be a non-empty list of true/false")
        rows.append({"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
                     "completion": row["completion"], "rubric": row["rubric"], "binary_labels": labels,
                     "prompt_id": str(row.get("prompt_id") or ""), "completion_id": str(row.get("completion_id") or
                                                                                         f"line-{lineno}"),
                     "category": str(row.get("category") or "uncategorised")})
    if not rows:
        raise UsageError(f"{path}: no meta-eval rows")
    return rows


def meta_eval_agreement(rows: list[dict], verdicts: list[bool | None]) -> dict:
    """Grader verdicts (one per meta-eval row; None: its grading failed) against every physician label of the row:
    overall and per ``category``."""
    per_cat: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    grader, truth = [], []
    for row, verdict in zip(rows, verdicts):
        if verdict is None:
            continue
        for label in row["binary_labels"]:
            grader.append(verdict)
            truth.append(label)
            per_cat[row["category"]][0].append(verdict)
            per_cat[row["category"]][1].append(label)
    return {**binary_agreement(grader, truth), "rows": len(rows), "failed": sum(v is None for v in verdicts),
            "by_category": {c: binary_agreement(*per_cat[c]) for c in sorted(per_cat)}}
