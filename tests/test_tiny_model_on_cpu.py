import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medrl.errors import UsageError
from medrl.models.loading import download_model, load_causal_lm, load_tokenizer, resolve_model_path
from medrl.models.tiny import TinySpec, build_tiny_model


def test_build_save_reload_same_logits(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    again = load_causal_lm(str(tiny_model_dir), dtype="float32", device="cpu").eval()
    ids = tok(["胸痛伴出汗，怎么办？ chest pain"], return_tensors="pt")
    with torch.no_grad():
        a, b = model(**ids).logits, again(**ids).logits
    assert torch.equal(a, b)
    assert model.config.model_type == "qwen3" and model.config.tie_word_embeddings


def test_seeded_build_is_deterministic(tmp_path, tiny_model_dir):
    other = build_tiny_model(tmp_path / "again", TinySpec(seed=0))
    m1 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    m2 = AutoModelForCausalLM.from_pretrained(other)
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    m3 = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "seed1", TinySpec(seed=1)))
    assert not torch.equal(m1.model.embed_tokens.weight, m3.model.embed_tokens.weight)


def test_chat_template_with_think_and_special_tokens(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    msgs = [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "胸痛怎么办？"},
            {"role": "assistant", "content": "<think>\nMay be ACS.\n</think>\n\nCall 120 now."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nBe safe.<|im_end|>\n<|im_start|>user\n胸痛怎么办？<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\nMay be ACS.\n</think>\n\nCall 120 now.<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    no_think = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == special
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    # think tags survive skip_special_tokens (they are added, not special, tokens, as in Qwen3)
    assert "<think>" in tok.decode(ids, skip_special_tokens=True)


def test_generate_stops_at_im_end(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), device="cpu")
    enc = tok(["hello"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] <= enc["input_ids"].shape[1] + 8
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id


def test_resolve_model_path_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UsageError, match=r"run `medrl download-model Qwen/Qwen3-1.7B` or set model.path"):
        resolve_model_path("Qwen/Qwen3-1.7B")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="has no config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_cached_snapshot_is_found_without_network(tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    target = tmp_path / "models" / "Qwen" / "Qwen3-1.7B"
    shutil.copytree(tiny_model_dir, target)
    assert resolve_model_path("Qwen/Qwen3-1.7B") == target
    assert download_model("Qwen/Qwen3-1.7B") == target


def test_download_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.time()
    with pytest.raises(UsageError, match="cannot reach the model hub .* set model.path"):
        download_model("Qwen/Qwen3-1.7B")
    assert time.time() - t0 < 5


def test_generation_and_policy_helpers(tiny_model_dir, tmp_path):
    from medrl.config import ModelConfig
    from medrl.models.chat import render_prompt
    from medrl.models.generation import generate
    from medrl.models.loading import load_policy

    mcfg = ModelConfig(path=str(tiny_model_dir), device="cpu", dtype="float32")
    tok = load_tokenizer(mcfg.path)
    prompts = [render_prompt(tok, "Be safe.", q) for q in ("胸痛怎么办？", "What is a normal blood pressure?")]
    assert prompts[0].startswith("<|im_start|>system\nBe safe.<|im_end|>") and prompts[0].endswith("assistant\n")
    policy = load_policy(mcfg, trainable=True)
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) > 0
    gens = generate(policy, tok, prompts, max_new_tokens=12, temperature=1.0, num_return_sequences=2, seed=0)
    assert [g.prompt for g in gens] == [prompts[0], prompts[0], prompts[1], prompts[1]]
    for g in gens:
        assert 1 <= len(g.response_ids) <= 12
        assert g.finished == (g.response_ids[-1] in (tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id))
        assert g.prompt_ids == tok(g.prompt, add_special_tokens=False)["input_ids"]
    again = generate(policy, tok, prompts, max_new_tokens=12, temperature=1.0, num_return_sequences=2, seed=0)
    assert [g.response_ids for g in again] == [g.response_ids for g in gens]
    policy.save_pretrained(tmp_path / "adapter")
    reloaded = load_policy(mcfg, adapter=tmp_path / "adapter")
    ids = torch.tensor([gens[0].prompt_ids])
    with torch.no_grad():
        assert torch.allclose(policy(input_ids=ids).logits, reloaded(input_ids=ids).logits)
        with reloaded.disable_adapter():
            base_logits = reloaded(input_ids=ids).logits
    assert base_logits.shape == policy(input_ids=ids).logits.shape


def test_sampled_logprobs_are_the_learners_without_a_second_pass(tiny_model_dir):
    """``generate(with_logprobs=True)`` keeps each sampled token's log-prob as the sampler saw it (temperature-scaled
    scores before the top-p cut): the same tokens as without it, and the learner's full-forward log-probs of them to
    float32 rounding (the KV-cached steps sum in another order), which is what the weight-sync check compares."""
    from medrl.config import ModelConfig
    from medrl.models.generation import Sample, generate
    from medrl.models.loading import load_policy
    from medrl.ppo.batch import Batch
    from medrl.ppo.modeling import PolicyWithValue, logprobs_and_values

    mcfg = ModelConfig(path=str(tiny_model_dir), device="cpu", dtype="float32")
    tok = load_tokenizer(mcfg.path)
    policy = load_policy(mcfg, trainable=True).eval()
    prompts = ["hello there, doctor", "a longer prompt about chest pain and a fever since this morning"]
    kw = dict(max_new_tokens=16, temperature=0.7, top_p=0.9, num_return_sequences=2, batch_size=2, seed=4)
    plain = generate(policy, tok, prompts, **kw)
    gens = generate(policy, tok, prompts, with_logprobs=True, **kw)
    assert [g.response_ids for g in gens] == [g.response_ids for g in plain] and all(not g.logprobs for g in plain)
    assert [len(g.logprobs) for g in gens] == [len(g.response_ids) for g in gens]
    batch = Batch.pack([Sample(i // 2, i % 2, g.prompt_ids, g.response_ids, g.text, g.finished, g.logprobs)
                        for i, g in enumerate(gens)], tok.pad_token_id)
    learner = logprobs_and_values(PolicyWithValue(policy), batch, 4, 0.7, with_values=False)["logprobs"]
    gap = (learner - batch.rollout_logprobs).abs() * batch.response_mask
    assert float(gap.max()) < 1e-5 and float((learner * batch.response_mask).sum()) < -1.0
