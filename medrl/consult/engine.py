"""What a rollout engine needs to play consultations (pure): the per-call settings (``ConsultSpec``, picklable, the
patient's secrets as ``SecretStr``), the dialogues of a micro-batch and their ``Sample``s."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import SecretStr

from medrl.consult.cases import Case
from medrl.consult.config import ConsultConfig
from medrl.consult.dialogue import Dialogue, PolicyTurns, run_dialogues
from medrl.consult.patient import LLMPatient
from medrl.consult.protocol import opening_turns
from medrl.models.chat import render_prompt
from medrl.models.generation import Sample
from medrl.reward.config import CacheConfig, JudgeConfig, RewardConfig

if TYPE_CHECKING:
    from medrl.config import Config


@dataclass(frozen=True)
class PatientSpec:
    provider: str
    """scripted | openai"""
    leak_retries: int
    judge: JudgeConfig | None = None
    """The judge's endpoint settings with the patient's model, prices, temperature and token budget."""
    cache: CacheConfig | None = None
    api_key: SecretStr | None = None
    coordinator: str | None = None
    """Name of the reward pool's coordinator actor: the patient's calls take permits from the judge's ledger."""
    store_url: SecretStr | None = None
    prompt_version: str = ""

    @property
    def simulator(self) -> str:
        """The simulator's id in every reply's cache key."""
        if self.provider == "scripted":
            return "scripted-v1"
        return f"openai:{self.judge.model}|{self.prompt_version}|t={self.judge.temperature:g}"


def llm_patient(spec: PatientSpec, gate) -> LLMPatient:
    """The LLM patient of ``spec`` over the judge client, under ``gate`` (rate limits, budget, usage), with the
    judge store as its reply cache (call inside the event loop that will run its calls)."""
    from medrl.reward.judge import OpenAIJudge
    from medrl.reward.store.database import open_store

    judge = OpenAIJudge(spec.judge, spec.api_key.get_secret_value() if spec.api_key else "")
    store = open_store(spec.cache, url=spec.store_url.get_secret_value() if spec.store_url else None)

    async def call(messages, parse):
        outcome = await judge.call(messages, parse, gate)
        await gate.flush()  # the usage reaches the ledger at once: rollouts have no end-of-batch flush
        return outcome

    return LLMPatient(spec.simulator, store, call, spec.leak_retries, spec.cache.claim_ttl_s, close=judge.close)


def patient_judge_config(consult: ConsultConfig, reward: RewardConfig) -> JudgeConfig:
    """The patient's settings on the judge's endpoint (its own model, prices, temperature, budget of tokens)."""
    p, jc = consult.patient, reward.judge
    return jc.model_copy(update={"model": p.model or jc.model, "prices": {**jc.prices, **p.prices},
                                 "temperature": p.temperature, "max_tokens": p.max_tokens})


@dataclass(frozen=True)
class ConsultSpec:
    max_turns: int
    turn_tokens: int
    temperature: float
    top_p: float
    system_prompt: str | None
    patient: PatientSpec


def new_dialogues(tokenizer, items: list[tuple[int, Case]], n: int, spec: ConsultSpec) -> list[tuple[int, int,
                                                                                                  Dialogue]]:
    """``n`` fresh dialogues per ``(prompt_index, case)``: (prompt index, sample index, dialogue)."""
    return [(index, k, opening_dialogue(tokenizer, case, spec.system_prompt, spec.max_turns))
            for index, case in items for k in range(n)]


def opening_dialogue(tokenizer, case: Case, system_prompt: str | None, max_turns: int) -> Dialogue:
    """A fresh dialogue of ``case``: the rendered prompt (system + instructions + the patient's opening) as ids."""
    text = render_prompt(tokenizer, None, opening_turns(case, system_prompt, max_turns))
    return Dialogue(case, tokenizer(text, add_special_tokens=False)["input_ids"])


def play(turns: PolicyTurns, tokenizer, items: list[tuple[int, Case]], n: int, spec: ConsultSpec, patient, loop
         ) -> list[Sample]:
    """The micro-batch's dialogues played out with the engine's ``turns`` (``dialogue.hf_turns`` or ``vllm_turns``),
    as samples (``policy_mask`` and ``dialogue`` set; ``logprobs`` where the engine gives them: 0 on patient
    tokens)."""
    dialogues = new_dialogues(tokenizer, items, n, spec)
    run_dialogues(turns, tokenizer, [d for _, _, d in dialogues], patient, max_turns=spec.max_turns, loop=loop)
    return [Sample(index, k, d.prompt_ids, d.response_ids, d.final_text, d.finished, logprobs=d.logprobs,
                   policy_mask=d.policy_mask, dialogue=d.summary()) for index, k, d in dialogues]


def patient_spec(cfg: Config, access: dict | None) -> PatientSpec:
    """The patient of ``cfg.consult.patient``; ``access`` (openai): the reward pool's coordinator name, API key,
    store URL and cache settings (``RewardPool.patient_access``)."""
    p = cfg.consult.patient
    if p.provider == "scripted":
        return PatientSpec("scripted", p.leak_retries)
    return PatientSpec("openai", p.leak_retries, judge=patient_judge_config(cfg.consult, cfg.reward),
                       cache=access["cache"], api_key=access["api_key"], coordinator=access["coordinator"],
                       store_url=access["store_url"], prompt_version=p.prompt_version)
