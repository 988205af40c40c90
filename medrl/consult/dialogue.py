"""Consultation rollouts, turn by turn (no Ray): every dialogue of a micro-batch takes its next policy turn in one
batched engine call (``hf_turns``: HF ``generate``; ``vllm_turns``: one vLLM ``generate`` over the dialogues so far,
prefix caching keeping the earlier turns), then the patient replies to all of them at once (``asyncio.gather``: an
LLM patient's calls run concurrently, none waits for another dialogue), then the next turn, until each dialogue
has its final answer, runs out of turns, or its patient reply failed or leaked. Both engines share the loop
(``run_dialogues``); they differ only in the ``PolicyTurns`` function.

A dialogue is one token sequence (``protocol``): ``prompt_ids`` (system + instructions + the opening line) and
``response_ids`` (policy turns and patient turns, joined), with ``policy_mask`` 1 on the tokens the policy sampled
and 0 on the patient's: only those are trained on and compared with the learner's log-probs (vLLM's own log-probs
of the policy turns ride along as ``logprobs``, from either engine, as it sampled them).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from transformers import LogitsProcessorList

from medrl.consult.cases import Case
from medrl.consult.patient import PatientReply
from medrl.consult.protocol import TurnJoiner, read_turn
from medrl.models.generation import SampledLogprobs, eos_ids

if TYPE_CHECKING:
    from medrl.consult.engine import ConsultSpec


@dataclass
class Dialogue:
    case: Case
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    policy_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    """The engine's log-probs along ``response_ids`` (0 on patient tokens); empty where the engine gives none (HF)."""
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


@dataclass(frozen=True)
class PolicyTurn:
    ids: list[int]
    """The sampled ids up to and including the first EOS."""
    closed: bool
    """The turn ended with EOS (not at the token budget)."""
    logprobs: list[float] | None = None
    """The engine's log-probs of ``ids`` as it sampled them (None: greedy HF turns, which keep none)."""


PolicyTurns = Callable[[list[Dialogue], int], list[PolicyTurn]]
"""An engine's next policy turn for each of these dialogues (``round`` counts from 0): the one thing the HF and the
vLLM rollouts differ in; ``run_dialogues`` is the same loop for both."""


def hf_turns(model, tokenizer, spec: ConsultSpec, seed: int) -> PolicyTurns:
    """Policy turns from HF ``generate`` (``spec``'s turn budget, temperature, top-p): every dialogue of the round in
    one left-padded batch (seeded here: the same call gives the same dialogues), each turn with its log-probs as
    sampled (``SampledLogprobs``)."""
    torch.manual_seed(seed)
    turn_tokens, temperature, top_p = spec.turn_tokens, spec.temperature, spec.top_p
    eos = eos_ids(model.generation_config, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    device = next(model.parameters()).device
    do_sample = temperature > 0

    def turns(dialogues: list[Dialogue], round_no: int) -> list[PolicyTurn]:
        seqs = [d.prompt_ids + d.response_ids for d in dialogues]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
        attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        scorer = SampledLogprobs(temperature) if do_sample else None
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=turn_tokens, do_sample=do_sample,
                                 temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                                 top_k=None, pad_token_id=pad_id, eos_token_id=sorted(eos),
                                 logits_processor=LogitsProcessorList([scorer] if scorer else []))
        logprobs = scorer.finish(out) if scorer else [None] * len(out)
        result = []
        for row, lps in zip(out[:, width:].tolist(), logprobs):
            cut = next((k for k, t in enumerate(row) if t in eos), None)
            n = len(row) if cut is None else cut + 1
            result.append(PolicyTurn(row[:n], cut is not None, None if lps is None else lps[:n]))
        return result

    return turns


def vllm_turns(engine, version: int, spec: ConsultSpec, seed: int) -> PolicyTurns:
    """Policy turns (``spec``'s turn budget, temperature, top-p) from a ``medrl.models.vllm_engine.VLLMEngine`` with
    LoRA ``version``: every dialogue of the round in one ``generate`` call (the dialogue so far as token ids; the
    engine's prefix cache holds the earlier turns), each turn with the engine's log-probs of its tokens. Round ``r``
    samples with its own seed derived from ``seed``."""
    def turns(dialogues: list[Dialogue], round_no: int) -> list[PolicyTurn]:
        gens = engine.generate([d.prompt_ids + d.response_ids for d in dialogues], n=1, temperature=spec.temperature,
                               top_p=spec.top_p, seed=(seed + round_no * 1_000_033) % 2**31, version=version,
                               max_new_tokens=spec.turn_tokens)
        return [PolicyTurn(g.response_ids, g.finished, g.logprobs) for g in gens]

    return turns


async def _replies(patient, dialogues: list[Dialogue]) -> list[PatientReply]:
    return await asyncio.gather(*(patient.reply(d.case, d.qa) for d in dialogues))


def run_dialogues(turns: PolicyTurns, tokenizer, dialogues: list[Dialogue], patient, *, max_turns: int,
                  loop: asyncio.AbstractEventLoop) -> None:
    """Play ``dialogues`` to their end in place: ``turns`` samples the policy turns, ``loop`` runs the patient calls.
    A seeded ``turns`` gives the same dialogues for the same call (an LLM patient's replies come from the cache the
    second time). With engine log-probs, ``Dialogue.logprobs`` runs along ``response_ids`` (0 on patient tokens)."""
    joiner = TurnJoiner(tokenizer)
    active = list(dialogues)
    round_no = 0
    while active:
        for d, turn in zip(active, turns(active, round_no)):
            take_policy_turn(d, turn.ids, tokenizer.decode(turn.ids, skip_special_tokens=True), turn.closed,
                             max_turns, turn.logprobs)
        asking = [d for d in active if d.status == "running"]
        for d, reply in zip(asking, loop.run_until_complete(_replies(patient, asking)) if asking else []):
            take_patient_reply(d, reply, joiner)
        active = [d for d in active if d.status == "running"]
        round_no += 1


def take_policy_turn(d: Dialogue, ids: list[int], text: str, closed: bool, max_turns: int,
                     logprobs: list[float] | None = None) -> None:
    """Add a sampled policy turn (``ids``, decoded ``text``; ``closed``: it ended with EOS; the engine's
    ``logprobs`` of ``ids`` where it gives them) to ``d``: the final answer ends it, the last allowed turn without one
    runs it out of turns, otherwise it is the next question."""
    d.response_ids += ids
    d.policy_mask += [1] * len(ids)
    if logprobs is not None:
        d.logprobs += logprobs
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
    """Add the patient's reply to the last question of ``d`` (a failed, leaked or over-budget reply ends it; engine
    log-probs, where kept, are 0 on the patient's tokens)."""
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
    if d.logprobs:
        d.logprobs += [0.0] * len(ids)
