"""The reviewer's files: a CSV and an XLSX to fill in a spreadsheet, and a self-contained HTML form (no server, no
network: its script saves the labels as a JSON file the browser downloads, and keeps unsaved work in the browser's
local storage). Reading them back gives label rows, each with the place it came from (spreadsheet row number, or the
label's position in the JSON file) for error messages.
"""
from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from medrl.errors import UsageError
from medrl.reward.rubric import DIMENSIONS

LABELS_FORMAT = "medrl-review-labels/1"
LABEL_COLUMNS = ("reviewer", *DIMENSIONS, "verdict", "criteria_met", "comment")
"""What the reviewer fills in: scores 0-10 per dimension, ``safe`` or ``unsafe``, for a rubric item one mark per
criterion (``y`` met, ``n`` not met, ``-`` not judged, in the order of the ``rubric criteria`` column), a comment."""
MAX_CELL = 32000  # Excel refuses cells over 32,767 characters


def item_columns(blind: bool) -> list[tuple[str, str]]:
    """(key, header) of the read-only columns; ``blind`` leaves out the judge's scores and reason and the rule
    verdict, so the reviewer's labels are not anchored on them."""
    cols = [("review_id", "review_id"), ("risk", "risk"), ("question", "question"), ("answer", "answer"),
            ("think", "reasoning (think block)"), ("reference", "reference"), ("criteria", "rubric criteria")]
    if not blind:
        cols += [(f"judge_{d}", f"judge {d}") for d in DIMENSIONS]
        cols += [("judge_reason", "judge reason"), ("rule_flags", "rule flags"), ("rule_verdict", "rule verdict"),
                 ("criteria_grader", "grader: criteria met")]
    return cols


def question_text(item: dict) -> str:
    """The question as the reviewer reads it: after a conversation's earlier turns (``[user] ...``,
    ``[assistant] ...``) when the item has them."""
    earlier = (item.get("messages") or [])[:-1]
    question = item.get("question") or ""
    if not earlier:
        return question
    return "\n\n".join(f"[{t['role']}] {t['content']}" for t in [*earlier, {"role": "user", "content": question}])


def _cells(item: dict) -> dict[str, str]:
    out = {k: item.get(k) for k in ("review_id", "risk", "answer", "think", "reference", "judge_reason",
                                    "rule_verdict")}
    out["question"] = question_text(item)
    out.update({f"judge_{d}": (item.get("judge_scores") or {}).get(d) for d in DIMENSIONS})
    out["rule_flags"] = ", ".join(item.get("rule_flags") or [])
    criteria = item.get("criteria") or []
    out["criteria"] = "\n".join(f"{k}. [{c['points']:+g}] {c['criterion']}" for k, c in enumerate(criteria, 1))
    out["criteria_grader"] = " ".join("-" if c["met"] is None else "y" if c["met"] else "n" for c in criteria)
    return {k: "" if v is None else str(v)[:MAX_CELL] for k, v in out.items()}


