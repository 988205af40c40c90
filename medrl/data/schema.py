"""The one record schema every stage reads, and the validation that turns loader output into records.

Record (train/dev/test/gold/redteam/<benchmark> .jsonl), in this key order:

    id, source, language, question, think, answer, output, reference, options, label, specialty, risk, category,
    expected_behavior, messages, rubrics, example_tags, meta

``output`` is ``"<think>\\n{think}\\n</think>\\n\\n{answer}"`` (Qwen3's thinking format; an empty think gives Qwen3's
no-thinking form). ``id`` is a content hash (16 hex digits of sha256 over question, think, answer, reference,
label, and the conversation when the record has one), so the same content always gets the same id whatever file or
order it came from.

A conversation record carries ``messages`` (``[{role, content}]``, system / user / assistant, ending with a user
turn: the conversation before the answer); its ``question`` is the last user turn. ``rubrics``
(``[{criterion, points in [-10, 10], tags}]``, at least one positive) and ``example_tags`` are HealthBench-style
grading data. All three are null when absent.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import string
from typing import Any, Callable

from medrl.data.clean import normalize_text, skeleton
from medrl.data.risk import classify_risk

RECORD_FIELDS = ("id", "source", "language", "question", "think", "answer", "output", "reference", "options",
                 "label", "specialty", "risk", "category", "expected_behavior", "messages", "rubrics",
                 "example_tags", "meta")
RL_PROMPT_FIELDS = ("id", "prompt", "reference", "label", "options", "risk", "source", "language", "category",
                    "expected_behavior", "messages", "rubrics", "example_tags")
EXPECTED_BEHAVIORS = ("refuse", "triage", "answer_safely")
ROLES = ("system", "user", "assistant")
MAX_POINTS = 10

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


def record_id(question: str, think: str, answer: str, reference: str | None, label: str | None,
              messages: list[dict] | None = None) -> str:
    """The content hash; the conversation joins it only when there is one (ids of question records never change)."""
    parts = [question, think, answer, reference or "", label or ""]
    if messages:
        parts.append(json.dumps(messages, ensure_ascii=False, sort_keys=True))
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


def conversation_text(record: dict[str, Any]) -> str:
    """Every turn of a record's conversation, one after the other (its question when it has none): what length
    bounds, duplicate keys and decontamination read."""
    messages = record.get("messages")
    return "\n".join(t["content"] for t in messages) if messages else record["question"]


def _messages(value: Any, name: str) -> list[dict[str, str]] | None:
    """A raw message list as ``[{role, content}]``: system (opening only), user and assistant turns, normalised
    text, ending with a user turn. Raises RowError naming the key (``prompt.2.role``)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{name}' must be a non-empty list of {{role, content}} turns")
    turns = []
    for i, turn in enumerate(value):
        where = f"{name}.{i}"
        if not isinstance(turn, dict):
            raise RowError(f"field '{where}' must be an object with role and content, got {type(turn).__name__}")
        role = turn.get("role")
        if role not in ROLES:
            raise RowError(f"field '{where}.role' must be one of {', '.join(ROLES)}; got {role!r}")
        if role == "system" and i > 0:
            raise RowError(f"field '{where}.role': a system turn may only open the conversation")
        turns.append({"role": role, "content": text_value(turn.get("content"), f"{where}.content", required=True)})
    if turns[-1]["role"] != "user":
        raise RowError(f"field '{name}' must end with a user turn (the last turn is {turns[-1]['role']})")
    return turns


