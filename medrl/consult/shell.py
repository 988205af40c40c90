"""The Ray shell of consultation rollouts: the HF rollout engine that also plays dialogues, and the patient it
builds inside its actor (an LLM patient takes its permits from the reward pool's coordinator: one ledger of rate
limits and budget for judge and patient)."""
from __future__ import annotations

import asyncio
import time

import ray

from medrl.consult.cases import Case
from medrl.consult.engine import ConsultSpec, PatientSpec, llm_patient, play
from medrl.consult.patient import ScriptedPatient
from medrl.ppo.rollout import RolloutWorker


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


class ConsultingWorker(RolloutWorker):
    """``RolloutWorker`` (engine ``hf``) with ``consult``: the engine contract's ``generate`` for dialogues."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._patients: dict[str, object] = {}  # by simulator id

    def _patient(self, spec: PatientSpec):
        if spec.simulator not in self._patients:
            async def build():
                return make_patient(spec)
            self._patients[spec.simulator] = self._loop.run_until_complete(build())
        return self._patients[spec.simulator]

    def consult(self, items: list[tuple[int, Case]], n: int, seed: int, adapter: list, version: int,
                spec: ConsultSpec) -> dict:
        """``n`` dialogues for each ``(prompt_index, case)``; otherwise as ``generate`` (same answer; each sample
        carries ``policy_mask`` and ``dialogue``)."""
        reloaded = version != self.version
        if reloaded:
            self.load_adapter(ray.get(adapter[0]), version)
        t0 = time.perf_counter()
        samples = play(self.policy, self.tokenizer, items, n, seed, spec, self._patient(spec.patient), self._loop)
        return self._answer(samples, reloaded, t0)
