"""Config of the reward plane (owned by medrl.reward): rule weights and parameters, the teacher judge, the rubric
grader, the pool.

Defaults suit Qwen3-1.7B answers judged by DeepSeek (``docs/reward.md``, ``docs/reward_rules.md``).
R = w_rule * Rule + w_teacher * Teacher (+ w_verifier * Verifier, a ground-truth check, + w_rubric * Rubric, the
rubric item score) over the parts present; when no other part has a score (judge off, failed, over budget) R = Rule
(see ``RewardConfig.mix``).
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from medrl.config_base import StrictModel
from medrl.reward.types import RewardInput, Weights

RUBRIC_VERSION = "medrl-rubric-v1"
"""Version of the judge prompt in ``medrl/reward/rubric.py``; part of every cache key (bump it with the text)."""


RUBRIC_GRADER_VERSION = "medrl-rubric-grader-v1"
"""Version of the rubric grader prompts in ``medrl/reward/criteria.py``; part of every criterion's cache key."""


class FormatRule(StrictModel):
    weight: float = Field(0.2, ge=0)
    """Share of the rule score."""
    no_think_score: float = Field(0.5, ge=0, le=1)
    """Score of a non-empty answer with no (or an empty) ``<think>`` block; one block then an answer scores 1."""


class LengthRule(StrictModel):
    weight: float = Field(0.1, ge=0)
    """Share of the rule score."""
    min_tokens: int = Field(16, ge=1)
    """Final answers shorter than this score ``tokens / min_tokens``."""
    max_tokens: int = Field(512, ge=1)
    """Final answers longer than this score ``1 - (tokens - max_tokens) / max_tokens`` (0 at twice the window)."""


class KeywordRule(StrictModel):
    weight: float = Field(0.4, ge=0)
    """Share of the rule score; the rule is left out (weights renormalised) when a sample has no reference."""
    max_terms: int = Field(32, ge=1)
    """At most this many key terms (first occurrences) are taken from the reference."""
    min_list_run: int = Field(8, ge=2)
    """Keyword lists do not count: a run of at least this many content words (and more than the reference's
    longest) with no function word or sentence punctuation in it is a dump of terms, and its terms are not
    covered (the offline judge ignores it too)."""


class SafetyRule(StrictModel):
    weight: float = Field(0.3, ge=0)
    """Share of the rule score."""
    over_refusal_score: float = Field(0.5, ge=0, le=1)
    """Score of a refusal where an answer was expected (low/medium risk, or expected_behavior answer_safely)."""
    triage_only_score: float = Field(0.5, ge=0, le=1)
    """Score of a referral to care without an explicit refusal where a refusal was expected."""


class RulesConfig(StrictModel):
    format: FormatRule = FormatRule()
    """One ``<think>`` block followed by a non-empty answer."""
    length: LengthRule = LengthRule()
    """The final answer's length within a window of tokens."""
    keywords: KeywordRule = KeywordRule()
    """Coverage of the reference's key terms."""
    safety: SafetyRule = SafetyRule()
    """Refusal / triage / answer as the prompt's risk expects, and no dangerous instructions."""


class DimensionWeights(StrictModel):
    """Teacher = sum(weight * dimension / 10) over the judge's four 0-10 integers."""

    accuracy: float = Field(0.4, ge=0)
    """Weight of medical correctness."""
    safety: float = Field(0.3, ge=0)
    """Weight of safety (no harmful advice, escalation when needed)."""
    completeness: float = Field(0.2, ge=0)
    """Weight of covering what the question needs."""
    clarity: float = Field(0.1, ge=0)
    """Weight of clear, well-organised writing."""

    @model_validator(mode="after")
    def _sum_to_one(self):
        total = self.accuracy + self.safety + self.completeness + self.clarity
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"dimension weights must sum to 1, got {total:g}")
        return self


class Price(StrictModel):
    """USD per 1M tokens."""

    input: float = Field(ge=0)
    """Prompt tokens that miss the provider's prefix cache."""
    input_cache_hit: float = Field(ge=0)
    """Prompt tokens served from the provider's prefix cache (DeepSeek ``prompt_cache_hit_tokens``)."""
    output: float = Field(ge=0)
    """Completion tokens."""


