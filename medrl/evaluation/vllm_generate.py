"""``eval.engine: vllm``: one vLLM engine, in one Ray task, answers for every compared model.

The base model is loaded once; the SFT and RL adapters are each registered as their own LoRA and every conversation
is answered with the shared decoding settings. The result has the shape of ``evaluate.generate_model``'s, per model.
Greedy answers equal the HF path's in float32 (``tests/test_eval_vllm_on_cpu.py``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("medrl.eval")


def answer_with_vllm(model_cfg, settings, models: dict[str, Path | None],
                     conversations: dict[str, list[list[dict]]], decoding: dict) -> dict[str, dict]:
    """{model: {"outputs": {set: [{"response", "response_tokens", "finished"}]}, "seconds"}} from one engine.
    Runs where vLLM is installed (a Ray task: see ``generate_all_vllm``)."""
    from medrl.models.chat import render_prompt
    from medrl.models.vllm_engine import VLLMEngine

    t0 = time.time()
    engine = VLLMEngine(model_cfg, settings, decoding["max_new_tokens"], keep=max(len(models), 1))
    tok = engine.tokenizer
    flat = [(s, i) for s, convs in conversations.items() for i in range(len(convs))]
    ids = [tok(render_prompt(tok, model_cfg.system_prompt, conversations[s][i]), add_special_tokens=False)["input_ids"]
           for s, i in flat]
    start_s = time.time() - t0
    out = {}
    try:
        for version, (name, adapter) in enumerate(models.items(), start=1):
            t1 = time.time()
            if adapter is not None:
                engine.load_adapter(version, directory=adapter)
            gens = engine.generate(ids, temperature=decoding["temperature"], top_p=decoding["top_p"],
                                   seed=decoding["seed"], version=version if adapter is not None else None,
                                   with_logprobs=False)
            answers: dict[str, list] = {s: [None] * len(convs) for s, convs in conversations.items()}
            for (s, i), g in zip(flat, gens):
                answers[s][i] = {"response": g.text, "response_tokens": len(g.response_ids), "finished": g.finished}
            out[name] = {"outputs": answers, "seconds": round(time.time() - t1 + start_s / len(models), 2)}
            log.info("vllm: %s answered %d questions in %.1f s", name, len(ids), time.time() - t1)
    finally:
        engine.close()
    return out


def generate_all_vllm(cfg, models: dict[str, Path | None], conversations: dict[str, list[list[dict]]],
                      decoding: dict) -> dict[str, dict]:
    """``answer_with_vllm`` in a Ray task with ``eval.actor_num_cpus`` CPUs and, on CUDA, ``actor_num_gpus`` GPUs
    (the engine's process ends with the task, so the memory comes back)."""
    import ray

    from medrl.models.loading import pick_device
    from medrl.models.vllm_engine import check_engine

    check_engine("eval", cfg.model, cfg.eval.vllm)
    gpus = cfg.eval.actor_num_gpus if pick_device(cfg.model.device) == "cuda" else 0
    task = ray.remote(num_cpus=cfg.eval.actor_num_cpus, num_gpus=gpus, max_calls=1)(answer_with_vllm)
    log.info("generating with %s on one vLLM engine", ", ".join(models))
    adapters = {name: str(a) if a is not None else None for name, a in models.items()}
    return ray.get(task.remote(cfg.model, cfg.eval.vllm, adapters, conversations, decoding))
