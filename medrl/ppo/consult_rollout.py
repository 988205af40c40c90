"""The Ray shell of consultation rollouts: the HF and vLLM rollout engines that also play dialogues, and the patient it
builds inside its actor (an LLM patient takes its permits from the reward pool's coordinator: one ledger of rate
limits and budget for judge and patient)."""
from __future__ import annotations

import asyncio
import time

import ray

from medrl.consult.cases import Case
from medrl.consult.dialogue import hf_turns, vllm_turns
from medrl.consult.engine import ConsultSpec, PatientSpec, llm_patient, play
from medrl.consult.patient import ScriptedPatient
from medrl.ppo.rollout import RolloutWorker, engine_answer
from medrl.ppo.vllm_rollout import VLLMRolloutWorker


def make_patient(spec: PatientSpec):
    """The patient of ``spec`` (call inside the event loop that will run its calls): an LLM patient takes its
    permits from the reward pool's coordinator."""
    if spec.provider == "scripted":
        return ScriptedPatient()
    from medrl.reward.ledger import LeasedGate

    coordinator = ray.get_actor(spec.coordinator)
    gate = LeasedGate(coordinator.lease.remote, coordinator.settle.remote, coordinator.add.remote, lease_size=8,
                      flush_every=8)
    return llm_patient(spec, gate)


class _PatientHost:
    """The patients of a rollout actor (one per simulator id) and the event loop that runs their calls."""

    def _patient(self, spec: PatientSpec):
        if not hasattr(self, "_loop"):
            self._loop = asyncio.new_event_loop()
            self._patients: dict[str, object] = {}  # by simulator id
        if spec.simulator not in self._patients:
            async def build():
                return make_patient(spec)
            self._patients[spec.simulator] = self._loop.run_until_complete(build())
        return self._patients[spec.simulator]


class ConsultingWorker(_PatientHost, RolloutWorker):
    """``RolloutWorker`` (engine ``hf``) with ``consult``: the engine contract's ``generate`` for dialogues."""

    def consult(self, items: list[tuple[int, Case]], n: int, seed: int, adapter: list, version: int,
                spec: ConsultSpec) -> dict:
        """``n`` dialogues for each ``(prompt_index, case)``; otherwise as ``generate`` (same answer; each sample
        carries ``policy_mask`` and ``dialogue``)."""
        reloaded = self._hold(adapter, version)
        t0 = time.perf_counter()
        patient = self._patient(spec.patient)
        samples = play(hf_turns(self.policy, self.tokenizer, spec, seed), self.tokenizer, items, n, spec, patient,
                       self._loop)
        return engine_answer(samples, reloaded, t0)


class VLLMConsultingWorker(_PatientHost, VLLMRolloutWorker):
    """``VLLMRolloutWorker`` (engine ``vllm``) with ``consult``: each round of a micro-batch's dialogues is one vLLM
    ``generate`` over the dialogues so far (prefix caching keeps the earlier turns), the engine's log-probs of every
    policy turn kept (0 on patient tokens)."""

    def consult(self, items: list[tuple[int, Case]], n: int, seed: int, adapter: list, version: int,
                spec: ConsultSpec) -> dict:
        """As ``ConsultingWorker.consult``."""
        reloaded = self._hold(adapter, version)
        t0 = time.perf_counter()
        patient = self._patient(spec.patient)
        samples = play(vllm_turns(self.engine, version, spec, seed), self.tokenizer, items, n, spec, patient,
                       self._loop)
        return engine_answer(samples, reloaded, t0)
