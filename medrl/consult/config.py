"""Config of consultation RL (``consult``, owned by medrl.consult): the cases, the turn protocol, the simulated
patient and the consultation-specific parts of the reward (docs/consultation.md)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from medrl.config_base import StrictModel
from medrl.reward.config import Price

PATIENT_PROMPT_VERSION = "patient-v1"


class PatientConfig(StrictModel):
    provider: Literal["scripted", "openai"] = "scripted"
    """``scripted``: the deterministic offline patient answering from the profile's fields by question cues (no
    network; ``make run`` and CI). ``openai``: an LLM over the judge's OpenAI-compatible endpoint, API key, rate
    limits, budget and judge store (needs ``reward.judge.provider: openai``)."""
    model: str | None = None
    """Patient model at the judge's endpoint; None: the judge's model."""
    prices: dict[str, Price] = {}
    """Price of the patient model when it is not in ``reward.judge.prices`` (USD per million tokens: ``input``,
    ``input_cache_hit``, ``output``); the spending counts against the judge's budget."""
    temperature: float = Field(0.3, ge=0, le=2)
    """Sampling temperature of the patient (replies are cached, so a resumed run replays them exactly)."""
    max_tokens: int = Field(128, ge=16)
    """Reply budget of one patient call."""
    prompt_version: str = PATIENT_PROMPT_VERSION
    """Version of the patient prompt (``medrl.consult.patient.PATIENT_PROMPT``); part of every reply's cache key."""
    leak_retries: int = Field(1, ge=0)
    """A reply that names the target is asked again this many times; then the dialogue ends as ``leaked`` and its
    sample leaves the batch."""


class ConsultConfig(StrictModel):
    cases: list[str] = []
    """Case files (JSONL, or a JSON array): hand-written cases, AgentClinic OSCE rows, or MCQ rows (``question`` +
    ``options`` + ``answer_idx``; CMExam ``problem_text`` + ``choices`` + ``answer``) whose vignettes become cases."""
    cases_per_step: int = Field(0, ge=0)
    """Consultation cases per PPO step, each interviewed ``ppo.samples_per_prompt`` times, next to the
    ``ppo.prompts_per_step`` single-turn prompts (0: no consultation RL)."""
    max_turns: int = Field(4, ge=1)
    """Policy turns per dialogue, the final answer included; a dialogue that reaches it without ``FINAL ANSWER``
    has no answer."""
    turn_tokens: int = Field(96, ge=8)
    """Token budget of one policy turn (``<think>`` + question or answer)."""
    patient: PatientConfig = PatientConfig()
    """The simulated patient: scripted (offline) or an LLM over the judge's endpoint."""
    w_verifier: float = Field(1.0, gt=0)
    """Weight of the final answer's correctness (the verifier: the case's label or diagnosis) in a consultation's R;
    the consultation weights replace ``reward.w_*`` for dialogues only (single-turn prompts keep theirs)."""
    w_rubric: float = Field(0.5, ge=0)
    """Weight of the case's consultation rubric (information gathered, red flags asked, safety advice), graded on
    the whole dialogue; cases without a rubric leave it out. 0: not graded."""
    w_rule: float = Field(0.2, ge=0)
    """Weight of the rules (format, length, safety, keywords) on the final answer turn. The safety rules on every
    policy turn apply whatever the weights (dangerous content or an injection in any turn: R = 0). The teacher's
    Likert judgement is never asked for a dialogue."""
    turn_cost: float = Field(0.02, ge=0, le=0.25)
    """Subtracted from R for every policy turn after the first: among equally good consultations the shorter one
    wins; small, so asking what is needed still pays."""
    no_answer_reward: float = Field(0.0, ge=0, le=1)
    """R of a dialogue that ran out of turns without a final answer."""
    eval_limit: int = Field(8, ge=0)
    """Cases of the consultation eval (single turn vs interviewed; 0: no consultation eval)."""
