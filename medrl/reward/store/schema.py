"""What the judge store holds (pure: no database opened here): the tables and their columns, shared by the SQLite and
PostgreSQL backends (``database.py``), and the content-addressed keys of judgements."""
from __future__ import annotations

import hashlib
import json

from medrl.reward.config import RewardConfig
from medrl.reward.types import RewardInput

SCHEMA_VERSION = 1
"""Version of the tables below, recorded in ``medrl_schema``; a store written by a newer medrl is refused."""

TABLES = (
    """CREATE TABLE IF NOT EXISTS judgements (
  key TEXT PRIMARY KEY, judge TEXT NOT NULL, rubric_version TEXT NOT NULL, accuracy INTEGER NOT NULL,
  safety INTEGER NOT NULL, completeness INTEGER NOT NULL, clarity INTEGER NOT NULL, reason TEXT NOT NULL,
  prompt TEXT NOT NULL, answer TEXT NOT NULL, reference TEXT, tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL,
  tokens_cache_hit INTEGER NOT NULL, cost_usd DOUBLE PRECISION NOT NULL, created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS pairwise_verdicts (
  key TEXT PRIMARY KEY, judge TEXT NOT NULL, version TEXT NOT NULL, winner TEXT NOT NULL, reason TEXT NOT NULL,
  prompt TEXT NOT NULL, answers TEXT NOT NULL, reference TEXT, tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL,
  tokens_cache_hit INTEGER NOT NULL, cost_usd DOUBLE PRECISION NOT NULL, created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS generated_rubrics (
  key TEXT PRIMARY KEY, generator TEXT NOT NULL, version TEXT NOT NULL, criteria TEXT NOT NULL, prompt TEXT NOT NULL,
  reference TEXT NOT NULL, tokens_in INTEGER NOT NULL, tokens_out INTEGER NOT NULL, tokens_cache_hit INTEGER NOT NULL,
  cost_usd DOUBLE PRECISION NOT NULL, created DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS patient_replies (
  key TEXT PRIMARY KEY, simulator TEXT NOT NULL, reply TEXT NOT NULL, tokens_in INTEGER NOT NULL,
  tokens_out INTEGER NOT NULL, tokens_cache_hit INTEGER NOT NULL, cost_usd DOUBLE PRECISION NOT NULL,
  created DOUBLE PRECISION NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, holder TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rate_buckets (name TEXT PRIMARY KEY, tat DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS spend (scope TEXT PRIMARY KEY, spent_usd DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS medrl_schema (version INTEGER NOT NULL)",
)
JUDGEMENT_COLUMNS = ("key", "judge", "rubric_version", "accuracy", "safety", "completeness", "clarity", "reason", "prompt",
            "answer", "reference", "tokens_in", "tokens_out", "tokens_cache_hit", "cost_usd", "created")
SELECT_JUDGEMENTS = f"SELECT {', '.join(JUDGEMENT_COLUMNS)} FROM judgements"
PAIRWISE_COLUMNS = ("key", "judge", "version", "winner", "reason", "prompt", "answers", "reference", "tokens_in",
                 "tokens_out", "tokens_cache_hit", "cost_usd", "created")
RUBRIC_COLUMNS = ("key", "generator", "version", "criteria", "prompt", "reference", "tokens_in", "tokens_out",
                   "tokens_cache_hit", "cost_usd", "created")
PATIENT_COLUMNS = ("key", "simulator", "reply", "tokens_in", "tokens_out", "tokens_cache_hit", "cost_usd", "created")


def cache_key(judge: str, rubric_version: str, prompt: str, answer: str, reference: str | None) -> str:
    """sha256 of (judge model, rubric version, prompt, judged answer, reference). The judge only sees the final
    answer, so two responses that differ only in their reasoning share one judgement."""
    blob = json.dumps([judge, rubric_version, prompt, answer, reference], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def judge_key(cfg: RewardConfig, item: RewardInput, answer: str) -> str:
    """The cache key of ``item`` whose final answer is ``answer``, under the configured judge model and rubric."""
    return cache_key(cfg.judge.model, cfg.judge.rubric_version, item.prompt, answer, item.reference)
