"""Consultation rollouts, turn by turn (torch + an HF model, no Ray): every dialogue of a micro-batch takes its next
policy turn in one batched ``generate``, then the patient replies to all of them at once (``asyncio.gather``: an
LLM patient's calls run concurrently, none waits for another dialogue), then the next turn, until each dialogue
has its final answer, runs out of turns, or its patient reply failed or leaked.

A dialogue is one token sequence (``protocol``): ``prompt_ids`` (system + instructions + the opening line) and
``response_ids`` (policy turns and patient turns, joined), with ``policy_mask`` 1 on the tokens the policy sampled
and 0 on the patient's: only those are trained on and compared with the learner's log-probs.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from medrl.consult.cases import Case
from medrl.consult.patient import PatientReply
from medrl.consult.protocol import TurnJoiner, read_turn
from medrl.models.generation import eos_ids


@dataclass
class Dialogue:
    case: Case
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    policy_mask: list[int] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)
    """After the opening: ``{"role": "assistant", "content"}`` policy turns (decoded, think kept) and ``{"role":
    "user", "content"}`` patient replies."""
    qa: list[tuple[str, str | None]] = field(default_factory=list)
    """(question, reply) pairs: what the patient sees (reasoning dropped)."""
    status: str = "running"
    """answered | out_of_turns | leaked | failed | over_budget"""
    answer: str | None = None
    finished: bool = True
    """The last policy turn ended with EOS."""
    patient_calls: int = 0
    patient_cached: int = 0
    patient_cost_usd: float = 0.0

    @property
    def policy_turns(self) -> int:
        return sum(t["role"] == "assistant" for t in self.turns)

    @property
    def final_text(self) -> str:
        """The last policy turn (the final answer turn of an answered dialogue)."""
        return next((t["content"] for t in reversed(self.turns) if t["role"] == "assistant"), "")

    def summary(self) -> dict:
        """What the reward and the logs need (no token ids)."""
        return {"case_id": self.case.id, "status": self.status, "answer": self.answer, "turns": self.turns,
                "policy_turns": self.policy_turns, "patient_calls": self.patient_calls,
                "patient_cached": self.patient_cached, "patient_cost_usd": self.patient_cost_usd}


def _policy_turn(model, tokenizer, dialogues: list[Dialogue], eos: set[int], pad_id: int, turn_tokens: int,
                 temperature: float, top_p: float) -> list[tuple[list[int], bool]]:
    """One sampled turn per dialogue: its ids up to and including the first EOS, and whether it ended there."""
    seqs = [d.prompt_ids + d.response_ids for d in dialogues]
    width = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    do_sample = temperature > 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=turn_tokens, do_sample=do_sample,
                             temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                             top_k=None, pad_token_id=pad_id, eos_token_id=sorted(eos))
    turns = []
    for row in out[:, width:].tolist():
        cut = next((k for k, t in enumerate(row) if t in eos), None)
        turns.append((row[:cut + 1], True) if cut is not None else (row, False))
    return turns


async def _replies(patient, dialogues: list[Dialogue]) -> list[PatientReply]:
    return await asyncio.gather(*(patient.reply(d.case, d.qa) for d in dialogues))


def run_dialogues(model, tokenizer, dialogues: list[Dialogue], patient, *, max_turns: int, turn_tokens: int,
                  temperature: float, top_p: float, seed: int, loop: asyncio.AbstractEventLoop) -> None:
    """Play ``dialogues`` to their end in place (``loop`` runs the patient calls). Seeded: the same call gives the
    same dialogues (an LLM patient's replies come from the cache the second time)."""
    torch.manual_seed(seed)
    eos = eos_ids(model.generation_config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    joiner = TurnJoiner(tokenizer)
    active = list(dialogues)
    while active:
        for d, (ids, closed) in zip(active, _policy_turn(model, tokenizer, active, eos, pad_id, turn_tokens,
                                                         temperature, top_p)):
            take_policy_turn(d, ids, tokenizer.decode(ids, skip_special_tokens=True), closed, max_turns)
        asking = [d for d in active if d.status == "running"]
        for d, reply in zip(asking, loop.run_until_complete(_replies(patient, asking)) if asking else []):
            take_patient_reply(d, reply, joiner)
        active = [d for d in active if d.status == "running"]


def take_policy_turn(d: Dialogue, ids: list[int], text: str, closed: bool, max_turns: int) -> None:
    """Add a sampled policy turn (``ids``, decoded ``text``; ``closed``: it ended with EOS) to ``d``: the final
    answer ends it, the last allowed turn without one runs it out of turns, otherwise it is the next question."""
    d.response_ids += ids
    d.policy_mask += [1] * len(ids)
    d.turns.append({"role": "assistant", "content": text})
    d.finished = closed
    turn = read_turn(text)
    if turn.final:
        d.status, d.answer = "answered", turn.answer
    elif d.policy_turns >= max_turns:
        d.status = "out_of_turns"
    else:
        d.qa.append((turn.answer, None))


def take_patient_reply(d: Dialogue, reply: PatientReply, joiner: TurnJoiner) -> None:
    """Add the patient's reply to the last question of ``d`` (a failed, leaked or over-budget reply ends it)."""
    d.patient_calls += reply.calls
    d.patient_cached += reply.status == "cached"
    d.patient_cost_usd += reply.cost_usd
    if reply.status not in ("ok", "cached"):
        d.status = reply.status
        return
    d.qa[-1] = (d.qa[-1][0], reply.text)
    d.turns.append({"role": "user", "content": reply.text})
    ids = joiner.ids(reply.text, d.finished)
    d.response_ids += ids
    d.policy_mask += [0] * len(ids)
