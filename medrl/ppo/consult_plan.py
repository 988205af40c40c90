"""Consultation prompts in a PPO step (no Ray import): which cases a step interviews, their rollout micro-batches
and seeds, what the reward plane gets for a dialogue and what the step's results become (``reward.adjust``).

A step interviews ``consult.cases_per_step`` cases, ``ppo.samples_per_prompt`` dialogues each, next to its
single-turn prompts: the cases come after the prompts in the step's ``records`` (prompt indices continue), their
micro-batches after the prompts' (chunk indices continue: the same actor and seed for the same chunk after a
resume). The case order is an endless seeded shuffle by step (``prompts_at``), so a resumed run interviews the same
cases with the same seeds, and an LLM patient's replies come from the judge store.
"""
from __future__ import annotations

from medrl.config import Config
from medrl.consult.cases import Case, load_all_cases
from medrl.consult.engine import ConsultSpec, patient_spec
from medrl.consult.reward import adjust, reward_input
from medrl.models.generation import Sample
from medrl.ppo.batch import prompts_at
from medrl.reward.types import RewardInput, RewardResult


class ConsultPlan:
    def __init__(self, cfg: Config, access: dict | None):
        self.cfg, self.consult = cfg, cfg.consult
        self.cases = load_all_cases(self.consult.cases)
        self.rows = [{"id": c.id, "prompt": c.opening, "case": c} for c in self.cases]
        g = cfg.ppo.generation
        self.spec = ConsultSpec(self.consult.max_turns, self.consult.turn_tokens, g.temperature, g.top_p,
                                cfg.model.system_prompt, patient_spec(cfg, access))

    def records(self, step_no: int) -> list[dict]:
        """The cases step ``step_no`` interviews (a function of the step alone: exact resume)."""
        k = self.consult.cases_per_step
        return prompts_at(self.rows, (step_no - 1) * k, k, self.cfg.run.seed + 1)

    def micro_batches(self, records: list[dict], first_index: int, first_chunk: int, step_no: int
                      ) -> tuple[list[list[tuple[int, Case]]], list[int]]:
        """``(prompt index, case)`` micro-batches of ``ppo.rollout.batch_size`` and their seeds (chunk ``c`` of the
        step, counted after the prompts' chunks)."""
        size, seed = self.cfg.ppo.rollout.batch_size, self.cfg.run.seed
        indexed = [(first_index + i, r["case"]) for i, r in enumerate(records)]
        chunks = [indexed[s:s + size] for s in range(0, len(indexed), size)]
        return chunks, [(seed * 1_000_003 + step_no * 1_009 + first_chunk + c) % 2**31 for c in range(len(chunks))]

    def reward_input(self, record: dict, step_no: int, sample: Sample) -> RewardInput:
        return reward_input(record["case"], f"{record['id']}:{step_no}:{sample.sample_index}", sample.dialogue,
                            self.cfg.model.system_prompt, self.consult)

    def adjust(self, results: list[RewardResult], samples: list[Sample]) -> list[RewardResult]:
        """The step's results with each dialogue's consultation parts applied (others unchanged)."""
        rules = self.cfg.reward.rules
        return [adjust(r, s.dialogue, self.consult, rules) if s.dialogue is not None else r
                for r, s in zip(results, samples)]

