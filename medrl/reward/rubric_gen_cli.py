"""``medrl rubrics generate``: a rubric per prompt written by the teacher from its reference answer, stored in the
judge store (never paid twice, also across runs and machines) and written as an editable JSONL that ``medrl
prepare`` reads back (``data.catalog.<source>.rubrics``).

Input rows (a prepared ``train`` / ``rl_prompts`` / benchmark file, or any JSONL): ``id``, ``messages`` or
``question`` / ``prompt``, ``reference``; rows without a reference, or that already carry ``rubrics``, are passed
over (counted). Each distinct (conversation, reference) is generated once: its key is claimed in the store before
the call (``reward.cache.claim_ttl_s``, renewed while it runs), a key another process holds is waited for, and the
rubric is committed before the JSONL is written. The teacher is called through ``OpenAIJudge.call`` (the client's
retries, malformed-reply retries, key redaction, fail-fast on a bad key or model) under ``reward.judge``'s rate
limits and budget. ``provider: reference`` writes the offline rubric (``rubric_gen.reference_rubric``): free and
deterministic, so CI and ``make run`` exercise the path.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from medrl.data.schema import parse_rubrics
from medrl.errors import UsageError
from medrl.jsonl import iter_jsonl
from medrl.reward.config import RewardConfig
from medrl.reward.judge import JudgeOutcome, OpenAIJudge, _system_tokens
from medrl.reward.ledger import Ledger, Usage, call_cost, local_gate
from medrl.reward.rubric_gen import (generation_messages, parse_generated, reference_rubric, rubric_key,
                                     system_prompt, with_points)
from medrl.reward.store.claims import Claims
from medrl.reward.store.database import open_store
from medrl.reward.text import estimate_tokens
from medrl.reward.types import RewardInput

log = logging.getLogger("medrl.reward")

TYPICAL_TOKENS_PER_CRITERION = 40
"""Dry-run estimate of one generated criterion's completion tokens (the JSON entry)."""


def prompt_of(row: dict) -> dict | str:
    """What the generator needs of a record or prompt row (``{id, messages, reference, language, question}``), or
    why it is passed over (``has_rubric``, ``no_reference``); raises ValueError naming a bad key."""
    item = RewardInput.from_record({**row, "response": ""})
    if item.rubrics:
        return "has_rubric"
    if not (item.reference or "").strip():
        return "no_reference"
    return {"id": str(row["id"]), "messages": list(item.conversation), "reference": item.reference,
            "language": item.language, "question": item.conversation[-1]["content"]}


def read_prompts(path: Path, limit: int | None = None) -> tuple[list[dict], dict]:
    """The rows to generate for and counts of the rows passed over; a bad row is a one-line error naming the file
    and line."""
    todo, skipped = [], {"no_reference": 0, "has_rubric": 0}
    for lineno, row in iter_jsonl(Path(path), missing_hint="the rubric generation input"):
        if limit is not None and len(todo) >= limit:
            break
        if not row.get("id"):
            raise UsageError(f"{path}:{lineno}: key 'id' is missing (prepare reads rubrics back by record id)")
        try:
            got = prompt_of(row)
        except ValueError as exc:
            raise UsageError(f"{path}:{lineno}: {exc}") from None
        if isinstance(got, str):
            skipped[got] += 1
        else:
            todo.append(got)
    return todo, skipped


def read_rubric_file(path: Path) -> dict[str, list[dict]]:
    """{record id: rubric} of a rubrics JSONL (``data.catalog.<source>.rubrics``); rows whose ``rubrics`` is null
    are passed over; a bad row is a one-line error naming the file and line."""
    out = {}
    for lineno, row in iter_jsonl(path, ("id",), missing_hint="data.catalog.<source>.rubrics"):
        if row.get("rubrics") is None:
            continue
        try:
            out[row["id"]] = parse_rubrics(row["rubrics"])
        except ValueError as exc:
            raise UsageError(f"{path}:{lineno}: {exc}") from None
    return out


def _key(cfg: RewardConfig, p: dict) -> str:
    g = cfg.rubric_generation
    return rubric_key(cfg.judge.model, g.version, p["messages"], p["reference"], g.min_criteria, g.max_criteria)


def generator_id(cfg: RewardConfig) -> str:
    return f"{cfg.judge.judge_id} · {cfg.rubric_generation.version}"


