"""Consultation cases (pure, no Ray): the hidden patient profile, the opening line, the doctor's task and the target.

Three layouts become one ``Case`` (docs/consultation.md):

* the documented JSONL layout for hand-written cases (``case_from_row``): ``id``, ``language``, ``opening``,
  ``profile`` (field -> text, fields of ``PROFILE_FIELDS``), ``task``, and a target: ``options`` + ``label`` (MCQ)
  or ``diagnosis`` (free text); optional ``rubrics``;
* a MedQA / CMExam vignette already read by ``medrl.data`` (a record with ``question``, ``options``, ``label``):
  ``case_from_mcq`` splits the stem into profile fields, derives a short lay opening complaint and keeps the
  question sentence as the task; stems that describe no patient (knowledge questions) give None;
* the AgentClinic OSCE layout (``OSCE_Examination``; ``case_from_osce``): exams and test results become the
  ``exam`` / ``tests`` fields, released only when the doctor asks for them.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medrl.data.schema import parse_rubrics
from medrl.errors import UsageError

PROFILE_FIELDS = ("demographics", "complaint", "history", "symptoms", "past_history", "medications",
                  "social_history", "family_history", "exam", "tests")
"""The fields a hidden profile may carry; the scripted patient maps questions to them (``patient.FIELD_CUES``)."""


@dataclass(frozen=True)
class Case:
    id: str
    language: str
    """``en`` or ``zh``: the language of the dialogue."""
    opening: str
    """What the patient says first (lay words, no diagnosis)."""
    profile: dict[str, str]
    """Hidden facts by field (``PROFILE_FIELDS``); only the patient sees them."""
    task: str
    """What the doctor must decide (the MCQ question sentence, or "What is the most likely diagnosis?")."""
    options: dict[str, str] | None = None
    """MCQ options (letter -> text), shown to the doctor; with ``label`` the target."""
    label: str | None = None
    diagnosis: str | None = None
    """Free-text reference diagnosis / management: the target when there are no options."""
    rubrics: tuple[dict[str, Any], ...] | None = None
    """Consultation rubric criteria (``{criterion, points, tags}``) graded on the whole dialogue."""

    @property
    def target_text(self) -> str:
        """The words a patient must never say: the correct option's text, or the reference diagnosis."""
        if self.options and self.label:
            return " ".join(self.options.get(letter, "") for letter in self.label)
        return self.diagnosis or ""

    @property
    def vignette(self) -> str:
        """The whole case as one text (the single-turn baseline of the eval)."""
        return " ".join(self.profile[f] for f in PROFILE_FIELDS if self.profile.get(f))

    def to_row(self) -> dict:
        return {k: (list(v) if k == "rubrics" and v else v) for k, v in asdict(self).items()}


