"""Consultation rollouts on the tiny model: the policy mask checked by hand (patient tokens get no gradient, the
engine's log-probs match a fresh forward on every policy turn), and PPO through Ray with the scripted patient (HF
engine), including exact resume mid-run."""
import asyncio
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from medrl.consult.cases import load_cases
from medrl.consult.dialogue import PolicyTurn, hf_turns
from medrl.consult.engine import ConsultSpec, PatientSpec, play
from medrl.consult.patient import ScriptedPatient
from medrl.models.loading import load_policy, load_tokenizer
from medrl.ppo.objective import aggregate_loss, policy_loss
from medrl.ppo.batch import Batch
from medrl.ppo.driver import run_ppo
from medrl.runs import read_metrics
from ppo_setup import ppo_config

CASES = "data/samples/consultation/cases.jsonl"


def test_policy_mask_by_hand(tiny_model_dir, tmp_path):
    cfg, _ = ppo_config(tmp_path, tiny_model_dir, "mask")
    tok = load_tokenizer(str(tiny_model_dir), None)
    policy = load_policy(cfg.model, None, trainable=True)
    cases = load_cases(CASES)
    spec = ConsultSpec(3, 12, 1.0, 1.0, "sys", PatientSpec("scripted", 1))
    loop = asyncio.new_event_loop()
    samples = play(hf_turns(policy.eval(), tok, spec, 11), tok, [(0, cases[0]), (1, cases[4])], 2, spec,
                   ScriptedPatient(), loop)
    loop.close()
    for s in samples:
        d = s.dialogue
        assert d["status"] in ("answered", "out_of_turns") and 1 <= d["policy_turns"] <= 3
        # the mask-0 spans are exactly the patient turns, as the chat template wraps them
        spans, cur = [], []
        for t, m in zip(s.response_ids, s.policy_mask):
            if m == 0:
                cur.append(t)
            elif cur:
                spans.append(cur)
                cur = []
        replies = [t["content"] for t in d["turns"] if t["role"] == "user"]
        assert len(spans) == len(replies) == d["policy_turns"] - 1
        for span, reply in zip(spans, replies):
            text = tok.decode(span)
            assert f"<|im_start|>user\n{reply}<|im_end|>\n<|im_start|>assistant\n" in text
    assert any(s.dialogue["policy_turns"] > 1 for s in samples)
    batch = Batch.pack(samples, tok.pad_token_id)
    assert float(batch.response_mask.sum()) == sum(sum(s.policy_mask) for s in samples) < batch.response_ids.ne(
        tok.pad_token_id).sum()
    # the gradient of the PPO loss reaches the policy tokens' log-probs only
    from medrl.ppo.modeling import PolicyWithValue

    model = PolicyWithValue(policy.train())
    out = model(batch.input_ids, batch.attention_mask, batch.prompt_lens, batch.response_ids, with_values=False)
    logprobs = out["logprobs"]
    logprobs.retain_grad()
    loss, _ = policy_loss("ppo", logprobs, logprobs.detach(), torch.ones_like(logprobs), batch.response_mask,
                          clip_low=0.2, clip_high=0.2)
    aggregate_loss(loss, batch.response_mask, "token-mean", n_tokens=batch.response_mask.sum(), n_seqs=len(batch),
                   norm_len=1.0).backward()
    grad = logprobs.grad
    assert torch.all(grad[batch.response_mask == 0] == 0)
    assert torch.all(grad[batch.response_mask == 1] != 0)
    # the learner's no-grad scoring pass (logprobs_and_values) equals this forward on every policy token
    from medrl.ppo.modeling import logprobs_and_values

    fresh = logprobs_and_values(PolicyWithValue(policy.eval()), batch, 8, 1.0, with_values=False)["logprobs"]
    assert torch.allclose(fresh * batch.response_mask, logprobs.detach() * batch.response_mask, atol=1e-5)


