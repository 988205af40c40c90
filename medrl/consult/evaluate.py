"""The consultation eval (no Ray): each model answers the same ``consult.eval_limit`` cases twice, greedily, given
whole (single turn: the case's facts in one message) and interviewed (multi-turn with the simulated patient), and
the report section that shows it.

Correct: the MCQ letter of the final answer (``extract_choice``, strict) equals the label, or the final answer
matches the reference diagnosis (the verifier's deterministic matcher). Reported per model: accuracy of both modes,
answered rate, mean policy turns, patient calls per dialogue and the leak rate (dialogues ended by a reply that
named the target). Rubric scores of the dialogues are not graded here (PPO grades them through the reward plane).
"""
from __future__ import annotations

import asyncio
import gc
import json
import time
from pathlib import Path

from medrl.consult.cases import Case
from medrl.consult.dialogue import hf_turns
from medrl.consult.engine import ConsultSpec, PatientSpec, llm_patient, play
from medrl.consult.patient import ScriptedPatient
from medrl.consult.protocol import read_turn, whole_case_turns
from medrl.render import Block, Heading, Para, Pre, Table
from medrl.reward.extract import extract_choice
from medrl.reward.verifier import match_reference


def correct(case: Case, final_turn: str) -> bool:
    """Whether a final answer turn answers the case (its ``FINAL ANSWER`` part when it has one)."""
    turn = read_turn(final_turn)
    if case.options and case.label:
        return extract_choice(final_turn, case.options, "strict") == case.label
    return turn.final and bool(case.diagnosis) and match_reference(turn.answer, case.diagnosis, 0.6)


def _patient(spec: PatientSpec, budget):
    if spec.provider == "scripted":
        return ScriptedPatient()
    from medrl.reward.ledger import Ledger, local_gate

    return llm_patient(spec, local_gate(Ledger(*budget), lease_size=8))


def evaluate_model(model_cfg, adapter: Path | None, cases: list[Case], spec: ConsultSpec, max_new_tokens: int,
                   budget: tuple = (0, 0, None)) -> dict:
    """One model on ``cases``, both modes (greedy). ``budget``: (rpm, tpm, budget_usd) of an LLM patient's own
    ledger. Returns ``{"metrics", "dialogues"}``."""
    import torch

    from medrl.models.chat import render_prompt
    from medrl.models.generation import generate
    from medrl.models.loading import load_policy, load_tokenizer

    t0 = time.time()
    tok = load_tokenizer(model_cfg.path, model_cfg.cache_dir)
    model = load_policy(model_cfg, adapter).eval()
    whole = generate(model, tok, [render_prompt(tok, None, whole_case_turns(c, spec.system_prompt)) for c in cases],
                     max_new_tokens=max_new_tokens, temperature=0.0, batch_size=len(cases))
    loop = asyncio.new_event_loop()
    try:
        patient = loop.run_until_complete(_as_coroutine(_patient, spec.patient, budget))
        samples = play(hf_turns(model, tok, spec, 0), tok, list(enumerate(cases)), 1, spec, patient, loop)
        if hasattr(patient, "close"):
            loop.run_until_complete(patient.close())
    finally:
        loop.close()
    dialogues = []
    for case, single, s in zip(cases, whole, samples):
        d = s.dialogue
        dialogues.append({"case_id": case.id, "language": case.language, "single_correct": correct(case, single.text),
                          "single_response": single.text, "correct": d["status"] == "answered" and correct(
                              case, d["turns"][-1]["content"]), **d})
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    n = max(len(dialogues), 1)
    metrics = {"n": len(dialogues),
               "accuracy_single": sum(d["single_correct"] for d in dialogues) / n,
               "accuracy_interviewed": sum(d["correct"] for d in dialogues) / n,
               "answered_rate": sum(d["status"] == "answered" for d in dialogues) / n,
               "mean_turns": sum(d["policy_turns"] for d in dialogues) / n,
               "patient_calls_per_dialogue": sum(d["patient_calls"] for d in dialogues) / n,
               "leak_rate": sum(d["status"] == "leaked" for d in dialogues) / n,
               "seconds": round(time.time() - t0, 2)}
    return {"metrics": metrics, "dialogues": dialogues}