class RubricGenerator:
    """Generates the rubrics of distinct (conversation, reference) keys with the OpenAI-compatible teacher."""

    def __init__(self, cfg: RewardConfig):
        key = os.environ.get(cfg.judge.api_key_env)
        if not key:
            raise UsageError(f"rubric generation needs the environment variable {cfg.judge.api_key_env} "
                             f"(reward.judge.api_key_env), or --dry-run to estimate the cost")
        self.cfg, self._key = cfg, key
        self.judge_cfg = cfg.judge.model_copy(update={"max_tokens": cfg.rubric_generation.max_tokens})
        self.ledger = Ledger(cfg.judge.rpm, cfg.judge.tpm, cfg.judge.budget_usd)

    def generate(self, prompts: dict[str, dict]) -> dict[str, dict]:
        """{key: {"criteria" | None, "status": ok|cached|failed|over_budget, "reason", "usage", "cost_usd"}}."""
        return asyncio.run(self._generate(prompts))

    async def _generate(self, prompts: dict[str, dict]) -> dict[str, dict]:
        g = self.cfg.rubric_generation
        store = open_store(self.cfg.cache)
        claims = Claims(store, store.rubrics_many, self.cfg.cache.claim_ttl_s)
        judge = OpenAIJudge(self.judge_cfg, self._key)
        gate = local_gate(self.ledger, max(1, self.cfg.judge.concurrency // 4))
        slots = asyncio.Semaphore(self.cfg.judge.concurrency)
        parse = parse_generated(g.min_criteria, g.max_criteria)

        async def call(key: str) -> JudgeOutcome:
            p = prompts[key]
            async with slots:
                res = await judge.call(generation_messages(p["messages"], p["reference"], g.min_criteria,
                                                           g.max_criteria), parse, gate,
                                       recheck=lambda: store.rubrics_many([key]).get(key))
            if res.status not in ("ok", "cached"):
                log.warning("rubric for %s %s: %s", p["id"], res.status, res.reason)
            return res

        async def put(key: str, res: JudgeOutcome) -> None:
            p, u = prompts[key], res.usage
            store.put_rubric({"key": key, "generator": self.cfg.judge.judge_id, "version": g.version,
                              "criteria": res.judgement, "prompt": json.dumps(p["messages"], ensure_ascii=False),
                              "reference": p["reference"], "tokens_in": u.tokens_in, "tokens_out": u.tokens_out,
                              "tokens_cache_hit": u.tokens_cache_hit, "cost_usd": res.cost_usd}, claims.holder)

        try:  # a teacher no call can survive (JudgeSetupError) raises here: close stops the other calls
            made = await claims.get(prompts, call, put)
        finally:
            await claims.close()
            await gate.flush()
            await judge.close()
            store.close()
        return {k: {"criteria": res.judgement, "status": res.status, "reason": res.reason, "usage": res.usage,
                    "cost_usd": res.cost_usd} for k, res in made.items()}


def estimate_generation(cfg: RewardConfig, prompts: list[dict]) -> dict:
    """What generating would cost, without an API key or a call: stored rubrics and duplicates are free, the fixed
    instructions are billed at the cache-hit price after the first call."""
    jc, g = cfg.judge, cfg.rubric_generation
    keys = {_key(cfg, p): p for p in prompts}
    out = {"prompts": len(prompts), "generator": generator_id(cfg), "budget_usd": jc.budget_usd}
    if jc.provider != "openai":
        return {**out, "to_generate": 0, "cost_usd_typical": 0.0, "cost_usd_max": 0.0}
    store = open_store(cfg.cache, readonly=True)
    stored = store.rubrics_many(keys)
    store.close()
    todo = [p for k, p in keys.items() if k not in stored]
    system = _system_tokens(system_prompt(g.min_criteria, g.max_criteria))
    user = sum(estimate_tokens(generation_messages(p["messages"], p["reference"], g.min_criteria, g.max_criteria)
                               [1]["content"]) for p in todo)
    tokens_in, hit = system * len(todo) + user, system * max(0, len(todo) - 1)
    typical_out = TYPICAL_TOKENS_PER_CRITERION * (g.min_criteria + g.max_criteria) // 2 * len(todo)
    price = jc.prices[jc.model]
    return {**out, "stored": len(stored), "duplicates": len(prompts) - len(keys), "to_generate": len(todo),
            "tokens_in": tokens_in, "tokens_in_cache_hit_expected": hit, "tokens_out_typical": typical_out,
            "tokens_out_max": g.max_tokens * len(todo),
            "cost_usd_typical": round(call_cost(Usage(tokens_in, typical_out, hit), price), 6),
            "cost_usd_max": round(call_cost(Usage(tokens_in, g.max_tokens * len(todo), 0), price), 6)}


def generate_rubrics(cfg: RewardConfig, prompts: list[dict]) -> tuple[list[str], dict[str, dict]]:
    """The key of each prompt, and per distinct key ``{"criteria" | None, "status", "reason", "usage",
    "cost_usd"}``: the offline rubric (``provider: reference``) or the teacher's."""
    keys = [_key(cfg, p) for p in prompts]
    if cfg.judge.provider == "reference":
        return keys, {k: {"criteria": reference_rubric(p["reference"], p["language"]), "status": "ok", "reason": "",
                          "usage": Usage(), "cost_usd": 0.0} for k, p in zip(keys, prompts)}
    return keys, RubricGenerator(cfg).generate(dict(zip(keys, prompts)))


def rubric_rows(cfg: RewardConfig, prompts: list[dict], made: list[dict]) -> list[dict]:
    """The editable file's rows: ``{id, question, reference, rubrics, generator, status}`` (``rubrics`` with the
    configured points; null with a ``reason`` when generation failed)."""
    points = cfg.rubric_generation.points.model_dump()
    rows = []
    for p, m in zip(prompts, made):
        row = {"id": p["id"], "question": p["question"], "reference": p["reference"],
               "rubrics": with_points(m["criteria"], points) if m["criteria"] else None,
               "generator": generator_id(cfg), "status": m["status"]}
        if m["reason"]:
            row["reason"] = m["reason"]
        rows.append(row)
    return rows


def attach_generated(cfg: RewardConfig, records: list[dict], out_path: Path) -> int:
    """``data.catalog.<source>.generate_rubrics``: give every record with a reference and no rubric a generated one
    (in place) and append the rows to the editable file ``out_path``; returns how many records got one."""
    todo = [(rec, p) for rec in records if isinstance(p := prompt_of(rec), dict)]
    if not todo:
        return 0
    keys, made = generate_rubrics(cfg, [p for _, p in todo])
    rows = rubric_rows(cfg, [p for _, p in todo], [made[k] for k in keys])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as f:
        for (rec, _), row in zip(todo, rows):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if row["rubrics"]:
                rec["rubrics"] = row["rubrics"]
    return sum(1 for row in rows if row["rubrics"])


def run_generate(cfg: RewardConfig, *, input_path: Path, out_path: Path, limit: int | None = None,
                 dry_run: bool = False) -> dict:
    """Generate (or estimate) the rubrics of ``input_path``'s rows and write ``out_path``: one row per prompt,
    ``{id, question, reference, rubrics, generator, status}`` (``rubrics`` null with a ``reason`` when it failed)."""
    prompts, skipped = read_prompts(input_path, limit)
    if cfg.judge.provider == "none":
        raise UsageError("rubric generation needs a teacher: reward.judge.provider is none (use openai, or "
                         "reference for the offline rubric)")
    if dry_run:
        est = {**estimate_generation(cfg, prompts), "skipped": skipped}
        print(f"dry run ({est['generator']}): {est['prompts']} prompts, {est['to_generate']} to generate; cost "
              f"~${est['cost_usd_typical']:.4f} (max ${est['cost_usd_max']:.4f})")
        return est
    keys, made = generate_rubrics(cfg, prompts)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rubric_rows(cfg, prompts, [made[k] for k in keys]):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out_path)
    statuses = [made[k]["status"] for k in dict.fromkeys(keys)]
    summary = {"prompts": len(prompts), "distinct": len(statuses), "skipped": skipped,
               **{s: statuses.count(s) for s in ("ok", "cached", "failed", "over_budget")},
               "tokens_in": sum(m["usage"].tokens_in for m in made.values()),
               "tokens_out": sum(m["usage"].tokens_out for m in made.values()),
               "cost_usd": round(sum(m["cost_usd"] for m in made.values()), 6), "out": str(out_path),
               "generator": generator_id(cfg)}
    log.info("rubric generation: %s", json.dumps(summary, ensure_ascii=False))
    print(f"rubrics ({summary['generator']}): {summary['prompts']} prompts, generated {summary['ok']}, stored "
          f"already {summary['cached']}, failed {summary['failed']}, over budget {summary['over_budget']}; cost "
          f"${summary['cost_usd']:.4f} -> {out_path}")
    return summary
