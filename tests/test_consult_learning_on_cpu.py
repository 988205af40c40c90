"""Consultation RL learns to ask the right question: PPO through Ray (HF engine, scripted patient) on cases whose
answer only the patient's lab report tells.

The task: eight hand-written cases, identical but for a hidden ``tests`` field (a normal report for label A, a
worrying one for label B, four of each); the opening, the task and the options are the same, so a doctor who does
not ask can do no better than chance (verifier: 1.0 the right letter, 0 a wrong one: 0.5 expected). The scripted
patient tells the report only to a question with a tests cue (``patient.FIELD_CUES``); any other question gets "I'm
not sure what you mean". A warm start (the SFT stage in miniature) teaches the format and to read the report: turn
1 asks "What tests were done?" about one time in three, else "How are you today?"; turn 2 gives ``FINAL ANSWER:
<letter>``, the report's letter after a report, A or B equally often after none. PPO must then learn which question
to ask: the reward rises only by getting the report more often (the answer is scored by the verifier's letter
extraction on the final turn, never by comparing texts). The tiny random model cannot learn to copy one letter
token out of the report in a CI-sized warm start (tried: chance level), hence reports that differ in every word."""
import asyncio
import json

import numpy as np
import pytest
import torch

from medrl.consult.cases import load_cases
from medrl.consult.patient import ScriptedPatient
from medrl.consult.protocol import TurnJoiner, opening_turns
from medrl.ppo.driver import PPOTrainer
from ppo_setup import fit_and_save, ppo_config

STEPS = 14
MAX_TURNS = 2
ASK = "What tests were done?"
"""The right question: the scripted patient's ``tests`` cue."""
CHAT = "How are you today?"
"""A question without a cue: the patient does not understand it."""
OPTIONS = {"A": "nothing serious", "B": "an infection"}
REPORTS = {"A": "Everything on my lab report was normal.", "B": "My blood count came back very high, they said."}
"""What the patient's lab report says for each label (the target's words never appear: no leak)."""