async def _as_coroutine(fn, *args):
    return fn(*args)  # built inside the loop that runs its calls


def local_patient_spec(cfg) -> PatientSpec:
    """The patient of ``cfg.consult.patient`` outside Ray (eval, demo): an LLM patient gets the judge's API key,
    store and cache settings and no coordinator (its caller gives it a local ledger)."""
    from pydantic import SecretStr

    from medrl.consult.engine import patient_spec
    from medrl.reward.preflight import judge_api_key
    from medrl.reward.store.database import store_url

    access = None
    if cfg.consult.patient.provider == "openai":
        url = store_url(cfg.reward.cache)
        access = {"coordinator": None, "api_key": SecretStr(judge_api_key(cfg.reward.judge)),
                  "store_url": SecretStr(url) if url else None, "cache": cfg.reward.cache}
    return patient_spec(cfg, access)


def run_consult_eval(cfg, models: dict[str, Path | None]) -> dict[str, dict]:
    """Every model on the first ``consult.eval_limit`` cases of ``consult.cases`` (``evaluate_model``)."""
    from medrl.consult.cases import load_all_cases

    cases = load_all_cases(cfg.consult.cases)[:cfg.consult.eval_limit]
    spec = ConsultSpec(cfg.consult.max_turns, cfg.consult.turn_tokens, 0.0, 1.0, cfg.model.system_prompt,
                       local_patient_spec(cfg))
    jc = cfg.reward.judge
    return {name: evaluate_model(cfg.model, adapter, cases, spec, cfg.eval.decoding.max_new_tokens,
                                 (jc.rpm, jc.tpm, jc.budget_usd)) for name, adapter in models.items()}


def write_dialogues(eval_dir: Path, model: str, dialogues: list[dict]) -> None:
    """``<eval>/consultation/<model>.jsonl``: one row per case (both modes, the dialogue)."""
    (eval_dir / "consultation").mkdir(parents=True, exist_ok=True)
    with open(eval_dir / "consultation" / f"{model}.jsonl", "w", encoding="utf-8") as f:
        for d in dialogues:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ report section
def consultation_section(eval_dir: Path, summary: dict, shown: int = 2) -> list[Block]:
    """The consultation table (single turn vs interviewed) and the first ``shown`` dialogues of each model."""
    per_model = summary.get("consultation") or {}
    if not per_model:
        return []
    blocks: list[Block] = [Heading("Consultation (simulated patient)")]
    cols = [("model", "model"), ("n", "cases"), ("accuracy_single", "accuracy, case given whole"),
            ("accuracy_interviewed", "accuracy, interviewed"), ("answered_rate", "answered"),
            ("mean_turns", "turns"), ("patient_calls_per_dialogue", "patient calls"), ("leak_rate", "leak rate")]
    rows = [(m, {"model": m, **{k: f"{v[k]:.3f}" if isinstance(v[k], float) else str(v[k]) for k, _ in cols[1:]}})
            for m, v in per_model.items()]
    blocks += [Table("consultation", cols, rows), Para(
        "The same cases, answered greedily: once with every fact in one message, once by interviewing a patient who "
        "only answers what is asked (docs/consultation.md). Rubric scores of dialogues are not graded in the eval.")]
    for m in per_model:
        path = eval_dir / "consultation" / f"{m}.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines()[:shown]:
            d = json.loads(line)
            text = "\n".join(f"{'doctor' if t['role'] == 'assistant' else 'patient'}: {t['content']}"
                             for t in d["turns"])
            blocks.append(Pre(text, summary=f"{m} · {d['case_id']} · {d['status']} · "
                                            f"{'correct' if d['correct'] else 'not correct'}"))
    return blocks