def test_one_loop_for_both_engines_mask_and_engine_logprobs(tiny_model_dir):
    """The same policy turns give the same tokens and policy mask whether the engine brings log-probs (both engines
    when sampling) or not (greedy HF turns); the engine's log-probs run along the response, 0 on the patient's
    tokens."""
    tok = load_tokenizer(str(tiny_model_dir), None)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    script = {("consult-en-mi", 0): ("How old are you?", True), ("consult-en-mi", 1): ("FINAL ANSWER: A", False),
              ("consult-en-appendicitis", 0): ("FINAL ANSWER: C", True)}

    def scripted(with_logprobs: bool):
        def turns(dialogues, round_no):
            out = []
            for d in dialogues:
                text, closed = script[d.case.id, round_no]
                ids = tok(text, add_special_tokens=False)["input_ids"] + ([eos] if closed else [])
                lps = [-0.5 - 0.01 * k for k in range(len(ids))] if with_logprobs else None
                out.append(PolicyTurn(ids, closed, lps))
            return out
        return turns

    cases = load_cases(CASES)
    spec = ConsultSpec(3, 12, 1.0, 1.0, "sys", PatientSpec("scripted", 1))
    loop = asyncio.new_event_loop()
    runs = [play(scripted(lp), tok, [(0, cases[0]), (1, cases[1])], 1, spec, ScriptedPatient(), loop)
            for lp in (False, True)]
    loop.close()
    hf, vllm = runs
    assert [(s.response_ids, s.policy_mask, s.dialogue) for s in hf] == [(s.response_ids, s.policy_mask, s.dialogue)
                                                                         for s in vllm]
    mi, app = vllm
    assert mi.dialogue["status"] == "answered" and mi.dialogue["answer"] == "A" and mi.dialogue["policy_turns"] == 2
    q = tok("How old are you?", add_special_tokens=False)["input_ids"] + [eos]
    a = tok("FINAL ANSWER: A", add_special_tokens=False)["input_ids"]
    reply = mi.dialogue["turns"][1]["content"]
    assert mi.dialogue["turns"][1]["role"] == "user" and "58-year-old man" in reply
    joined = tok(f"\n<|im_start|>user\n{reply}<|im_end|>\n<|im_start|>assistant\n",
                 add_special_tokens=False)["input_ids"]
    assert mi.response_ids == q + joined + a and not mi.finished
    assert mi.policy_mask == [1] * len(q) + [0] * len(joined) + [1] * len(a)
    lps = [-0.5 - 0.01 * k for k in range(len(q))] + [0.0] * len(joined) + [-0.5 - 0.01 * k for k in range(len(a))]
    assert mi.logprobs == pytest.approx(lps) and hf[0].logprobs == []
    assert app.policy_mask == [1] * len(app.response_ids) and app.dialogue["policy_turns"] == 1
    assert len(app.logprobs) == len(app.response_ids)