def _write_cases(path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(8):
            label = "AB"[i % 2]
            f.write(json.dumps({"id": f"lab{i}", "language": "en", "opening": "Doctor, I feel unwell.",
                                "profile": {"symptoms": "I feel unwell.", "tests": REPORTS[label]},
                                "task": "What is the most likely diagnosis?", "options": OPTIONS,
                                "label": label}) + "\n")


def warm_start_pairs(tok, case_a, case_b, system_prompt):
    """(ids, labels) of the warm start's dialogues, tokenised exactly as the rollout engine joins turns: cases differ
    only in their report, so one case of each label gives every distinct dialogue. Chatting is twice as frequent as
    asking (one dialogue per letter), so the warm start asks about one time in three."""
    from medrl.models.chat import render_prompt

    joiner, patient, out = TurnJoiner(tok), ScriptedPatient(), []

    def turn(text):
        return tok(f"<think>\nDecide.\n</think>\n\n{text}<|im_end|>", add_special_tokens=False)["input_ids"]

    for case in (case_a, case_b):
        prompt = tok(render_prompt(tok, None, opening_turns(case, system_prompt, MAX_TURNS)),
                     add_special_tokens=False)["input_ids"]
        for question, letters in ((ASK, case.label), (CHAT, "AB")):
            reply = asyncio.run(patient.reply(case, [(question, None)])).text
            first, between = turn(question), joiner.ids(reply, closed=True)
            for letter in letters:
                last = turn(f"FINAL ANSWER: {letter}")
                out.append((prompt + first + between + last, [-100] * len(prompt) + first + [-100] * len(between)
                            + last))
    return out


def warm_start(cfg, cases, path, steps=300):
    """A LoRA adapter trained on ``warm_start_pairs``; returns the last loss."""
    from medrl.models.loading import load_policy, load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(cfg.model.path, cfg.model.cache_dir)
    policy = load_policy(cfg.model, None, trainable=True, device="cpu")
    pairs = warm_start_pairs(tok, cases[0], cases[1], cfg.model.system_prompt)
    return fit_and_save(policy, tok.pad_token_id, pairs, steps, path)


def _told(row) -> bool:
    """The dialogue's patient told the lab report (the policy asked the right question)."""
    turns = row["dialogue"]["turns"]
    return len(turns) > 1 and turns[1]["content"] in REPORTS.values()


def _step_figures(run, steps):
    """Per step: the dialogues' mean reward and the share of dialogues that got the lab report."""
    rows = [json.loads(x) for x in run.ppo_samples.read_text().splitlines()]
    dialogues = [r for r in rows if "dialogue" in r]
    by_step = [[r for r in dialogues if r["step"] == s] for s in range(1, steps + 1)]
    return (dialogues, np.array([np.mean([r["reward"] for r in rs]) for rs in by_step]),
            np.array([np.mean([_told(r) for r in rs]) for rs in by_step]))


@pytest.mark.slow
def test_consultation_ppo_learns_to_ask_for_the_lab_report(tiny_model_dir, tmp_path, ray_local):
    cases_path = tmp_path / "lab_cases.jsonl"
    _write_cases(cases_path)
    cfg, run = ppo_config(tmp_path, tiny_model_dir, "ask", "reward.preset=huatuo-o1", "reward.verifier.wrong=0",
                          "consult.w_rule=0",  # a dialogue's R is its verifier score (consult.w_verifier 1)
                          "ppo.estimator=grpo", f"ppo.steps={STEPS}", "ppo.prompts_per_step=1",
                          "ppo.generation.max_new_tokens=16", "ppo.lr=0.0005", f"consult.cases=[{cases_path}]",
                          "consult.cases_per_step=4", f"consult.max_turns={MAX_TURNS}", "consult.turn_tokens=32",
                          "consult.turn_cost=0", "ppo.rollout.batch_size=4", "ppo.minibatch_size=20",
                          "ppo.micro_batch_size=10")
    cfg.model.system_prompt = ""  # a short context: the dialogues stay cheap
    _mcq_prompt(run)
    adapter = tmp_path / "ask_or_chat_adapter"
    sft_loss = warm_start(cfg, load_cases(cases_path), adapter)
    cfg.ppo.init_adapter = str(adapter)
    with PPOTrainer(cfg, run) as trainer:
        history = [trainer.step() for _ in range(STEPS)]
    dialogues, reward, asked = _step_figures(run, STEPS)
    first, last = reward[:3].mean(), reward[-3:].mean()
    trace = " ".join(f"{r:.2f}/{a:.2f}" for r, a in zip(reward, asked))
    print(f"consultation (warm-start loss {sft_loss:.3f}): reward {first:.2f} -> {last:.2f}, asked for the tests "
          f"{asked[:3].mean():.2f} -> {asked[-3:].mean():.2f} (reward/asked by step: {trace})")
    assert len(dialogues) == STEPS * 16 and all(m["dropped"] == 0 for m in history)
    assert max(m["logprob_gap"] for m in history) < 1e-4
    # the reward is the verifier's (wrong letter, no answer: 0); asking pays: the report is read
    assert {d["reward"] for d in dialogues} <= {0.0, 1.0}
    told = [d["reward"] for d in dialogues if _told(d)]
    not_told = [d["reward"] for d in dialogues if not _told(d)]
    print(f"reward of the dialogues told the report {np.mean(told):.2f} ({len(told)}), "
          f"not told {np.mean(not_told):.2f} ({len(not_told)})")
    assert np.mean(told) > np.mean(not_told) + 0.25
    assert asked[:3].mean() < 0.6, f"the warm start should ask about one time in three: {trace}"
    assert asked[-3:].mean() > asked[:3].mean() + 0.25, f"did not learn to ask: {trace}"
    assert last > first + 0.2, f"the reward did not rise: {trace}"


def _mcq_prompt(run) -> None:
    """The step's one single-turn prompt (PPO steps need one): a verifiable two-option question."""
    with open(run.data / "rl_prompts.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"id": "mcq", "prompt": "Chest pain for an hour: what now?\nA. rest\nB. see a doctor",
                            "reference": None, "risk": "high", "source": "test", "language": "en", "label": "B",
                            "options": {"A": "rest", "B": "see a doctor"}}) + "\n")
