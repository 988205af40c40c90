"""Rollout engines side by side: HF ``generate`` (log-probs kept as it samples, ``SampledLogprobs``) vs vLLM (log-probs
from the engine), the same prompts, samples per prompt, response length, temperature and LoRA adapter.

Prints one table: engine start-up, generation wall time, generated tokens and tokens/s, and the max abs gap between
each engine's log-probs and the learner's recompute of the same tokens (the weight-sync proof, < 1e-4 in fp32).
On CPU with the tiny model the speed is what it is (a 0.2 M-parameter model is all overhead); the point of the CPU
run is correctness. vLLM's GPU speed cannot be measured in this workplace: see docs/ppo.md for published figures.

    .venv/bin/python bench/rollout.py                       # tiny model, 8 prompts x 4 samples x 64 tokens
    .venv/bin/python bench/rollout.py --model /models/Qwen3-1.7B --prompts 32 --samples 4 --tokens 1024
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = ["I have chest pain radiating to my left arm, what should I do?", "发烧三天了，咳嗽，需要去医院吗？",
             "How much ibuprofen can I take for a headache?", "糖尿病患者可以吃水果吗？",
             "My child swallowed a button battery, what now?", "What are common side effects of metformin?",
             "高血压应该怎么控制饮食？", "What is a normal resting heart rate for adults?"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the tiny Qwen3, built in a temp dir)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import torch
    from peft import get_peft_model_state_dict

    from medrl.config import load_config
    from medrl.models.chat import render_prompt
    from medrl.models.generation import generate
    from medrl.models.loading import load_policy, load_tokenizer
    from medrl.models.vllm_engine import VLLMEngine, adapter_config_of
    from medrl.models.generation import Sample
    from medrl.ppo.batch import Batch
    from medrl.ppo.modeling import PolicyWithValue, logprobs_and_values
    from medrl.ppo.sync_check import logprob_gaps

    model = args.model
    if model is None:
        from medrl.models.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="bench-rollout-")) / "tiny"))
    cfg = load_config(None, [f"model.path={model}", f"model.device={args.device}", "model.lora.r=16",
                             "ppo.rollout.vllm.max_model_len=" + str(2 * args.tokens + 512)])
    tok = load_tokenizer(model)
    texts = [render_prompt(tok, cfg.model.system_prompt, QUESTIONS[i % len(QUESTIONS)]) for i in range(args.prompts)]
    rows = []

    t0 = time.perf_counter()
    policy = load_policy(cfg.model, None, trainable=True).eval()
    gen = torch.Generator().manual_seed(0)
    for name, p in policy.named_parameters():  # a non-trivial adapter (a fresh LoRA is the base model)
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.02)
    hf_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    gens = generate(policy, tok, texts, max_new_tokens=args.tokens, temperature=args.temperature,
                    num_return_sequences=args.samples, batch_size=args.prompts, seed=0, with_logprobs=True)
    t1 = time.perf_counter()
    samples = [Sample(i // args.samples, i % args.samples, g.prompt_ids, g.response_ids, g.text, g.finished,
                      g.logprobs) for i, g in enumerate(gens)]
    device = next(policy.parameters()).device
    scorer = PolicyWithValue(policy)
    hbatch = Batch.pack(samples, tok.pad_token_id)
    hlearner = logprobs_and_values(scorer, hbatch, 8, args.temperature, False, device=device)["logprobs"]
    hgap = logprob_gaps(hbatch.rollout_logprobs, hlearner, hbatch.response_mask)[0]
    n_tok = sum(len(g.response_ids) for g in gens)
    rows.append(("hf generate", hf_init, t1 - t0, n_tok, hgap))

    t0 = time.perf_counter()
    engine = VLLMEngine(cfg.model, cfg.ppo.rollout.vllm, args.tokens)
    engine.load_adapter(1, {k: v.detach().cpu() for k, v in get_peft_model_state_dict(policy).items()},
                        adapter_config_of(cfg.model, None))
    vl_init = time.perf_counter() - t0
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    t0 = time.perf_counter()
    vgens = engine.generate(ids, n=args.samples, temperature=args.temperature, seed=0, version=1)
    t1 = time.perf_counter()
    vsamples = [Sample(i // args.samples, i % args.samples, g.prompt_ids, g.response_ids, g.text, g.finished,
                       g.logprobs) for i, g in enumerate(vgens)]
    batch = Batch.pack(vsamples, tok.pad_token_id)
    learner = logprobs_and_values(scorer, batch, 8, args.temperature, False, device=device)["logprobs"]
    gap = logprob_gaps(batch.rollout_logprobs, learner, batch.response_mask)[0]
    rows.append(("vllm", vl_init, t1 - t0, sum(len(g.response_ids) for g in vgens), gap))
    engine.close()

    print(f"\n{args.prompts} prompts x {args.samples} samples x <= {args.tokens} tokens, T={args.temperature}, "
          f"{cfg.model.path} ({engine.dtype}, LoRA r16)")
    print(f"{'engine':<12} {'start s':>8} {'generate s':>11} {'tokens':>7} {'tokens/s':>9} {'gap vs learner':>15}")
    for name, init, g_s, n, gap in rows:
        print(f"{name:<12} {init:8.1f} {g_s:11.2f} {n:7d} {n / g_s:9.1f} {gap:15.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
