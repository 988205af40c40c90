"""The one record schema every stage reads, and the validation that turns loader output into records.

Record (train/dev/test/gold/redteam/<benchmark> .jsonl), in this key order:

    id, source, language, question, think, answer, output, reference, options, label, specialty, risk, category,
    expected_behavior, meta

``output`` is ``"<think>\\n{think}\\n</think>\\n\\n{answer}"`` (Qwen3's thinking format; an empty think gives Qwen3's
no-thinking form). ``id`` is a content hash (16 hex digits of sha256 over question, think, answer, reference,
label), so the same content always gets the same id whatever file or order it came from.
"""
from __future__ import annotations

import hashlib
import re
import string
from typing import Any, Callable

from medrl.data.clean import normalize_text, skeleton
from medrl.data.risk import classify_risk

RECORD_FIELDS = ("id", "source", "language", "question", "think", "answer", "output", "reference", "options",
                 "label", "specialty", "risk", "category", "expected_behavior", "meta")
RL_PROMPT_FIELDS = ("id", "prompt", "reference", "label", "options", "risk", "source", "language", "category",
                    "expected_behavior")
EXPECTED_BEHAVIORS = ("refuse", "triage", "answer_safely")

_ASCII_LETTERS = string.ascii_letters.encode()
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class RowError(ValueError):
    """A raw row that cannot become a record; the message is the reject reason."""


def text_value(value: Any, name: str, *, required: bool) -> str:
    """A raw field as normalised text. Strings are required; numbers are accepted and written as text."""
    if value is None:
        if required:
            raise RowError(f"missing field '{name}'")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"field '{name}' must be text, got {type(value).__name__}")
    text = value if isinstance(value, str) else str(value)
    if _SURROGATE.search(text):
        raise RowError(f"field '{name}' has undecodable bytes")
    text = normalize_text(text)
    if required and not text:
        raise RowError(f"empty field '{name}'")
    return text


def detect_language(text: str) -> str:
    """``zh`` when at least 20% of the letters are CJK: wide characters (3+ bytes in UTF-8, i.e. CJK ideographs and
    full-width punctuation) against ASCII letters, counted with byte arithmetic (fast)."""
    data = text.encode("utf-8", "surrogatepass")
    wide = (len(data) - len(text)) // 2
    if not wide:
        return "en"
    ascii_letters = len(data) - len(data.translate(None, _ASCII_LETTERS))
    return "zh" if wide >= 0.2 * (wide + ascii_letters) else "en"


def format_output(think: str, answer: str) -> str:
    return f"<think>\n{think}\n</think>\n\n{answer}"


def record_id(question: str, think: str, answer: str, reference: str | None, label: str | None) -> str:
    blob = "\x1f".join((question, think, answer, reference or "", label or ""))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _options(value: Any, name: str) -> dict[str, str] | None:
    if value is None or value == "" or value == {} or value == []:
        return None
    if isinstance(value, list):
        if len(value) > len(string.ascii_uppercase):
            raise RowError(f"field '{name}' has {len(value)} entries (at most 26)")
        value = dict(zip(string.ascii_uppercase, value))
    if not isinstance(value, dict):
        raise RowError(f"field '{name}' must be an object or a list, got {type(value).__name__}")
    out = {}
    for key, text in value.items():
        letter = normalize_text(str(key)).upper()
        if not letter:
            raise RowError(f"field '{name}' has an empty key")
        out[letter] = text_value(text, f"{name}.{key}", required=True)
    return out