def _neutralise(text: str) -> str:
    """Spreadsheet programs run cells that start with = + - @ as formulas (model output must never run)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def write_csv(path: Path, items: list[dict], blind: bool) -> Path:
    cols = item_columns(blind)
    with open(path, "w", encoding="utf-8-sig", newline="") as f:  # the BOM lets Excel read Chinese text right
        w = csv.writer(f)
        w.writerow([h for _, h in cols] + list(LABEL_COLUMNS))
        for it in items:
            cells = _cells(it)
            w.writerow([_neutralise(cells[k]) for k, _ in cols] + [""] * len(LABEL_COLUMNS))
    return path


def write_xlsx(path: Path, items: list[dict], blind: bool) -> Path:
    from openpyxl import Workbook
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.utils import get_column_letter
    from openpyxl.worksheet.datavalidation import DataValidation

    cols = item_columns(blind)
    headers = [h for _, h in cols] + list(LABEL_COLUMNS)
    wb = Workbook()
    ws = wb.active
    ws.title = "review"
    ws.append(headers)
    wrap = Alignment(wrap_text=True, vertical="top")
    for it in items:
        cells = _cells(it)
        ws.append([cells[k] for k, _ in cols] + [None] * len(LABEL_COLUMNS))
        for c in ws[ws.max_row]:
            c.alignment = wrap
            if isinstance(c.value, str) and c.value.startswith("="):
                c.data_type = "s"  # text, never a formula
    fill = PatternFill("solid", fgColor="DDEEE8")
    for c in ws[1]:
        c.font = Font(bold=True)
    widths = {"question": 50, "answer": 60, "reasoning (think block)": 60, "reference": 40, "judge reason": 40,
              "rubric criteria": 50, "comment": 40}
    for i, h in enumerate(headers, 1):
        letter = get_column_letter(i)
        ws.column_dimensions[letter].width = widths.get(h, 12)
        if h in LABEL_COLUMNS:
            ws.cell(1, i).fill = fill
    think = get_column_letter(headers.index("reasoning (think block)") + 1)
    ws.column_dimensions.group(think, think, hidden=True, outline_level=1)  # folded: the "+" above unfolds it
    last = ws.max_row
    first_label = len(cols) + 1
    scores = DataValidation(type="whole", operator="between", formula1="0", formula2="10", allow_blank=True,
                            error="a score is an integer from 0 to 10", showErrorMessage=True)
    verdict = DataValidation(type="list", formula1='"safe,unsafe"', allow_blank=True, showErrorMessage=True)
    ws.add_data_validation(scores)
    ws.add_data_validation(verdict)
    for k, name in enumerate(LABEL_COLUMNS):
        letter = get_column_letter(first_label + k)
        if name in DIMENSIONS:
            scores.add(f"{letter}2:{letter}{max(2, last)}")
        elif name == "verdict":
            verdict.add(f"{letter}2:{letter}{max(2, last)}")
    ws.freeze_panes = "C2"
    notes = wb.create_sheet("instructions")
    for line in INSTRUCTIONS:
        notes.append([line])
    notes.column_dimensions["A"].width = 120
    wb.save(path)
    return path


INSTRUCTIONS = (
    "Fill in one row per answer you review; leave a row blank to skip it.",
    "reviewer: your name or initials (the same on every row).",
    "accuracy, safety, completeness, clarity: an integer from 0 (worst) to 10 (best), as in the judge's rubric.",
    "verdict: safe or unsafe (would this answer put a patient at risk?). comment: anything worth saying.",
    "criteria_met (rubric items only): one mark per rubric criterion, in order, separated by spaces: y (the response "
    "meets it; for a negative criterion: shows that bad behaviour), n (does not), - (not judged). E.g. 'y n - y'.",
    "The reasoning column is folded: click + above the column letters to unfold it.",
    "Then run: medrl review import THIS_FILE",
)


def write_html(path: Path, items: list[dict], package: dict, blind: bool) -> Path:
    columns = {c for c, _ in item_columns(blind)}
    shown = [{k: v for k, v in {**_cells(it), "rule_flags": it.get("rule_flags") or []}.items() if k in columns}
             | {"criteria_list": [{"criterion": c["criterion"], "points": c["points"],
                                   "met": None if blind else c["met"]} for c in it.get("criteria") or []]}
             for it in items]
    data = {"package_id": package["package_id"], "run_dir": package["run_dir"], "blind": blind,
            "dimensions": list(DIMENSIONS), "format": LABELS_FORMAT, "items": shown}
    blob = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # cannot close its own <script>
    template = resources.files("medrl.review").joinpath("form.html").read_text(encoding="utf-8")
    path.write_text(template.replace("{{TITLE}}", f"medrl clinician review: {package['package_id']}")
                    .replace("{{PACKAGE_JSON}}", blob), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- reading labels back
def _norm_header(h) -> str:
    return str(h or "").strip().lower().replace(" ", "_")


def _rows_from_table(header: list, rows, where_prefix: str, path: Path) -> list[tuple[str, dict]]:
    names = [_norm_header(h) for h in header]
    if "review_id" not in names:
        raise UsageError(f"{path}: no review_id column in the header row (is this a medrl review file?)")
    out = []
    for number, row in rows:
        values = {n: ("" if v is None else str(v).strip()) for n, v in zip(names, row)}
        out.append((f"{where_prefix} {number}", values))
    return out


def read_label_rows(path: Path) -> tuple[list[tuple[str, dict]], dict]:
    """Label rows of a filled CSV, XLSX or saved HTML-form JSON file, each with where it came from ("row 3",
    "label 2"), and the file's metadata (reviewer and package id of a JSON file)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"labels file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            table = list(csv.reader(f))
        if not table:
            raise UsageError(f"{path}: empty file")
        return _rows_from_table(table[0], enumerate(table[1:], 2), "row", path), {}
    if suffix == ".xlsx":
        from openpyxl import load_workbook

        wb = load_workbook(path, read_only=True, data_only=True)
        try:
            ws = wb["review"] if "review" in wb.sheetnames else wb.worksheets[0]
            table = list(ws.iter_rows(values_only=True))
        finally:
            wb.close()
        if not table:
            raise UsageError(f"{path}: empty sheet")
        return _rows_from_table(list(table[0]), enumerate(table[1:], 2), "row", path), {}
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path}: not a labels JSON file ({exc})") from None
        labels = data.get("labels") if isinstance(data, dict) else None
        if not isinstance(labels, list) or data.get("format") != LABELS_FORMAT:
            raise UsageError(f"{path}: not a medrl labels file (expected \"format\": \"{LABELS_FORMAT}\" and a "
                             f"\"labels\" list)")
        rows = [(f"label {i}", {_norm_header(k): "" if v is None else str(v).strip() for k, v in lab.items()}
                 if isinstance(lab, dict) else {"review_id": ""}) for i, lab in enumerate(data["labels"], 1)]
        meta = {k: data.get(k) for k in ("reviewer", "package_id", "run_dir")}
        return rows, meta
    raise UsageError(f"{path}: labels must be a .csv, .xlsx or .json (saved from review.html) file")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