# ------------------------------------------------------------------ hand-written JSONL
def case_from_row(row: dict, where: str) -> Case:
    """A hand-written case row; a bad row raises UsageError naming ``where`` (file:line) and the key."""
    def need(key: str, kind=str):
        value = row.get(key)
        if not isinstance(value, kind) or (kind is str and not value.strip()):
            raise UsageError(f"{where}: key {key!r} must be a non-empty {kind.__name__}")
        return value

    if "OSCE_Examination" in row:
        return case_from_osce(row, where)
    language = row.get("language") or "en"
    if language not in ("en", "zh"):
        raise UsageError(f"{where}: key 'language' must be en or zh, got {language!r}")
    profile = need("profile", dict)
    unknown = sorted(set(profile) - set(PROFILE_FIELDS))
    if unknown or not all(isinstance(v, str) for v in profile.values()):
        raise UsageError(f"{where}: key 'profile' takes string fields of {', '.join(PROFILE_FIELDS)}"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    options, label, diagnosis = row.get("options"), row.get("label"), row.get("diagnosis")
    if options is not None:
        if not (isinstance(options, dict) and options and isinstance(label, str)
                and all(letter in options for letter in label)):
            raise UsageError(f"{where}: key 'label' must name options of key 'options'")
    elif not (isinstance(diagnosis, str) and diagnosis.strip()):
        raise UsageError(f"{where}: a case needs 'options' + 'label' or a non-empty 'diagnosis'")
    rubrics = row.get("rubrics")
    if rubrics is not None:
        try:  # the one validation of rubric criteria (records, reward inputs, rubric files, cases)
            rubrics = tuple(parse_rubrics(rubrics))
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
    return Case(id=str(need("id")), language=language, opening=need("opening"), profile=dict(profile),
                task=row.get("task") or _default_task(language), options=options, label=label,
                diagnosis=diagnosis, rubrics=rubrics)


def _mcq_record(row: dict) -> dict | None:
    """A raw MCQ row (MedQA ``question``/``options``/``answer_idx``; CMExam ``problem_text``/``choices``/``answer``)
    as a record for ``case_from_mcq``; None for other rows."""
    if isinstance(row.get("question"), str) and isinstance(row.get("options"), dict):
        label = row.get("answer_idx") or row.get("label")
        return {"id": row.get("id"), "question": row["question"], "options": row["options"], "label": label}
    if isinstance(row.get("problem_text"), str) and isinstance(row.get("choices"), list):
        letters = "ABCDEFGHIJ"
        answer = row.get("answer") or []
        return {"id": f"cmexam-{row.get('problem_id')}", "question": row["problem_text"], "language": "zh",
                "options": {letters[i]: str(c) for i, c in enumerate(row["choices"])},
                "label": "".join(str(a).upper() for a in answer)}
    return None


def _rows(path: Path) -> list[tuple[int, object]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # a JSON array (MedQA's layout)
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{n}: not JSON ({exc.msg})") from None
    return rows


def load_cases(path: str | Path) -> list[Case]:
    """Cases of a file (JSONL or a JSON array): hand-written rows, AgentClinic OSCE rows, and MCQ rows whose stem
    describes a patient (others are skipped); errors name file:line (item number in an array)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: consultation case file not found")
    cases, seen = [], set()
    for n, row in _rows(path):
        where = f"{path}:{n}"
        if not isinstance(row, dict):
            raise UsageError(f"{where}: a case must be a JSON object")
        mcq = None if "profile" in row or "OSCE_Examination" in row else _mcq_record(row)
        case = (case_from_mcq({**mcq, "id": mcq["id"] or f"{path.stem}-{n}"}) if mcq is not None
                else case_from_row(row, where))
        if case is None:
            continue
        if case.id in seen:
            raise UsageError(f"{where}: duplicate case id {case.id!r}")
        seen.add(case.id)
        cases.append(case)
    return cases


def _default_task(language: str) -> str:
    return "最可能的诊断是什么？" if language == "zh" else "What is the most likely diagnosis?"


# ------------------------------------------------------------------ AgentClinic OSCE
def _flatten(value: Any) -> str:
    """Nested OSCE objects as ``key: value`` text."""
    if isinstance(value, dict):
        return "; ".join(f"{k.replace('_', ' ')}: {_flatten(v)}" for k, v in value.items() if v not in (None, ""))
    if isinstance(value, list):
        return ", ".join(_flatten(v) for v in value)
    return str(value)


def case_from_osce(row: dict, where: str) -> Case:
    """One AgentClinic row (``{"OSCE_Examination": {...}}``; English)."""
    osce = row.get("OSCE_Examination")
    actor = osce.get("Patient_Actor") if isinstance(osce, dict) else None
    diagnosis = osce.get("Correct_Diagnosis") if isinstance(osce, dict) else None
    if not isinstance(actor, dict) or not isinstance(diagnosis, str) or not diagnosis.strip():
        raise UsageError(f"{where}: OSCE_Examination needs 'Patient_Actor' and 'Correct_Diagnosis'")
    symptoms = actor.get("Symptoms") or {}
    primary = symptoms.get("Primary_Symptom", "") if isinstance(symptoms, dict) else ""
    secondary = symptoms.get("Secondary_Symptoms", []) if isinstance(symptoms, dict) else []
    profile = {"demographics": _flatten(actor.get("Demographics", "")), "complaint": primary,
               "history": _flatten(actor.get("History", "")), "symptoms": _flatten(secondary),
               "past_history": _flatten(actor.get("Past_Medical_History", "")),
               "social_history": _flatten(actor.get("Social_History", "")),
               "exam": _flatten(osce.get("Physical_Examination_Findings", "")),
               "tests": _flatten(osce.get("Test_Results", ""))}
    ros = actor.get("Review_of_Systems")
    if ros:
        profile["symptoms"] = "; ".join(x for x in (profile["symptoms"], _flatten(ros)) if x)
    opening = f"Doctor, I'm here because of {primary[0].lower() + primary[1:]}." if primary else \
        "Doctor, I don't feel well."
    cid = row.get("id") or f"osce-{abs(hash(json.dumps(osce, sort_keys=True))) % 10**10}"
    return Case(id=str(cid), language="en", opening=opening, profile={k: v for k, v in profile.items() if v},
                task=osce.get("Objective_for_Doctor") or _default_task("en"), diagnosis=diagnosis)


# ------------------------------------------------------------------ MCQ vignettes (MedQA, CMExam)
_EN_PATIENT = re.compile(r"\b\d+-(?:year|month|week|day)-old\b", re.I)
_ZH_PATIENT = re.compile(r"患者|患儿|病人|\d+岁")
_EN_EXAM = re.compile(r"\b(examination|temperature|pulse|blood pressure|respirations|auscultation|palpation|"
                      r"exam shows|is tender|on exam)", re.I)
_EN_TESTS = re.compile(r"\b(laboratory|serum|studies show|x-ray|radiograph|ct scan|mri|ecg|electrocardiogram|"
                       r"biopsy|ultrasound|urinalysis|hemoglobin|leukocyte|culture|audiometry|\bshows? )", re.I)
_EN_MEDS = re.compile(r"\b(medications?|takes|taking|was treated with|received)\b", re.I)
_EN_SOCIAL = re.compile(r"\b(smokes|smoked|alcohol|drinks|works as|pack-years|sexually active|lives)\b", re.I)
_EN_FAMILY = re.compile(r"\b(family history|mother|father|sister|brother)\b", re.I)
_EN_PAST = re.compile(r"\b(history of|has had|underwent|diagnosed with|type 2 diabetes|hypertension)\b", re.I)
_ZH_EXAM = re.compile(r"查体|体检|检查|体温|血压|脉搏|心率|舌|脉")
_ZH_TESTS = re.compile(r"化验|血常规|尿常规|CT|B超|X线|心电图|实验室|mmol|g/L")
_ZH_PAST = re.compile(r"病史|既往|曾")
_EN_BECAUSE = re.compile(r"because of\s+(?:a |an )?([^.;]+?)(?:\.|;|$)", re.I)
_EN_OPEN = re.compile(r"(?:with|has|complains of|for evaluation of)\s+(?:a |an )?([^.;,]+?)(?:\.|;|,|$)", re.I)
_EN_SPAN = re.compile(r"^(\d+-(?:hour|day|week|month|year)) history of (.+)$", re.I)


def _sentences(text: str, zh: bool) -> list[str]:
    parts = re.split(r"(?<=[。；;！？?])" if zh else r"(?<=[.?!])\s+(?=[A-Z])", text.strip())
    return [p.strip() for p in parts if p.strip()]


def _classify_en(sentence: str) -> str:
    for field, pattern in (("tests", _EN_TESTS), ("exam", _EN_EXAM), ("medications", _EN_MEDS),
                           ("social_history", _EN_SOCIAL), ("family_history", _EN_FAMILY),
                           ("past_history", _EN_PAST)):
        if pattern.search(sentence):
            return field
    return "symptoms"


def _classify_zh(sentence: str) -> str:
    for field, pattern in (("tests", _ZH_TESTS), ("exam", _ZH_EXAM), ("past_history", _ZH_PAST)):
        if pattern.search(sentence):
            return field
    return "symptoms"


def _add(profile: dict[str, str], field: str, text: str, sep: str) -> None:
    profile[field] = f"{profile[field]}{sep}{text}" if profile.get(field) else text


def _en_opening(first: str) -> str:
    """'A 67-year-old man ... because of a 2-day history of ringing in his ear.' -> 'Doctor, I've come in because
    of ringing in my ear for 2 days.'"""
    m = _EN_BECAUSE.search(first) or _EN_OPEN.search(first)
    complaint = m.group(1).strip() if m else ""
    span = _EN_SPAN.match(complaint)
    if span:
        n, unit = span.group(1).split("-")
        complaint = f"{span.group(2)} for {n} {unit}{'s' if n != '1' else ''}"
    complaint = re.sub(r"\b(his|her)\b", "my", complaint)
    return f"Doctor, I've come in because of {complaint}." if complaint else "Doctor, I don't feel well."


def _zh_opening(parts: list[str]) -> str:
    for part in parts:
        for seg in re.split(r"[，,。；]", part):
            seg = re.sub(r"^(患者|患儿|病人|女患者|男患者|因|主诉)+", "", seg).strip()
            if seg and not re.fullmatch(r"[男女]|\d+岁|已婚|未婚|体重\d+kg", seg):
                return f"医生，我{seg}。"
    return "医生，我不太舒服。"


def case_from_mcq(record: dict) -> Case | None:
    """A vignette MCQ record (``question``, ``options``, ``label``, ``language``, ``id``) as a case: the stem's
    sentences before the question become profile fields, the first one also the opening complaint, the last
    (question) sentence the task. None for a stem that describes no patient."""
    stem, options, label = record.get("question") or "", record.get("options"), record.get("label")
    if not (options and label):
        return None
    zh = record.get("language") == "zh" or bool(re.search(r"[\u4e00-\u9fff]", stem))
    if not (_ZH_PATIENT if zh else _EN_PATIENT).search(stem):
        return None
    parts = _sentences(stem, zh)
    if zh and len(parts) == 1:  # CMExam: "患者，男，48岁。...下列...是" ends with its question clause
        parts = re.split(r"(?<=。)", stem)
    task = parts[-1] if len(parts) > 1 else _default_task("zh" if zh else "en")
    facts = parts[:-1] if len(parts) > 1 else parts
    if not facts:
        return None
    profile: dict[str, str] = {}
    first = facts[0]
    if zh:
        demo = re.findall(r"[男女]|\d+岁", first)
        if demo:
            profile["demographics"] = "，".join(demo)
        for p in facts:
            _add(profile, _classify_zh(p), p, "")
        opening = _zh_opening(facts)
    else:
        m = re.search(r"\b\d+-(?:year|month|week|day)-old (?:man|woman|boy|girl|male|female|infant|child)", first)
        if m:
            profile["demographics"] = m.group(0)
        _add(profile, "complaint", first, " ")
        for p in facts[1:]:
            _add(profile, _classify_en(p), p, " ")
        opening = _en_opening(first)
    return Case(id=f"{record.get('id', 'mcq')}", language="zh" if zh else "en", opening=opening,
                profile=profile, task=task, options=dict(options), label=str(label).upper())


def load_all_cases(paths: list[str]) -> list[Case]:
    cases = [c for p in paths for c in load_cases(p)]
    seen: set[str] = set()
    for c in cases:
        if c.id in seen:
            raise UsageError(f"consult.cases: case id {c.id!r} appears in two files")
        seen.add(c.id)
    if not cases:
        raise UsageError(f"consult.cases: no case in {', '.join(paths)}")
    return cases