def mcq_label(value: Any, options: dict[str, str], name: str, index_base: int = 0) -> str | None:
    """The option letter(s) of a raw MCQ label: a letter in any case (``c``), a number counted from
    ``index_base`` (``2`` = C when 0-based), the text of the correct option, or several letters for a
    multiple-answer item (``["a", "c"]``, ``"A,C"``, ``"AC"``: returned sorted and joined, ``AC``). Raises RowError."""
    if value is None or value == "" or value == []:
        return None
    letters = list(options)
    parts = value if isinstance(value, list) else [value]
    out = []
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (str, int, float)):
            raise RowError(f"field '{name}' must be a letter, a number or an option's text, got {type(part).__name__}")
        text = normalize_text(str(part))
        if isinstance(part, (int, float)) or re.fullmatch(r"\d+", text):
            k = int(float(text)) - index_base
            if not 0 <= k < len(letters) or float(text) != int(float(text)):
                raise RowError(f"label {text} is not an option index ({index_base}-{len(letters) - 1 + index_base}; "
                               f"data.catalog.<source>.label_index_base is {index_base})")
            out.append(letters[k])
            continue
        if text.upper() in options:
            out.append(text.upper())
            continue
        by_text = [k for k, v in options.items() if skeleton(v) == skeleton(text)]
        if by_text and skeleton(text):
            out.append(by_text[0])
            continue
        several = re.sub(r"[\s,;、，和及]+", "", text).upper()
        if len(parts) == 1 and several and all(c in options for c in several):
            out.extend(several)
            continue
        raise RowError(f"label '{text[:60]}' is not one of the options {', '.join(options)} (nor an option's text)")
    return "".join(sorted(set(out)))


def _with_options(question: str, options: dict[str, str]) -> str:
    """Append the option list to an MCQ question unless the question already spells every option out."""
    if all(text in question for text in options.values()):
        return question
    return question + "\n\n" + "\n".join(f"{k}. {v}" for k, v in options.items())


def build_record(source: str, raw: dict[str, Any], language: str = "auto",
                 names: dict[str, str] | None = None, label_index_base: int = 0) -> dict[str, Any]:
    """Validate one loader row and return a complete record.

    ``raw`` holds question, answer, think, reference, specialty, options, label (raw values, any type), ``meta``
    (dict) and optionally ``risk_text`` (the text the risk rules read; default: the question). ``names`` maps
    schema fields to the raw keys they came from, so reject reasons name the key of the file. Raises RowError."""
    names = names or {}

    def field(key: str, required: bool) -> str:
        return text_value(raw.get(key), names.get(key, key), required=required)

    question = field("question", True)
    reference = field("reference", False) or None
    options = _options(raw.get("options"), names.get("options", "options"))
    label = None
    if options is not None:
        label = mcq_label(raw.get("label"), options, names.get("label", "label"), label_index_base)
        if label is not None and reference is None:  # the correct option's text: what the judges compare with
            reference = "; ".join(options[k] for k in label)
        question = _with_options(question, options)
    else:
        label = field("label", False) or None
    # red-team items carry an expected behaviour instead of an answer; an MCQ answer defaults to "B. <text>"
    mcq_answer = f"{label}. {reference}" if label is not None and options is not None else None
    answer = (field("answer", reference is None and raw.get("expected_behavior") is None)
              or mcq_answer or reference or "")
    think = field("think", False)
    specialty = field("specialty", False) or None
    risk_text = text_value(raw.get("risk_text"), "risk_text", required=False) or question
    risk, rules = classify_risk(risk_text)
    lang = detect_language(question) if language == "auto" else language
    meta = dict(raw.get("meta") or {})
    if rules:
        meta["risk_rules"] = rules
    return {
        "id": record_id(question, think, answer, reference, label),
        "source": source, "language": lang, "question": question, "think": think, "answer": answer,
        "output": format_output(think, answer), "reference": reference, "options": options, "label": label,
        "specialty": specialty, "risk": risk, "category": raw.get("category"),
        "expected_behavior": raw.get("expected_behavior"), "meta": meta,
    }


def rl_prompt_row(record: dict[str, Any], render_prompt: Callable[[dict], str] | None = None) -> dict[str, Any]:
    """The rl_prompts.jsonl row of a record. An MCQ/yes-no label is put in front of the reference text (for the
    rubric judge) and kept with the options (for the verifier reward); ``render_prompt`` (``eval.mcq_prompt``)
    words an MCQ prompt as the eval does, asking for the answer letter after the reasoning."""
    reference = record["reference"]
    if record["label"] is not None:
        reference = f"{record['label']}: {reference}" if reference else record["label"]
    prompt = render_prompt(record) if render_prompt else record["question"]
    return {"id": record["id"], "prompt": prompt, "reference": reference, "label": record["label"],
            "options": record["options"], "risk": record["risk"], "source": record["source"],
            "language": record["language"], "category": record["category"],
            "expected_behavior": record["expected_behavior"]}
