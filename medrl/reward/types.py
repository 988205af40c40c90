"""What goes into the reward plane and what comes out (imported by PPO and eval)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal

from medrl.data.schema import parse_messages, parse_rubrics
from medrl.reward.text import SplitResponse, split_response

_RISKS = ("high", "medium", "low")
_BEHAVIORS = ("refuse", "triage", "answer_safely")

JudgeStatus = Literal["ok", "cached", "failed", "over_budget", "disabled", "skipped"]
"""ok: judged now; cached: judgement read from the cache (not paid again); failed: no valid judgement after the
bounded retries (reason in ``reasons['judge']``); over_budget: the budget cap was reached; disabled: provider none;
skipped: no judge call was needed or possible (prompt injection, or the offline judge without a reference)."""


@dataclass(frozen=True)
class Weights:
    """The weights of R's parts for one item (``RewardConfig.mix``)."""
    rule: float
    teacher: float
    verifier: float
    rubric: float


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
    messages: tuple[dict[str, str], ...] | None = None
    """The conversation before the response (``{role, content}`` dicts ending with a user turn); None: ``prompt``
    is the whole conversation."""
    rubrics: tuple[dict[str, Any], ...] | None = None
    """Rubric criteria (``{criterion, points, tags}``) graded by the rubric reward (``reward.w_rubric``)."""
    weights: Weights | None = None
    """The item's own weights (a consultation's ``consult.w_*``); None: ``reward.w_*``. A part weighted 0 is not
    asked for (no teacher call, no verdict, no rubric grading)."""

    @cached_property
    def parsed(self) -> SplitResponse:
        """The response split once into its reasoning and final answer (``split_response``), shared by the rules,
        the judge key, the rubric plan and the verifier."""
        return split_response(self.response)

    @property
    def conversation(self) -> tuple[dict[str, str], ...]:
        """The conversation the response answers: ``messages``, or one user turn holding ``prompt``."""
        return self.messages or ({"role": "user", "content": self.prompt},)

    @classmethod
    def from_record(cls, row: dict[str, Any]) -> "RewardInput":
        """From a judge input row (``prompt``/``response``) or a data record (``question``/``output``), with
        optional ``messages`` (or a HealthBench ``prompt`` list) and ``rubrics``. Raises ValueError naming the bad
        key."""
        prompt = row.get("prompt", row.get("question"))
        response = row.get("response", row.get("output"))
        messages_key = "prompt" if isinstance(prompt, list) and row.get("messages") is None else "messages"
        raw_messages = prompt if messages_key == "prompt" else row.get("messages")  # HealthBench: prompt = turns
        messages = parse_messages(raw_messages, messages_key)
        rubrics = parse_rubrics(row.get("rubrics"))
        if not isinstance(prompt, str) and messages is not None:
            prompt = messages[-1]["content"]
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
        rid = row.get("id") or hashlib.sha256(json.dumps([prompt, response, reference]).encode()).hexdigest()[:16]
        return cls(id=str(rid), prompt=prompt, response=response, reference=reference, risk=risk,
                   expected_behavior=behavior, language=row.get("language"), label=label, options=options or None,
                   messages=tuple(messages) if messages else None, rubrics=tuple(rubrics) if rubrics else None)


@dataclass
class RewardResult:
    id: str
    reward: float
    """R = the weighted mean of the parts present (``RewardConfig.mix``); R = rule without any; 0 on prompt
    injection."""
    rule: float
    teacher: float | None
    components: dict[str, float] = field(default_factory=dict)
    """Every rule score, ``rule``, ``teacher`` and the judge's dimensions (``judge.accuracy`` ... scaled to [0, 1]),
    ``rubric`` (HealthBench item score clipped to [0, 1]) and ``verifier`` when present."""
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
    criteria: list[dict[str, Any]] = field(default_factory=list)
    """One ``{criterion, points, tags, met, explanation}`` per rubric criterion (``met`` None: its grading failed)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
