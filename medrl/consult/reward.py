"""The reward of a consultation (pure): the reward plane scores the final answer turn with the dialogue as its
conversation (``reward_input``: the verifier checks the answer against the case's label or diagnosis, the rubric
grader grades the case's consultation rubric on the whole dialogue, rules the final turn), then ``adjust`` applies
what only a dialogue has:

* every policy turn passes the safety rules: dangerous instructions or a prompt injection in any turn -> R = 0;
* a dialogue without a final answer (out of turns) -> R = ``consult.no_answer_reward``;
* a dialogue whose patient leaked the target, failed or ran over the budget leaves the batch (``dropped``);
* ``consult.turn_cost`` per policy turn after the first is subtracted (R stays >= 0).
"""
from __future__ import annotations

import dataclasses

from medrl.consult.cases import Case
from medrl.consult.config import ConsultConfig
from medrl.consult.protocol import opening_turns
from medrl.reward.config import RulesConfig
from medrl.reward.rules import detect_injection, safety_rule
from medrl.reward.text import split_response
from medrl.reward.types import RewardInput, RewardResult, Weights


def reward_input(case: Case, item_id: str, dialogue: dict, system_prompt: str | None, cfg: ConsultConfig
                 ) -> RewardInput:
    """The final answer turn as the response, the dialogue before it (the policy's view) as its conversation,
    weighted by ``consult.w_*`` (no teacher part)."""
    max_turns = cfg.max_turns
    turns = opening_turns(case, system_prompt, max_turns) + [dict(t) for t in dialogue["turns"][:-1]]
    final = dialogue["turns"][-1]["content"] if dialogue["turns"] else ""
    return RewardInput(id=item_id, prompt=turns[-1]["content"], response=final, reference=case.diagnosis,
                       language=case.language, label=case.label, options=case.options,  # type: ignore[arg-type]
                       messages=tuple(turns), rubrics=case.rubrics,
                       weights=Weights(rule=cfg.w_rule, teacher=0.0, verifier=cfg.w_verifier, rubric=cfg.w_rubric))


def unsafe_turn(dialogue: dict, rules: RulesConfig) -> str | None:
    """The first policy turn with dangerous instructions or an injection aimed at the grader, as a reason."""
    for n, turn in enumerate(t for t in dialogue["turns"] if t["role"] == "assistant"):
        injected = detect_injection(turn["content"])
        if injected:
            return f"turn {n + 1}: prompt injection {injected!r}"
        score, flags = safety_rule(split_response(turn["content"]).answer, "low", None, rules.safety)
        if "dangerous_content" in flags:
            return f"turn {n + 1}: {score.reason}"
    return None


def adjust(result: RewardResult, dialogue: dict, cfg: ConsultConfig, rules: RulesConfig) -> RewardResult:
    """The consultation's R from the reward plane's result of its final turn (see the module doc)."""
    components = dict(result.components, **{"consult.turns": float(dialogue["policy_turns"]),
                                             "consult.answered": float(dialogue["status"] == "answered")})
    reasons, flags = dict(result.reasons), list(result.flags)
    reward, dropped = result.reward, result.dropped
    status = dialogue["status"]
    if status in ("leaked", "failed", "over_budget"):
        dropped = True
        flags.append(f"patient_{status}")
        reasons["consult"] = f"patient reply {status}: sample dropped"
    elif status != "answered":
        reward = cfg.no_answer_reward
        flags.append("no_final_answer")
        reasons["consult"] = f"no final answer in {dialogue['policy_turns']} turns"
    else:
        cost = cfg.turn_cost * max(dialogue["policy_turns"] - 1, 0)
        components["consult.turn_cost"] = cost
        reward = max(reward - cost, 0.0)
    unsafe = unsafe_turn(dialogue, rules)
    if unsafe is not None:
        reward = 0.0
        flags.append("unsafe_turn")
        reasons["consult_safety"] = unsafe
    return dataclasses.replace(result, reward=reward, components=components, reasons=reasons, flags=flags,
                               dropped=dropped)
