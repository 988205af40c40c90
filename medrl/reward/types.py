"""What goes into the reward plane and what comes out (imported by PPO and eval)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

_RISKS = ("high", "medium", "low")
_BEHAVIORS = ("refuse", "triage", "answer_safely")

JudgeStatus = Literal["ok", "cached", "failed", "over_budget", "disabled", "skipped"]
"""ok: judged now; cached: judgement read from the cache (not paid again); failed: no valid judgement after the
bounded retries (reason in ``reasons['judge']``); over_budget: the budget cap was reached; disabled: provider none;
skipped: no judge call was needed or possible (prompt injection, or the offline judge without a reference)."""


@dataclass(frozen=True)
class RewardInput:
    id: str
    prompt: str
    response: str
    """The full policy output: ``<think>...</think>`` then the final answer."""
    reference: str | None = None
    risk: Literal["high", "medium", "low"] = "low"
    expected_behavior: Literal["refuse", "triage", "answer_safely"] | None = None
    language: Literal["en", "zh"] | None = None
    label: str | None = None
    """Ground-truth label for the verifier: MCQ option letter(s) (``B``, ``ACE``) or yes / no / maybe."""
    options: dict[str, str] | None = None
    """MCQ options (letter -> text) when ``label`` is a letter."""
    messages: tuple[dict, ...] | None = None
    """The conversation before the response (``{role, content}`` turns ending with the user turn ``prompt``), or None
    for a single question."""
    rubrics: tuple[dict, ...] | None = None
    """Rubric criteria ``{criterion, points, tags}`` of the prompt, or None."""

    @classmethod
    def from_record(cls, row: dict[str, Any]) -> "RewardInput":
        """From a judge input row (``prompt``/``response``) or a data record (``question``/``output``).
        Raises ValueError naming the bad key."""
        prompt = row.get("prompt", row.get("question"))
        response = row.get("response", row.get("output"))
        if not isinstance(prompt, str):
            raise ValueError("key 'prompt' (or 'question') must be a string")
        if not isinstance(response, str):
            raise ValueError("key 'response' (or 'output') must be a string")
        reference = row.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise ValueError(f"key 'reference' must be a string or null, got {type(reference).__name__}")
        risk = row.get("risk") or "low"
        if risk not in _RISKS:
            raise ValueError(f"key 'risk' must be one of {', '.join(_RISKS)}, got {risk!r}")
        behavior = row.get("expected_behavior")
        if behavior not in (None, *_BEHAVIORS):
            raise ValueError(f"key 'expected_behavior' must be one of {', '.join(_BEHAVIORS)} or null, "
                             f"got {behavior!r}")
        label, options = row.get("label"), row.get("options")
        if label is not None and not isinstance(label, str):
            raise ValueError(f"key 'label' must be a string or null, got {type(label).__name__}")
        if options is not None and not (isinstance(options, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in options.items())):
            raise ValueError("key 'options' must be an object of letter -> option text, or null")
        messages = row.get("messages")
        if messages is not None and not (isinstance(messages, list) and messages and all(
                isinstance(t, dict) and t.get("role") in ("system", "user", "assistant")
                and isinstance(t.get("content"), str) for t in messages) and messages[-1]["role"] == "user"):
            raise ValueError("key 'messages' must be a list of {role, content} turns ending with a user turn, or null")
        rid = row.get("id") or hashlib.sha256(json.dumps([prompt, response, reference]).encode()).hexdigest()[:16]
        return cls(id=str(rid), prompt=prompt, response=response, reference=reference, risk=risk,
                   expected_behavior=behavior, language=row.get("language"), label=label, options=options or None,
                   messages=tuple({"role": t["role"], "content": t["content"]} for t in messages) if messages
                   else None)


@dataclass
class RewardResult:
    id: str
    reward: float
    """R = w_rule * rule + w_teacher * teacher; R = rule without a teacher score; 0 on prompt injection."""
    rule: float
    teacher: float | None
    components: dict[str, float] = field(default_factory=dict)
    """Every rule score, ``rule``, ``teacher`` and the judge's dimensions (``judge.accuracy`` ... scaled to [0, 1])."""
    reasons: dict[str, str] = field(default_factory=dict)
    judge: str = "none"
    """Which judge produced ``teacher`` (e.g. ``openai:deepseek-chat``, ``reference:medrl-reference-v1``)."""
    judge_status: JudgeStatus = "disabled"
    dropped: bool = False
    """True when the judgement failed and ``reward.judge.on_failure`` is ``drop``: leave the sample out."""
    flags: list[str] = field(default_factory=list)
    tokens_in: int = 0
    """Prompt tokens paid for by this sample's judge calls (0 when cached)."""
    tokens_out: int = 0
    tokens_cache_hit: int = 0
    """Prompt tokens the provider served from its prefix cache (cheaper)."""
    cost_usd: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