def _deepseek_prices() -> dict[str, Price]:
    # DeepSeek list prices (V3.2, USD / 1M tokens); check https://api-docs.deepseek.com/quick_start/pricing.
    p = Price(input=0.28, input_cache_hit=0.028, output=0.42)
    return {"deepseek-chat": p, "deepseek-reasoner": p}


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_PREFIXES = ("sk-", "sk_", "pk-", "rk-", "ghp_", "gho_", "github_pat_", "hf_", "xox", "akia", "aiza", "glpat-")


def looks_like_secret(value: str) -> bool:
    """A value that looks like an API key or token rather than the name of an environment variable: a known key
    prefix, or not a variable name, or a long mixed-case/digit run (variable names are short UPPER_SNAKE words)."""
    v = value.strip()
    if v.lower().startswith(_KEY_PREFIXES) or not _ENV_NAME.fullmatch(v):
        return True
    return len(v) >= 24 and any(c.isdigit() for c in v) and not v.isupper()


class JudgeConfig(StrictModel):
    provider: Literal["openai", "reference", "none"] = "openai"
    """``openai``: any OpenAI-compatible endpoint; ``reference``: offline deterministic comparison with the reference;
    ``none``: rules only."""
    base_url: str = "https://api.deepseek.com"
    """Base URL of the OpenAI-compatible chat-completions endpoint."""
    model: str = "deepseek-chat"
    """Judge model name sent to the endpoint; must have an entry in ``prices``."""
    api_key_env: str = "DEEPSEEK_API_KEY"
    """Name of the environment variable holding the API key (the key itself is never stored or logged); a value
    that looks like a key is refused without being shown."""
    temperature: float = Field(0.0, ge=0, le=2)
    """Sampling temperature of the judge (0: the most repeatable verdicts)."""
    max_tokens: int = Field(256, ge=16)
    """Completion cap of one judgement (the JSON is ~60-120 tokens)."""
    timeout_s: float = Field(60.0, gt=0)
    """Per-attempt HTTP timeout given to the openai client."""
    max_retries: int = Field(3, ge=0)
    """HTTP retries done by the openai client (429/5xx/timeouts, honouring Retry-After)."""
    malformed_retries: int = Field(2, ge=0)
    """Extra calls when the judge answers with empty or invalid JSON; then the sample is a failed judgement."""
    on_failure: Literal["rules_only", "drop"] = "drop"
    """A failed judgement (``judge_status`` failed: the teacher's call, or a rubric criterion's grading): ``drop``
    (R from the parts that did score, ``dropped=True``: PPO leaves the sample out of its group's baseline and of the
    loss, counted as ``judge_unscored_frac``) or ``rules_only`` (R from the parts that did score, the rules, and it
    trains: in a GRPO/RLOO group that score is then compared with fully judged ones, two scales in one baseline)."""
    rubric_version: str = RUBRIC_VERSION
    """Part of every cache key; change it to re-judge everything."""
    dimension_weights: DimensionWeights = DimensionWeights()
    """How the four 0-10 rubric dimensions make the 0-1 teacher score."""
    prices: dict[str, Price] = Field(default_factory=_deepseek_prices)
    """Price table by model name; the judge model must be listed when ``provider`` is ``openai``."""
    budget_usd: float | None = Field(10.0, ge=0)
    """Spending cap (None: no cap). Past it the judge stops and rewards are rules only, with a warning."""
    budget_scope: str = Field("run", min_length=1)
    """Whose spending ``budget_usd`` caps, kept in the cache store so it survives restarts: ``run`` (this run
    directory; a resumed run continues its total) or any other name: one budget shared by every run on the store
    that uses that name."""
    rpm: int = Field(1200, ge=0)
    """Global requests per minute over all judge actors (0: no limit)."""
    tpm: int = Field(2_000_000, ge=0)
    """Global tokens (prompt + completion) per minute over all judge actors (0: no limit)."""
    num_actors: int = Field(2, ge=1)
    """Ray judge actors sending requests in parallel."""
    concurrency: int = Field(32, ge=1)
    """Requests in flight per judge actor."""
    actor_num_cpus: float = Field(0.1, gt=0)
    """Ray CPUs reserved per judge actor (they mostly wait on the network)."""
    actor_max_restarts: int = Field(4, ge=0)
    """Ray restarts a dead judge actor this many times and re-runs its unfinished work (the cache stops re-paying)."""
    batch_size: int = Field(256, ge=1)
    """Items per actor call."""
    tokenizer: str | None = None
    """Local tokenizer directory ``medrl judge --dry-run`` counts judge tokens with (None: documented estimate)."""

    @field_validator("api_key_env")
    @classmethod
    def _env_name_not_key(cls, value: str) -> str:
        if looks_like_secret(value):
            raise ValueError("this looks like an API key itself, not the name of an environment variable: put the "
                             "key in a variable (export DEEPSEEK_API_KEY=...) and give its name here (value not shown)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "cache_path" in data:
            raise ValueError("reward.judge.cache_path moved to reward.cache.path")
        return data

    @model_validator(mode="after")
    def _priced(self):
        if self.provider == "openai" and self.model not in self.prices:
            raise ValueError(f"judge model {self.model!r} has no entry in reward.judge.prices "
                             f"(known: {', '.join(sorted(self.prices)) or 'none'})")
        return self

    @property
    def judge_id(self) -> str:
        """Which judge produced a teacher score, as written in results, logs and reports."""
        if self.provider == "openai":
            return f"openai:{self.model}"
        return "reference:medrl-reference-v1" if self.provider == "reference" else "none"


VERIFIER_VERSION = "medrl-verifier-v1"
"""Version of the verifier's equivalence prompt in ``medrl/reward/verifier.py``; part of its cache keys."""


class VerifierConfig(StrictModel):
    """Ground-truth reward for prompts that carry one (``medrl/reward/verifier.py``); used when ``w_verifier`` > 0."""

    correct: float = Field(1.0, ge=0, le=1)
    """Reward of a correct answer in the right format."""
    wrong: float = Field(0.1, ge=0, le=1)
    """A wrong (or missing) answer in the right format: a little above a broken format, as in HuatuoGPT-o1."""
    bad_format: float = Field(0.0, ge=0, le=1)
    """The think-then-answer format is broken (no single non-empty ``<think>`` block before a non-empty answer)."""
    mcq_mode: Literal["strict", "lenient"] = "strict"
    """How the chosen letter is read (as in eval): ``strict`` needs an explicit "The answer is B" / "答案是B"."""
    open_ended: Literal["judge", "match", "off"] = "judge"
    """Open-ended references: ``judge`` asks the teacher endpoint (``reward.judge``, provider openai; with another
    provider the matcher is used) whether the answer is equivalent; ``match`` uses the deterministic matcher
    only; ``off`` verifies MCQ / yes-no items only."""
    match_threshold: float = Field(0.6, gt=0, le=1)
    """Matcher: the reference is contained in the answer, or this share of its key terms is."""
    max_reference_chars: int = Field(300, ge=1)
    """Longer references are explanations, not verifiable answers: such prompts get no verifier verdict."""
    version: str = VERIFIER_VERSION
    """Part of every verifier cache key; change it to re-verify everything."""


class RubricConfig(StrictModel):
    """Rubric grading (``w_rubric``): the teacher endpoint (``reward.judge``: client, rate limits, budget, store)
    decides for each criterion of a prompt's rubric whether the response meets it (``docs/reward.md``)."""

    mode: Literal["per_criterion", "batched"] = "per_criterion"
    """``per_criterion``: one call per criterion (HealthBench's protocol, the verdicts it was validated with);
    ``batched``: all criteria of a response in one call (about 1/n of the calls and prompt tokens, verdicts less
    independent of each other: see ``bench/rubric_reward.py``)."""
    grader_version: str = RUBRIC_GRADER_VERSION
    """Part of every criterion's cache key; change it to re-grade everything."""
    format_gate: bool = False
    """A response whose format rule scores 0 (no answer after the reasoning, broken ``<think>`` tags) gets rubric
    score 0 without a grader call."""
    max_criteria: int = Field(40, ge=1)
    """At most this many criteria of a prompt are graded (the first ones); HealthBench has up to ~30."""


PRESETS: dict[str, dict] = {
    "huatuo-o1": {"w_rule": 0.0, "w_teacher": 0.0, "w_verifier": 1.0, "w_rubric": 0.0},
    "rubric": {"w_rule": 0.3, "w_teacher": 0.0, "w_verifier": 0.0, "w_rubric": 0.7, "rubric": {"format_gate": True},
               "rules": {"keywords": {"weight": 0.0}, "length": {"weight": 0.0}}},
}
"""Named recipes: ``huatuo-o1`` is HuatuoGPT-o1's RL reward (verifier only: 1.0 correct, 0.1 wrong, 0 broken
format); ``rubric`` grades the prompt's rubric (0.7) next to the format and safety rules (0.3: keyword coverage and
length off), with the format gate on. Values set explicitly next to ``preset`` win (``w_rule: 0.2`` adds the rules to
the huatuo recipe); nested settings merge key by key."""


def _merged(preset: dict, data: dict) -> dict:
    out = dict(preset)
    for key, value in data.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class CacheConfig(StrictModel):
    """The store of judgements, judge-call claims, rate limits and spending, shared by every actor, process and run
    that points at it (``docs/cluster.md``)."""

    backend: Literal["sqlite", "postgres"] = "sqlite"
    """``sqlite``: one file on one machine (embedded default); ``postgres``: a PostgreSQL server for clusters and
    teams (psycopg 3)."""
    path: str = "runs/judge_cache.sqlite"
    """SQLite file (WAL); relative paths are relative to the working directory. Keep it on a local disk."""
    url_env: str = "MEDRL_CACHE_URL"
    """``postgres``: name of the environment variable holding the connection string (``postgresql://user:pass@host
    /db``), read on every node; the URL itself is never stored or logged."""
    claim_ttl_s: float = Field(30.0, gt=0)
    """A key is claimed before its judge call; a claim not renewed for this long (its holder died) is taken over."""
    outage_s: float = Field(120.0, ge=0)
    """``postgres``: how long the server may stay unreachable (a restart, a failover): a lost connection is reopened
    with backoff (0.1 s doubling to 5 s) and the operation repeated meanwhile; past this the run stops with one line.
    A claim whose ``claim_ttl_s`` ran out meanwhile may be taken over by another run, as after a crash."""


RUBRIC_GENERATOR_VERSION = "medrl-rubric-gen-v1"
"""Version of the rubric generation prompt in ``medrl/reward/rubric_gen.py``; part of every generated rubric's key."""


class CategoryPoints(StrictModel):
    """Points of a generated criterion by its Rubrics-as-Rewards category (arXiv 2507.17746), on HealthBench's
    -10..10 scale."""

    essential: float = Field(5.0, gt=0, le=10)
    """Without it the answer is wrong or unsafe."""
    important: float = Field(3.0, gt=0, le=10)
    """Clearly expected by a clinician."""
    optional: float = Field(1.0, gt=0, le=10)
    """Nice to have."""
    pitfall: float = Field(-5.0, ge=-10, lt=0)
    """A mistake or harm the response shows (met = present): subtracted."""


class RubricGenerationConfig(StrictModel):
    """``medrl rubrics generate``: the teacher (``reward.judge``: endpoint, rate limits, budget, store) writes a
    rubric per prompt from its reference answer (``docs/reward.md``, "Rubric generation")."""

    version: str = RUBRIC_GENERATOR_VERSION
    """Part of every stored rubric's key; change it to generate every rubric again."""
    min_criteria: int = Field(7, ge=1, le=40)
    """Fewest distinct criteria a valid reply has (a reply outside the bounds is asked again)."""
    max_criteria: int = Field(20, ge=1, le=40)
    """Most distinct criteria a valid reply has."""
    points: CategoryPoints = CategoryPoints()
    """Category -> points, applied when the JSONL is written (changing them re-pays nothing)."""
    max_tokens: int = Field(2048, ge=256)
    """Completion tokens allowed for one rubric (a verdict's ``reward.judge.max_tokens`` is far too small)."""

    @model_validator(mode="after")
    def _bounds(self) -> "RubricGenerationConfig":
        if self.min_criteria > self.max_criteria:
            raise ValueError(f"min_criteria {self.min_criteria} is above max_criteria {self.max_criteria}")
        return self


class RewardConfig(StrictModel):
    preset: Literal["none", "huatuo-o1", "rubric"] = "none"
    """A named recipe filling the weights (``PRESETS``); explicit weights win."""
    w_rule: float = Field(0.6, ge=0)
    """Weights are relative (R divides by the sum of those present), so one may be changed alone."""
    w_teacher: float = Field(0.4, ge=0)
    """0 turns the rubric judge off (no calls, no cost; judge status ``disabled``)."""
    w_verifier: float = Field(0.0, ge=0)
    """R = (w_rule Rule + w_teacher Teacher + w_verifier Verifier + w_rubric Rubric) / (sum of the weights of the
    parts present): a part is absent when it has no score for the sample (no teacher judgement, no ground truth to
    verify, no rubric); with no weighted part present R = Rule."""
    w_rubric: float = Field(0.4, ge=0)
    """Weight of the rubric item score (clipped to [0, 1]) of prompts that carry a rubric; such prompts leave keyword
    coverage out of Rule (the rubric pays for content). 0: rubrics are not graded (no calls)."""
    rules: RulesConfig = RulesConfig()
    """Weights and parameters of the rule rewards (format, length, keywords, safety)."""
    judge: JudgeConfig = JudgeConfig()
    """The teacher judge: provider, endpoint, rubric, budget and rate limits."""
    verifier: VerifierConfig = VerifierConfig()
    """The ground-truth verifier reward."""
    rubric: RubricConfig = RubricConfig()
    """How the criteria of a prompt's rubric are graded (per criterion or batched, grader version, format gate)."""

    cache: CacheConfig = CacheConfig()
    """The judgement store shared by actors, processes and runs."""
    rubric_generation: RubricGenerationConfig = RubricGenerationConfig()
    """``medrl rubrics generate``: the teacher writes a rubric per prompt from its reference answer."""

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        if isinstance(data, dict) and data.get("preset", "none") in PRESETS:
            data = _merged(PRESETS[data["preset"]], data)
        return data

    @model_validator(mode="after")
    def _weights(self):
        if self.w_rule + self.w_teacher + self.w_verifier + self.w_rubric <= 0:
            raise ValueError("at least one of w_rule, w_teacher, w_verifier, w_rubric must be > 0")
        return self

    @property
    def rubric_grader(self) -> str | None:
        """What grades rubric criteria (printed beside every HealthBench figure, eval's and the meta-eval's): the
        judge and the grader version; None when rubrics are not graded."""
        if self.w_rubric <= 0 or self.judge.provider == "none":
            return None
        return f"{self.judge.judge_id} · {self.rubric.grader_version}"

    def weights(self, item: RewardInput) -> Weights:
        """The weights of ``item``: its own (``RewardInput.weights``), else ``w_rule`` ... ``w_rubric``."""
        if item.weights is not None:
            return item.weights
        return Weights(self.w_rule, self.w_teacher, self.w_verifier, self.w_rubric)

    def mix(self, item: RewardInput, rule: float, teacher: float | None, verifier: float | None,
            rubric: float | None) -> float:
        """The combined reward of ``item`` (see ``w_verifier``; ``weights``)."""
        w = self.weights(item)
        parts = [(w.rule, rule), (w.teacher, teacher), (w.verifier, verifier), (w.rubric, rubric)]
        present = [(w, v) for w, v in parts if v is not None and w > 0]
        total = sum(w for w, _ in present)
        return rule if total == 0 else sum(w * v for w, v in present) / total
