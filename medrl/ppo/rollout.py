"""The HF rollout engine: the base model + a LoRA copy, sampling with ``medrl.models.generation.generate``. It keeps
the engine contract of ``medrl.ppo.groups.RolloutGroup`` (``generate`` and ``pid``; see there).

Only LoRA tensors arrive (``load_adapter``), through the Ray object store. Every ``generate`` call also names the
adapter version it expects and carries a reference to it: an actor that Ray restarted after a crash (it comes back
with its initial adapter) reloads the right weights before redoing the call, so a retried micro-batch produces
exactly the samples the lost one would have.
"""
from __future__ import annotations

import os
import time

import ray
import torch

from medrl.models.generation import Sample, generate
from medrl.models.loading import load_policy, load_tokenizer


def engine_answer(samples: list[Sample], reloaded: bool, t0: float) -> dict:
    """The answer of an engine's ``generate`` / ``consult`` call (``RolloutGroup``'s contract; ``t0``: when sampling
    began; the log-probs came with the samples)."""
    return {"samples": samples, "reloaded": reloaded, "pid": os.getpid(), "generate_s": time.perf_counter() - t0}


class RolloutWorker:
    def __init__(self, model_cfg, init_adapter: str | None, gen_cfg):
        self.gen_cfg = gen_cfg
        self.tokenizer = load_tokenizer(model_cfg.path, model_cfg.cache_dir)
        # the same LoRA shape as the learner's (same init adapter or the same fresh config)
        self.policy = load_policy(model_cfg, init_adapter, trainable=True).eval().requires_grad_(False)
        self.version = -1

    def load_adapter(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Install the learner's LoRA tensors (the state dict of ``get_peft_model_state_dict``)."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.policy, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"adapter state has keys the rollout model lacks: {unexpected[:3]}")
        self.version = version
        return version

    def generate(self, prompts: list[tuple[int, str]], n: int, seed: int, adapter: list, version: int) -> dict:
        """``n`` responses for each ``(prompt_index, prompt_text)``; ``adapter`` is ``[ObjectRef]`` of the weights
        of ``version`` (wrapped in a list so Ray does not fetch it unless this actor lost them). Returns samples
        with the log-probs of the sampled tokens as the actor drew them (``SampledLogprobs``: no scoring pass), and
        the time taken (``generate_s``)."""
        reloaded = self._hold(adapter, version)
        t0 = time.perf_counter()
        g = self.gen_cfg
        gens = generate(self.policy, self.tokenizer, [text for _, text in prompts], max_new_tokens=g.max_new_tokens,
                        temperature=g.temperature, top_p=g.top_p, num_return_sequences=n,
                        batch_size=len(prompts), seed=seed, with_logprobs=True)
        samples = [Sample(prompts[i // n][0], i % n, x.prompt_ids, x.response_ids, x.text, x.finished, x.logprobs)
                   for i, x in enumerate(gens)]
        return engine_answer(samples, reloaded, t0)

    def _hold(self, adapter: list, version: int) -> bool:
        """Load ``version`` from ``adapter[0]`` unless the actor holds it; whether it had to."""
        reloaded = version != self.version
        if reloaded:
            self.load_adapter(ray.get(adapter[0]), version)
        return reloaded

    def pid(self) -> int:
        """This actor's process id (a restarted actor has a new one)."""
        return os.getpid()