@pytest.mark.slow
def test_consultation_ppo_through_ray_and_exact_resume(tiny_model_dir, tmp_path, ray_local):
    overrides = ("ppo.steps=4", "ppo.checkpoint.every=2", "ppo.checkpoint.keep_last=3", "ppo.prompts_per_step=2",
                 "ppo.samples_per_prompt=2", f"consult.cases=[{CASES}]", "consult.cases_per_step=2",
                 "consult.max_turns=3", "consult.turn_tokens=12", "reward.w_verifier=1", "ppo.minibatch_size=8")
    cfg, run = ppo_config(tmp_path, tiny_model_dir, "straight", *overrides)
    run_ppo(cfg, run)
    cfg2, run2 = ppo_config(tmp_path, tiny_model_dir, "resumed", *overrides)
    shutil.copytree(run.checkpoints("ppo") / "step_000002", run2.checkpoints("ppo") / "step_000002")
    run_ppo(cfg2, run2, resume="auto")

    rows = {r["step"]: r for r in read_metrics(run, "ppo")}
    assert [rows[s]["samples"] for s in (1, 2, 3, 4)] == [8] * 4  # 2 prompts + 2 cases, 2 samples each
    # the weight-sync proof holds over every policy turn of every dialogue
    assert max(r["logprob_gap"] for r in rows.values()) < 1e-4
    samples = [[json.loads(x) for x in r.ppo_samples.read_text().splitlines()] for r in (run, run2)]
    dialogues = [s for s in samples[0] if "dialogue" in s]
    assert len(dialogues) == 16 and {d["id"] for d in dialogues} <= {c.id for c in load_cases(CASES)}
    multi = [d for d in dialogues if d["dialogue"]["policy_turns"] > 1]
    assert multi and all(t["content"] for d in multi for t in d["dialogue"]["turns"] if t["role"] == "user")
    for d in dialogues:
        status = d["dialogue"]["status"]
        assert status in ("answered", "out_of_turns")
        if status == "out_of_turns":
            assert d["reward"] == 0.0 and "no_final_answer" in d["flags"]
    later = [[(s["step"], s["id"], s["response"], s.get("dialogue")) for s in rs if s["step"] > 2] for rs in samples]
    assert later[0] == later[1] and len(later[0]) == 16  # the same dialogues after the resume
    a = load_file(run.ppo_adapter / "adapter_model.safetensors")
    b = load_file(run2.ppo_adapter / "adapter_model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_consultation_eval_and_report_section(tiny_model_dir, tmp_path):
    from medrl.consult.evaluate import consultation_section, correct, evaluate_model, write_dialogues

    cfg, _ = ppo_config(tmp_path, tiny_model_dir, "eval")
    cases = load_cases(CASES)[:2] + load_cases("data/samples/consultation/osce_sample.jsonl")[:1]
    spec = ConsultSpec(2, 10, 0.0, 1.0, "sys", PatientSpec("scripted", 1))
    out = evaluate_model(cfg.model, None, cases, spec, 16)
    m, dialogues = out["metrics"], out["dialogues"]
    assert m["n"] == 3 and len(dialogues) == 3
    assert m["accuracy_interviewed"] == sum(d["correct"] for d in dialogues) / 3
    assert m["mean_turns"] == sum(d["policy_turns"] for d in dialogues) / 3 and 1 <= m["mean_turns"] <= 2
    assert m["leak_rate"] == 0.0 and m["patient_calls_per_dialogue"] == 0.0  # scripted: nothing paid
    # greedy: the same eval twice gives the same dialogues
    again = evaluate_model(cfg.model, None, cases, spec, 16)["dialogues"]
    assert [d["turns"] for d in again] == [d["turns"] for d in dialogues]
    # what counts as correct
    mi, osce = cases[0], cases[2]
    assert correct(mi, "<think>x</think>FINAL ANSWER: A") and not correct(mi, "FINAL ANSWER: B")
    assert correct(osce, "FINAL ANSWER: acute myeloid leukemia") and not correct(osce, "acute myeloid leukemia?")
    write_dialogues(tmp_path, "base", dialogues)
    blocks = consultation_section(tmp_path, {"consultation": {"base": m}})
    assert blocks[1].rows[0][1]["n"] == "3" and len(blocks) == 5  # heading, table, note, 2 dialogues
    assert blocks[3].text.startswith("doctor: ")


@pytest.mark.slow
def test_llm_patient_in_rollout_actors_replays_from_the_store(tiny_model_dir, tmp_path, ray_local, monkeypatch):
    """The LLM patient inside the rollout actor (the reward pool's ledger, the judge store): a second run of the
    same step replays every dialogue from the store without a patient call."""
    from medrl.ppo.driver import PPOTrainer
    from medrl.reward.store.database import open_store
    from medrl.testing.loopback_server import LoopbackJudge

    monkeypatch.setenv("MEDRL_TEST_JUDGE_KEY", "sk-test")
    with LoopbackJudge(latency_s=0.05) as server:
        overrides = ("ppo.steps=1", "ppo.prompts_per_step=2", "ppo.samples_per_prompt=2", f"consult.cases=[{CASES}]",
                     "consult.cases_per_step=2", "consult.max_turns=2", "consult.turn_tokens=8",
                     "reward.w_verifier=1", "reward.w_teacher=0", "reward.w_rubric=0",
                     "reward.verifier.open_ended=match", "consult.patient.provider=openai",
                     "reward.judge.provider=openai", f"reward.judge.base_url={server.base_url}",
                     "reward.judge.api_key_env=MEDRL_TEST_JUDGE_KEY", "reward.judge.max_retries=0",
                     f"reward.cache.path={tmp_path / 'shared.sqlite'}")
        dialogues = []
        for name in ("first", "again"):
            cfg, run = ppo_config(tmp_path, tiny_model_dir, name, *overrides)
            with PPOTrainer(cfg, run) as tr:
                tr.step()
                requests = tr.groups.reward_stats()["requests"]
            rows = [json.loads(x) for x in run.ppo_samples.read_text().splitlines()]
            dialogues.append(([r["dialogue"] for r in rows if "dialogue" in r], requests))
    (first, first_requests), (again, again_requests) = dialogues
    asked = sum(d["patient_calls"] for d in first)
    assert len(first) == 4 and asked == sum(d["policy_turns"] - 1 for d in first) > 0  # no leak, no retry
    assert first_requests == asked and again_requests == 0  # the patient's calls are the ledger's only calls
    assert sum(d["patient_calls"] for d in again) == 0 and sum(d["patient_cached"] for d in again) == asked
    assert [d["turns"] for d in again] == [d["turns"] for d in first]
    store = open_store(cfg.reward.cache)
    assert store._run("SELECT COUNT(*) FROM patient_replies").fetchone()[0] == asked
    store.close()
