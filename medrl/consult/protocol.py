"""The turn protocol of a consultation (pure): what the doctor (the policy) is told, how a turn is read (a question
to the patient, or the final answer), and the exact tokens that join turns.

A dialogue is one token sequence: the rendered prompt (system + the doctor's instructions, the patient's opening
line), then policy turn, patient turn, policy turn, ... Policy turns are the tokens the policy sampled; each patient
turn is the chat template's text between an assistant turn and the next assistant header, with the reply inside
(``TurnJoiner``), tokenised on its own and appended, so the ids the learner scores are the ids the engine sampled
from (no re-rendering: Qwen3's template would drop earlier think blocks).

The final answer: a policy turn whose answer part (after ``</think>``) holds ``FINAL ANSWER:`` (``最终答案：``)
ends the consultation; the text after the marker is the answer (an option letter for MCQ cases). A dialogue that
reaches ``max_turns`` policy turns without one has no answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from medrl.consult.cases import Case
from medrl.reward.text import split_response

FINAL_MARK = {"en": "FINAL ANSWER:", "zh": "最终答案："}
_FINAL = re.compile(r"(?:FINAL\s+ANSWER|最终答案)\s*[:：]\s*(.*)", re.I | re.S)

_INSTRUCTIONS = {
    "en": ("You are a doctor in a consultation. The patient only answers what you ask. Ask one short question per "
           "turn (history, symptoms, medications, exam or test results). When you know enough, end with one line "
           "'FINAL ANSWER: <answer>'. You have at most {turns} turns.\nTask: {task}"),
    "zh": ("你是一名正在问诊的医生。患者只回答你问的问题。每轮只问一个简短的问题（病史、症状、用药、查体或检查结果）。"
           "信息足够时，以一行“最终答案：<答案>”结束。你最多有{turns}轮。\n任务：{task}"),
}


def doctor_instructions(case: Case, max_turns: int) -> str:
    """The consultation part of the system prompt: the protocol, the task and the MCQ options."""
    text = _INSTRUCTIONS[case.language].format(turns=max_turns, task=case.task)
    if case.options:
        text += "\n" + "\n".join(f"{k}. {v}" for k, v in case.options.items())
    return text


def opening_turns(case: Case, system_prompt: str | None, max_turns: int) -> list[dict]:
    """The conversation the first policy turn answers: our system prompt + the instructions, the opening line."""
    system = "\n\n".join(x for x in (system_prompt, doctor_instructions(case, max_turns)) if x)
    return [{"role": "system", "content": system}, {"role": "user", "content": case.opening}]


def whole_case_turns(case: Case, system_prompt: str | None) -> list[dict]:
    """The single-turn baseline: the same case given whole, answered at once (``FINAL ANSWER`` form too)."""
    system = "\n\n".join(x for x in (system_prompt, doctor_instructions(case, 1)) if x)
    return [{"role": "system", "content": system}, {"role": "user", "content": case.vignette}]


@dataclass(frozen=True)
class Turn:
    final: bool
    """True: the turn ends the consultation with ``answer``."""
    answer: str
    """The final answer (text after the marker), or the question to the patient (the turn's answer part)."""


def read_turn(text: str) -> Turn:
    """A decoded policy turn: the final answer, or a question (the answer part, reasoning dropped)."""
    visible = split_response(text).answer
    m = _FINAL.search(visible)
    if m:
        return Turn(True, m.group(1).strip())
    return Turn(False, visible.strip())


class TurnJoiner:
    """The template text around a patient reply, read off the tokenizer's own chat template: ``before`` closes the
    policy turn that did not end with EOS and opens the user turn, ``after`` closes it and opens the next assistant
    turn. ``ids(reply, closed)``: the token ids to append."""

    A, B = "\x01policy-turn\x01", "\x02patient-turn\x02"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": self.A},
             {"role": "user", "content": self.B}], tokenize=False, add_generation_prompt=True)
        between = text[text.index(self.A) + len(self.A):text.index(self.B)]
        self.after = text[text.index(self.B) + len(self.B):]
        eos = tokenizer.eos_token or ""
        if not between.startswith(eos):
            raise ValueError("chat template: an assistant turn does not end with the EOS token")
        self.eos_text, self.before = eos, between[len(eos):]

    def ids(self, reply: str, closed: bool) -> list[int]:
        """Tokens of the patient turn; ``closed``: the policy turn already ended with EOS (else it is added)."""
        text = ("" if closed else self.eos_text) + self.before + reply + self.after
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
