"""Config of the ``eval`` and ``report`` stages (owned by medrl.evaluation).

Every compared model (base, SFT adapter, RL adapter) is decoded with the SAME ``decoding`` settings, so the
differences in the eval table come from the weights alone.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from medrl.config_base import StrictModel
from medrl.models.engine_config import EngineName, VLLMSettings

EvalSet = str
"""``test``, ``gold``, ``redteam`` or the name of a benchmark source (``data.catalog.<name>.role: benchmark``, e.g.
``pubmedqa``, ``medqa``, ``cmexam``): read from ``<run>/data/<name>.jsonl``."""
ModelName = Literal["base", "sft", "rl"]
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SPLIT_SETS = ("test", "gold", "redteam", "dev")
"""Eval sets cut from the prepared pool; every other set is a benchmark source."""

MCQ_TEMPLATE_EN = ("{question}\n\nThink it through step by step, then end your answer with \"The answer is X\", where X "
                   "is the letter of the correct option.")
MCQ_TEMPLATE_ZH = "{question}\n\n请逐步思考，最后以“答案是X”结尾，X 为正确选项的字母。"


class McqPrompt(StrictModel):
    """How a multiple-choice item (one with options) is put to every model, as published harnesses do: the question
    with its lettered options, then a request for the letter after the reasoning. ``{question}`` is replaced."""

    enabled: bool = True
    """False: multiple-choice items are put as the bare question (no options request, no answer format)."""
    en: str = MCQ_TEMPLATE_EN
    """Template for English items; ``{question}`` holds the question with its lettered options."""
    zh: str = MCQ_TEMPLATE_ZH
    """Template for Chinese items; ``{question}`` holds the question with its lettered options."""

    @model_validator(mode="after")
    def _has_question(self) -> "McqPrompt":
        for lang in ("en", "zh"):
            if "{question}" not in getattr(self, lang):
                raise ValueError(f"eval.mcq_prompt.{lang} must contain {{question}}")
        return self

    def render(self, item: dict) -> str:
        """The prompt of an eval item: the template for MCQ items (when enabled), else the question itself."""
        if not self.enabled or not item.get("options"):
            return item["question"]
        template = self.zh if item.get("language") == "zh" else self.en
        return template.replace("{question}", item["question"])


class DecodingSettings(StrictModel):
    """Decoding shared by every model under evaluation."""

    max_new_tokens: int = Field(1024, ge=1)
    """Room for the ``<think>`` block and the answer; a response cut here counts as unfinished (no final answer)."""
    temperature: float = Field(0.0, ge=0)
    """0 = greedy (deterministic, the default for comparisons); > 0 samples with ``top_p``."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling when ``temperature`` > 0 (ignored by greedy decoding)."""
    batch_size: int = Field(8, ge=1)
    """Prompts per ``generate`` call (left padded)."""
    seed: int = 1234
    """Sampling seed (used when ``temperature`` > 0; set before each model so all models see the same stream)."""


class PairwiseSettings(StrictModel):
    """Head-to-head judging: for each pair (a, b) and each prompt the judge sees both answers twice, once with a
    shown first and once with b shown first; the two verdicts are averaged, which cancels position bias."""

    enabled: bool = True
    """False: no pairwise judging (no judge calls for it)."""
    pairs: list[tuple[ModelName, ModelName]] = [("rl", "sft"), ("sft", "base")]
    """(challenger, baseline) pairs; a pair is skipped when either model was not evaluated."""
    sets: list[EvalSet] = ["test", "gold", "redteam"]
    """Sets judged pairwise (benchmarks are scored by accuracy instead)."""
    limit: int | None = Field(100, ge=1)
    """At most this many prompts per set and pair (the first ones of the evaluated items); None = all."""

    @model_validator(mode="after")
    def _distinct(self) -> "PairwiseSettings":
        for a, b in self.pairs:
            if a == b:
                raise ValueError(f"pair ({a}, {b}) compares a model with itself")
        return self


class EvalConfig(StrictModel):
    sets: list[EvalSet] = ["test", "gold", "redteam", "pubmedqa"]
    """Eval sets, read from ``<run>/data/<set>.jsonl`` (written by ``medrl prepare``): test, gold, redteam and any
    benchmark source by name (``pubmedqa``, ``medqa``, ``cmexam`` ... as named in ``data.catalog``). Items that carry
    ``rubrics`` (a HealthBench-layout source) are graded criterion by criterion and get HealthBench-style scores
    (``docs/eval.md``)."""
    mcq_prompt: McqPrompt = McqPrompt()
    """How multiple-choice items are put to the models."""
    models: list[ModelName] = ["base", "sft", "rl"]
    """Models to compare: base = ``model.path``; sft = ``<run>/sft/adapter``; rl = ``<run>/ppo/adapter``. A model
    whose adapter does not exist yet is skipped with a warning (``medrl eval --models`` makes it an error)."""
    limit: int | None = Field(200, ge=1)
    """Items per test / gold / red-team / dev set; None = all. A limited set takes items in turn from each red-team category (or data source),
    the first ones of each in file order (deterministic), so every category is covered."""
    benchmark_limit: int | None = Field(None, ge=1)
    """Items per benchmark set (any set but test, gold, redteam, dev); None = every item, as published figures use."""
    set_limits: dict[EvalSet, Annotated[int, Field(ge=1)] | None] = {"redteam": None}
    """Per-set overrides of ``limit`` / ``benchmark_limit`` (default: the whole red-team set, it is small and
    matters most)."""
    decoding: DecodingSettings = DecodingSettings()
    """Decoding shared by every evaluated model."""
    pairwise: PairwiseSettings = PairwiseSettings()
    """Head-to-head judging of model pairs."""
    engine: EngineName = "hf"
    """``hf``: transformers ``generate`` (one model loaded at a time, or one Ray actor per model with ``use_ray``).
    ``vllm``: one vLLM engine in a Ray actor holds the base model once and answers for every model, each adapter
    as its own LoRA (greedy answers equal ``hf``'s in float32)."""
    vllm: VLLMSettings = VLLMSettings(gpu_memory_utilization=0.85, sleep=False)
    """Engine settings when ``engine`` is ``vllm`` (the actor uses ``actor_num_cpus`` / ``actor_num_gpus``)."""
    use_ray: bool = False
    """Generate in Ray actors, one per model, all models at once (worth it with one GPU per model, or on a
    cluster); False generates in this process, one model after the other (best on a single GPU or CPU)."""
    actor_num_gpus: float = 1.0
    """GPUs per generation actor when ``use_ray`` (0 on CPU-only machines; a fraction lets models share a GPU)."""
    actor_num_cpus: float = 1.0
    """CPUs per generation actor when ``use_ray``."""
    examples_per_set: int = 3
    """Side-by-side generations (base / SFT / RL) shown per set in the report."""

    @model_validator(mode="after")
    def _set_names(self) -> "EvalConfig":
        for name in [*self.sets, *self.pairwise.sets, *self.set_limits]:
            if not SET_NAME.fullmatch(name):
                raise ValueError(f"eval set name {name!r} is not a file name (letters, digits, '_', '-', '.')")
        return self

    def limit_for(self, eval_set: str) -> int | None:
        if eval_set in self.set_limits:
            return self.set_limits[eval_set]
        return self.limit if eval_set in SPLIT_SETS else self.benchmark_limit