def _rubrics(value: Any, name: str) -> list[dict[str, Any]] | None:
    """Raw rubric criteria as ``[{criterion, points, tags}]``: points a number in [-10, 10], tags a list of text,
    at least one positive criterion (the item score divides by the positive points). Raises RowError."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{name}' must be a non-empty list of {{criterion, points, tags}}")
    out = []
    for i, item in enumerate(value):
        where = f"{name}.{i}"
        if not isinstance(item, dict):
            raise RowError(f"field '{where}' must be an object with criterion, points and tags, "
                           f"got {type(item).__name__}")
        criterion = text_value(item.get("criterion"), f"{where}.criterion", required=True)
        points = item.get("points")
        if (isinstance(points, bool) or not isinstance(points, (int, float)) or not math.isfinite(points)
                or abs(points) > MAX_POINTS):
            raise RowError(f"field '{where}.points' must be a number in [-{MAX_POINTS}, {MAX_POINTS}], got {points!r}")
        out.append({"criterion": criterion, "points": float(points), "tags": _tags(item.get("tags"), f"{where}.tags")})
    if not any(r["points"] > 0 for r in out):
        raise RowError(f"field '{name}' has no criterion with positive points (the item score divides by their sum)")
    return out


def _tags(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowError(f"field '{name}' must be a list of strings, got {type(value).__name__}")
    return [text_value(tag, f"{name}.{i}", required=True) for i, tag in enumerate(value)]


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

    ``raw`` holds question (or messages), answer, think, reference, specialty, options, label, rubrics,
    example_tags (raw values, any type), ``meta`` (dict) and optionally ``risk_text`` (the text the risk rules read;
    default: the question, or every user turn of a conversation). ``names`` maps schema fields to the raw keys they
    came from, so reject reasons name the key of the file. Raises RowError."""
    names = names or {}

    def field(key: str, required: bool) -> str:
        return text_value(raw.get(key), names.get(key, key), required=required)

    messages = _messages(raw.get("messages"), names.get("messages", "messages"))
    rubrics = _rubrics(raw.get("rubrics"), names.get("rubrics", "rubrics"))
    example_tags = _tags(raw.get("example_tags"), names.get("example_tags", "example_tags")) or None
    if messages is None and "messages" in names:  # a source that maps its conversation needs one on every row
        raise RowError(f"missing field '{names['messages']}'")
    question = messages[-1]["content"] if messages else field("question", True)
    reference = field("reference", False) or None
    options = _options(raw.get("options"), names.get("options", "options"))
    label = None
    if options is not None:
        label = mcq_label(raw.get("label"), options, names.get("label", "label"), label_index_base)
        if label is not None and reference is None:  # the correct option's text: what the judges compare with
            reference = "; ".join(options[k] for k in label)
        question = _with_options(question, options)
        if messages:
            messages[-1]["content"] = question
    else:
        label = field("label", False) or None
    # red-team items carry an expected behaviour and rubric items their criteria instead of an answer; an MCQ answer
    # defaults to "B. <text>"
    mcq_answer = f"{label}. {reference}" if label is not None and options is not None else None
    answer = (field("answer", reference is None and raw.get("expected_behavior") is None and rubrics is None)
              or mcq_answer or reference or "")
    think = field("think", False)
    specialty = field("specialty", False) or None
    asked = "\n".join(t["content"] for t in messages if t["role"] == "user") if messages else question
    risk_text = text_value(raw.get("risk_text"), "risk_text", required=False) or asked
    risk, rules = classify_risk(risk_text)
    lang = detect_language(asked) if language == "auto" else language
    meta = dict(raw.get("meta") or {})
    if rules:
        meta["risk_rules"] = rules
    return {
        "id": record_id(question, think, answer, reference, label, messages),
        "source": source, "language": lang, "question": question, "think": think, "answer": answer,
        "output": format_output(think, answer), "reference": reference, "options": options, "label": label,
        "specialty": specialty, "risk": risk, "category": raw.get("category"),
        "expected_behavior": raw.get("expected_behavior"), "messages": messages, "rubrics": rubrics,
        "example_tags": example_tags, "meta": meta,
    }


def rl_prompt_row(record: dict[str, Any], render_prompt: Callable[[dict], str] | None = None) -> dict[str, Any]:
    """The rl_prompts.jsonl row of a record. An MCQ/yes-no label is put in front of the reference text (for the
    rubric judge) and kept with the options (for the verifier reward); ``render_prompt`` (``eval.mcq_prompt``)
    words an MCQ prompt as the eval does, asking for the answer letter after the reasoning. ``prompt`` is the last
    user turn; a conversation, its rubric and tags come along as they are."""
    reference = record["reference"]
    if record["label"] is not None:
        reference = f"{record['label']}: {reference}" if reference else record["label"]
    prompt = render_prompt(record) if render_prompt else record["question"]
    return {"id": record["id"], "prompt": prompt, "reference": reference, "label": record["label"],
            "options": record["options"], "risk": record["risk"], "source": record["source"],
            "language": record["language"], "category": record["category"],
            "expected_behavior": record["expected_behavior"], "messages": record.get("messages"),
            "rubrics": record.get("rubrics"), "example_tags": record.get("example_tags")}
