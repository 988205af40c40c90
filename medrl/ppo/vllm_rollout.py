"""Rollout actor on vLLM (``ppo.rollout.engine: vllm``), to the same contract as ``medrl.ppo.rollout.RolloutWorker``.

The engine holds the base model once; each adapter version the learner publishes arrives as LoRA tensors through
the Ray object store, is written into a directory on this actor's own node and loaded as its own LoRA (id = version);
older versions are unloaded. The log-probs of the sampled tokens come from the engine itself (see
``medrl.models.vllm_engine`` for what they are), so the driver's rollout-vs-learner check compares two different
implementations: a version that never reached the engine shows up as a gap.

A restarted actor (Ray re-creates it after a crash) starts a fresh engine with no adapter: the first ``generate``
naming a version it lacks loads that version from the reference it carries, then redoes the call with its seed.
"""
from __future__ import annotations

import os
import time

import ray

from medrl.models.generation import Sample
from medrl.ppo.rollout import engine_answer


class VLLMRolloutWorker:
    def __init__(self, model_cfg, init_adapter: str | None, gen_cfg, settings):
        from medrl.models.vllm_engine import VLLMEngine, adapter_config_of

        self.gen_cfg = gen_cfg
        self.adapter_config = adapter_config_of(model_cfg, init_adapter)
        self.engine = VLLMEngine(model_cfg, settings, gen_cfg.max_new_tokens, keep=1)
        self.tokenizer = self.engine.tokenizer
        self.version = -1

    def load_adapter(self, state: dict, version: int) -> int:
        """Load the learner's LoRA tensors (``get_peft_model_state_dict``) as adapter ``version``."""
        self.engine.load_adapter(version, state, self.adapter_config)
        self.version = version
        return version

    def generate(self, prompts: list[tuple[int, str]], n: int, seed: int, adapter: list, version: int) -> dict:
        """As ``RolloutWorker.generate``: ``n`` samples per ``(prompt_index, prompt_text)`` with adapter ``version``
        (``adapter`` = ``[ObjectRef]`` of its tensors, fetched only when this engine does not hold it), each with
        the engine's log-probs of its tokens."""
        reloaded = self._hold(adapter, version)
        t0 = time.perf_counter()  # a sleeping engine wakes in generate: counted as generation time
        ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in prompts]
        g = self.gen_cfg
        gens = self.engine.generate(ids, n=n, temperature=g.temperature, top_p=g.top_p, seed=seed, version=version)
        samples = [Sample(prompts[i // n][0], i % n, x.prompt_ids, x.response_ids, x.text, x.finished, x.logprobs)
                   for i, x in enumerate(gens)]
        return engine_answer(samples, reloaded, t0)

    def _hold(self, adapter: list, version: int) -> bool:
        """Load ``version`` from ``adapter[0]`` unless the engine holds it; whether it had to."""
        reloaded = version not in self.engine.loaded_versions()
        if reloaded:
            self.load_adapter(ray.get(adapter[0]), version)
        return reloaded

    def sleep(self) -> float:
        """Release the engine's GPU memory until the next ``generate`` (vLLM sleep mode); seconds taken, 0 where
        sleep is off or unsupported (CPU)."""
        return self.engine.sleep()

    def loaded_versions(self) -> list[int]:
        return self.engine.loaded_versions()

    def pid(self) -> int:
        return os.getpid()
