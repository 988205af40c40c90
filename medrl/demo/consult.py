"""The demo's consultation tab: each model (base, SFT, RL) plays the doctor and interviews the simulated patient of a
case turn by turn, the patient's hidden profile never shown, streamed as a chat, then its outcome (turns used, the
final answer, whether it matches the target, leak).

The dialogue is the rollouts' (``medrl.consult``): the same prompt ids, the same turn bookkeeping
(``take_policy_turn`` / ``take_patient_reply``), the same patient (scripted, or the LLM patient on the demo judge's
event loop and ledger: one budget for judge and patient in a session) and the eval's verifier (``correct``).
"""
from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medrl.consult.cases import Case
from medrl.consult.dialogue import Dialogue, take_patient_reply, take_policy_turn
from medrl.consult.patient import PatientReply
from medrl.consult.protocol import TurnJoiner
from medrl.errors import UsageError

SAMPLE_CASES = Path(__file__).resolve().parents[2] / "data" / "samples" / "consultation"
"""The shipped sample cases, used when the config names no ``consult.cases`` (a source checkout)."""


def demo_cases(consult_cfg) -> tuple[list[Case], str]:
    """The cases of ``consult.cases``, else the sample cases; and a line saying where they come from."""
    from medrl.consult.cases import load_all_cases

    if consult_cfg.cases:
        return load_all_cases(consult_cfg.cases), f"`consult.cases`: {', '.join(consult_cfg.cases)}"
    files = sorted(SAMPLE_CASES.glob("*.jsonl"))
    if not files:
        return [], "no cases: set `consult.cases` in the config"
    return load_all_cases([str(f) for f in files]), f"the sample cases ({', '.join(f.name for f in files)})"


def case_label(case: Case) -> str:
    return f"{case.id} · {case.language} · {case.opening[:60]}"


class DemoPatient:
    """The configured simulated patient of ``consult.patient``: scripted, or the LLM patient on ``judge``'s event
    loop and ledger (budget, rate limits) with the judge store as its reply cache."""

    def __init__(self, cfg, judge):
        from medrl.consult.evaluate import local_patient_spec
        from medrl.consult.patient import ScriptedPatient

        self.judge, self.unavailable, self.timeout = judge, "", 60.0
        p = cfg.consult.patient
        self.name = "scripted patient" if p.provider == "scripted" else f"LLM patient ({p.model or 'judge model'})"
        if p.provider == "scripted":
            self.patient = ScriptedPatient()
            return
        self.patient = None
        try:
            spec = local_patient_spec(cfg)
        except UsageError as exc:
            self.unavailable = f"patient unavailable: {exc}"
            return
        jc = spec.judge
        self.timeout = jc.timeout_s * (jc.max_retries + 1) * (p.leak_retries + 1) + 30

        async def make():
            from medrl.consult.engine import llm_patient
            from medrl.reward.ledger import local_gate

            return llm_patient(spec, local_gate(judge.ledger, max(1, jc.concurrency // 4)))

        self.patient = judge.run(make(), 60)

    def reply(self, case: Case, qa: list[tuple[str, str | None]]) -> PatientReply:
        return self.judge.run(self.patient.reply(case, qa), self.timeout)

    def close(self) -> None:
        if hasattr(self.patient, "close"):
            self.judge.run(self.patient.close(), 30)


@dataclass(frozen=True)
class ConsultSettings:
    max_turns: int
    turn_tokens: int
    system_prompt: str | None


def interview(models, patient: DemoPatient, case: Case, name: str, settings: ConsultSettings,
              temperature: float = 0.0) -> Iterator[tuple[Dialogue, str | None]]:
    """Model ``name`` interviews the patient of ``case`` to the end: ``(dialogue, the policy turn being written)``
    after every decoded piece, ``(dialogue, None)`` after every whole turn (policy or patient)."""
    from medrl.consult.engine import opening_dialogue

    tok = models.tokenizer
    d = opening_dialogue(tok, case, settings.system_prompt, settings.max_turns)
    joiner = TurnJoiner(tok)
    yield d, None
    while d.status == "running":
        for text, ids in models.stream_ids(name, d.prompt_ids + d.response_ids, settings.turn_tokens, temperature):
            if ids is None:
                yield d, text
        take_policy_turn(d, ids, tok.decode(ids, skip_special_tokens=True), bool(ids) and ids[-1] in models.eos,
                         settings.max_turns)
        yield d, None
        if d.status == "running":
            take_patient_reply(d, patient.reply(d.case, d.qa), joiner)
            yield d, None


def render_case(case: Case) -> str:
    """What the doctor is told of a case: the patient's opening, the task, the options (never the profile)."""
    options = "".join(f"<li><b>{html.escape(k)}.</b> {html.escape(v)}</li>" for k, v in (case.options or {}).items())
    return (f'<div class="medrl-case" data-case="{html.escape(case.id)}"><p><b>Patient</b>: '
            f'<span class="medrl-opening">{html.escape(case.opening)}</span></p><p><b>Task</b>: '
            f'{html.escape(case.task)}</p>{f"<ol class=medrl-options>{options}</ol>" if options else ""}'
            f'<p><i>The patient\'s history, exam and test results stay hidden: the models must ask.</i></p></div>')


def _turn(role: str, body: str) -> str:
    return f'<div class="medrl-chat-turn" data-role="{role}"><b>{role}</b>: {body}</div>'


def render_dialogue(d: Dialogue, writing: str | None, max_turns: int) -> str:
    """HTML of a dialogue as a chat (the patient's opening first, doctor turns with their think blocks folded), the
    turn being written, and once it has ended its outcome."""
    from medrl.consult.evaluate import correct
    from medrl.demo.engine import render_response

    done = d.status != "running"
    parts = [f'<div class="medrl-consult" data-status="{d.status}" data-done="{int(done)}">',
             _turn("patient", f'<span class="medrl-turn-text">{html.escape(d.case.opening)}</span>')]
    for t in d.turns:
        if t["role"] == "assistant":
            parts.append(_turn("doctor", render_response(t["content"], done=True)))
        else:
            parts.append(_turn("patient", f'<span class="medrl-turn-text">{html.escape(t["content"])}</span>'))
    if writing is not None:
        parts.append(_turn("doctor", render_response(writing, done=False)))
    if done:
        right = d.status == "answered" and correct(d.case, d.final_text)
        leaked = d.status == "leaked"
        answer = html.escape(d.answer) if d.answer is not None else "<i>none</i>"
        parts.append(f'<p class="medrl-outcome" data-turns="{d.policy_turns}" data-correct="{int(right)}" '
                     f'data-leak="{int(leaked)}">{html.escape(d.status.replace("_", " "))} · turns used '
                     f'{d.policy_turns} of {max_turns} · final answer: {answer} · matches the target: '
                     f'<b>{"yes" if right else "no"}</b> · leak: {"yes" if leaked else "no"} · patient calls '
                     f'{d.patient_calls} ({d.patient_cached} cached)</p>')
    parts.append("</div>")
    return "".join(parts)
