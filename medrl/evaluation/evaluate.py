"""``medrl eval``: base vs SFT vs RL on the test, gold, red-team and benchmark sets, scored by the reward plane.

Ray shell around the pure parts (``extract``, ``metrics``, ``pairwise``): every model generates with the same
decoding settings (in this process one after the other, or in Ray tasks side by side), the reward pool scores every
response (rules + teacher judge, cached), the pairwise judge compares models in both orders, and everything lands in
``<run>/eval/``: ``<model>.<set>.jsonl`` (generations, scores, extracted answers), ``pairwise.<a>_vs_<b>.jsonl`` and
``summary.json`` (what the report reads).
"""
from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from medrl.config import Config
from medrl.data.config import RESERVED_SET_NAMES
from medrl.errors import UsageError
from medrl.evaluation.config import SET_NAME, SPLIT_SETS
from medrl.evaluation.metrics import annotate, summarize
from medrl.evaluation.pairwise import PairTask, PairwiseJudge, reward_verdict
from medrl.jsonl import read_jsonl
from medrl.models.card import refresh_cards
from medrl.models.chat import conversation
from medrl.reward.extract import final_answer
from medrl.runs import MetricsLogger, RunDir
from medrl.trackers import flatten

log = logging.getLogger("medrl.eval")

_FLIP = {"A": "B", "B": "A", "tie": "tie"}
_ITEM_FIELDS = ("id", "language", "risk", "category", "expected_behavior", "label", "options", "question",
                "reference", "messages", "rubrics", "example_tags")


# --------------------------------------------------------------------------- inputs
def resolve_models(cfg: Config, run: RunDir, models: list[str] | None) -> tuple[dict[str, Path | None], list[str]]:
    """{name: adapter dir or None for the base model}, and notes on models skipped because they do not exist."""
    explicit = models is not None
    names = list(dict.fromkeys(models if explicit else cfg.eval.models))
    adapters = {"base": None, "sft": run.sft_adapter, "rl": run.ppo_adapter}
    out: dict[str, Path | None] = {}
    skipped = []
    for name in names:
        if name not in adapters:
            raise UsageError(f"--models: unknown model '{name}' (choose from base, sft, rl)")
        adapter = adapters[name]
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            stage = "sft" if name == "sft" else "ppo"
            if explicit:
                raise UsageError(f"--models {name}: no adapter at {adapter} (run `medrl {stage}` first)")
            skipped.append(f"model {name}: no adapter at {adapter} yet (run `medrl {stage}`)")
            continue
        out[name] = adapter
    if not out:
        raise UsageError("no model to evaluate (eval.models is empty)")
    return out, skipped


def select_items(items: list[dict], limit: int | None) -> list[dict]:
    """At most ``limit`` items, taken in turn from each group (red-team ``category``, else ``source``) so that a small
    limit still covers every category and source; the chosen items keep their file order."""
    if limit is None or len(items) <= limit:
        return items
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(str(it.get("category") or it.get("source") or ""), []).append(i)
    chosen: list[int] = []
    for rank in range(max(len(g) for g in groups.values())):
        chosen += [g[rank] for g in groups.values() if rank < len(g)]
    return [items[i] for i in sorted(chosen[:limit])]


def load_sets(cfg: Config, run: RunDir, sets: list[str] | None) -> tuple[dict[str, list[dict]], list[str]]:
    explicit = sets is not None
    names = list(dict.fromkeys(sets if explicit else cfg.eval.sets))
    out, skipped = {}, []
    for name in names:
        if (name in RESERVED_SET_NAMES and name not in SPLIT_SETS) or not SET_NAME.fullmatch(name):
            raise UsageError(f"--sets: '{name}' is not an eval set (test, gold, redteam or a benchmark source "
                             f"with data.catalog.<name>.role: benchmark)")
        path = run.data / f"{name}.jsonl"
        if not path.is_file():
            if explicit:
                hint = "" if name in SPLIT_SETS else (
                    f"; a benchmark needs data.catalog.{name}.role: benchmark and its name in data.sources")
                raise UsageError(f"--sets {name}: {path} not found (run `medrl prepare` first{hint})")
            skipped.append(f"set {name}: {path} not found")
            continue
        items = select_items(read_jsonl(path, ("id", "question")), cfg.eval.limit_for(name))
        if not items:
            skipped.append(f"set {name}: {path} is empty")
            continue
        out[name] = items
    if not out:
        raise UsageError(f"no eval set to run: none of {', '.join(names)} exists in {run.data} "
                         f"(run `medrl prepare` first)")
    return out, skipped


# --------------------------------------------------------------------------- generation
def generate_model(model_cfg, adapter: Path | None, conversations: dict[str, list[list[dict]]], decoding: dict
                   ) -> dict:
    """Load one model (base + optional adapter) and answer every conversation of every set with the shared decoding
    settings: ``{"outputs": {set: [{"response", "response_tokens", "finished"}]}, "seconds": wall time}``."""
    import torch

    from medrl.models.chat import render_prompt
    from medrl.models.generation import generate
    from medrl.models.loading import load_policy, load_tokenizer

    t0 = time.time()
    tok = load_tokenizer(model_cfg.path, model_cfg.cache_dir)
    model = load_policy(model_cfg, adapter).eval()
    flat = [(s, i, render_prompt(tok, model_cfg.system_prompt, turns)) for s, convs in conversations.items()
            for i, turns in enumerate(convs)]
    # longest prompts first: similar lengths share a batch (less padding); results are put back in place
    order = sorted(range(len(flat)), key=lambda k: -len(flat[k][2]))
    gens = generate(model, tok, [flat[k][2] for k in order], progress=True, **decoding)
    out: dict[str, list] = {s: [None] * len(convs) for s, convs in conversations.items()}
    for k, g in zip(order, gens):
        s, i, _ = flat[k]
        out[s][i] = {"response": g.text, "response_tokens": len(g.response_ids), "finished": g.finished}
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next model gets the memory back
    return {"outputs": out, "seconds": round(time.time() - t0, 2)}


def generate_all(cfg: Config, models: dict[str, Path | None], sets: dict[str, list[dict]]) -> dict[str, dict]:
    """Every model's answers to every item: a conversation item is answered after its whole conversation."""
    prompts = {s: [cfg.eval.mcq_prompt.render(it) for it in items] for s, items in sets.items()}
    conversations = {s: [conversation(it, text) for it, text in zip(items, prompts[s])] for s, items in sets.items()}
    out = _generate(cfg, models, conversations)
    for gen in out.values():  # each row records the exact prompt (MCQ items: the template around the question)
        for s, texts in prompts.items():
            for g, text in zip(gen["outputs"][s], texts):
                g["prompt"] = text
    return out


def _generate(cfg: Config, models: dict[str, Path | None], conversations: dict[str, list[list[dict]]]
              ) -> dict[str, dict]:
    decoding = cfg.eval.decoding.model_dump()
    if cfg.eval.engine == "vllm":
        from medrl.evaluation.vllm_generate import generate_all_vllm

        return generate_all_vllm(cfg, models, conversations, decoding)
    if not cfg.eval.use_ray:
        out = {}
        for name, adapter in models.items():
            log.info("generating with %s (%s)", name, adapter or cfg.model.path)
            out[name] = generate_model(cfg.model, adapter, conversations, decoding)
        return out
    import ray

    task = ray.remote(generate_model).options(num_cpus=cfg.eval.actor_num_cpus, num_gpus=cfg.eval.actor_num_gpus)
    refs = {name: task.remote(cfg.model, adapter, conversations, decoding) for name, adapter in models.items()}
    log.info("generating with %s in %d Ray task(s)", ", ".join(models), len(refs))
    return dict(zip(refs, ray.get(list(refs.values()))))


# --------------------------------------------------------------------------- scoring
def _row(model: str, set_name: str, item: dict, gen: dict, result) -> dict:
    rules = {k: v for k, v in result.components.items()
             if k not in ("rule", "teacher", "verifier", "rubric") and not k.startswith("judge.")}
    scores = {k[len("judge."):]: v for k, v in result.components.items() if k.startswith("judge.")}
    row = {"model": model, "set": set_name, **{k: item.get(k) for k in _ITEM_FIELDS}, **gen,
           "reward": result.reward, "rule": result.rule, "teacher": result.teacher, "rules": rules,
           "verifier": result.components.get("verifier"), "rubric": result.components.get("rubric"),
           "judge": {"id": result.judge, "status": result.judge_status, "scores": scores or None,
                     "reason": result.reasons.get("judge", ""), "tokens_in": result.tokens_in,
                     "tokens_out": result.tokens_out, "tokens_cache_hit": result.tokens_cache_hit,
                     "cost_usd": result.cost_usd},
           "flags": result.flags,
           "criteria": result.criteria or None}  # rubric items: every criterion with its verdict and explanation
    return annotate(row)


def score_all(pool, sets: dict[str, list[dict]], generations: dict[str, dict]) -> list[dict]:
    """Score every response with the reward pool; eval rows (annotated) in model, set, item order."""
    from medrl.reward.types import RewardInput

    keys, inputs = [], []
    for model, gen in generations.items():
        for s, items in sets.items():
            for item, g in zip(items, gen["outputs"][s]):
                keys.append((model, s, item, g))
                inputs.append(RewardInput(
                    id=f"{model}/{s}/{item['id']}", prompt=item["question"], response=g["response"],
                    reference=item.get("reference"), risk=item.get("risk") or "low",
                    expected_behavior=item.get("expected_behavior"), language=item.get("language"),
                    label=item.get("label"), options=item.get("options"),
                    messages=tuple(item["messages"]) if item.get("messages") else None,
                    rubrics=tuple(item["rubrics"]) if item.get("rubrics") else None))
    results = pool.score(inputs)
    return [_row(m, s, item, g, res) for (m, s, item, g), res in zip(keys, results)]


def pairwise_rows(cfg: Config, rows: list[dict]) -> tuple[dict[str, list[dict]], list[str]]:
    """Pairwise verdicts in both orders for each configured pair whose two models were evaluated."""
    pw, judge = cfg.eval.pairwise, cfg.reward.judge
    if not pw.enabled:
        return {}, []
    if judge.provider == "none":
        return {}, ["pairwise: no judge (reward.judge.provider is none)"]
    index = {(r["model"], r["set"], r["id"]): r for r in rows}
    models = {r["model"] for r in rows}
    plan, notes = [], []
    for a, b in pw.pairs:
        if a not in models or b not in models:
            notes.append(f"pairwise {a} vs {b}: {b if a in models else a} was not evaluated")
            continue
        for s in pw.sets:
            ids = [r["id"] for r in rows if r["model"] == a and r["set"] == s and (b, s, r["id"]) in index]
            plan += [(a, b, s, i) for i in ids[:pw.limit]]
    if not plan:
        return {}, notes
    if judge.provider == "reference":
        judge_id = f"{judge.judge_id} (reward comparison)"
        verdicts = []
        for a, b, s, i in plan:
            v = reward_verdict(index[(a, s, i)]["reward"], index[(b, s, i)]["reward"])
            verdicts.append(((v, "ok", ""), (_FLIP[v], "ok", "")))
        usage = [({"id": judge_id, "status": "ok", "tokens_in": 0, "tokens_out": 0, "tokens_cache_hit": 0,
                   "cost_usd": 0.0}) for _ in plan]
    else:
        tasks = []
        for a, b, s, i in plan:
            ra, rb = index[(a, s, i)], index[(b, s, i)]
            fa, fb = final_answer(ra["response"]), final_answer(rb["response"])
            tasks += [PairTask(ra["question"], ra.get("reference"), fa, fb),
                      PairTask(ra["question"], ra.get("reference"), fb, fa)]
        results = PairwiseJudge(judge, cfg.reward.cache).judge_all(tasks)
        verdicts, usage = [], []
        for k in range(len(plan)):
            ab, ba = results[2 * k], results[2 * k + 1]
            verdicts.append(((ab.winner, ab.status, ab.reason), (ba.winner, ba.status, ba.reason)))
            fa, fb = ab.judge_fields(judge.judge_id), ba.judge_fields(judge.judge_id)
            statuses = {ab.status, ba.status}
            status = next((st for st in ("failed", "over_budget") if st in statuses),
                          "cached" if statuses == {"cached"} else "ok")
            usage.append({"id": judge.judge_id, "status": status,
                          **{f: fa[f] + fb[f] for f in ("tokens_in", "tokens_out", "tokens_cache_hit", "cost_usd")}})
    out: dict[str, list[dict]] = {}
    for (a, b, s, i), (ab, ba), u in zip(plan, verdicts, usage):
        out.setdefault(f"{a}_vs_{b}", []).append(
            {"set": s, "id": i, "a": a, "b": b, "verdict_ab": ab[0], "verdict_ba": ba[0], "reason_ab": ab[2],
             "reason_ba": ba[2], "judge": u})
    return out, notes


# --------------------------------------------------------------------------- entry point
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def run_eval(cfg: Config, run: RunDir, *, models: list[str] | None = None, sets: list[str] | None = None) -> dict:
    """Evaluate the run's models on its eval sets; write ``<run>/eval/*.jsonl`` and ``summary.json``; return the
    summary (per model and set metrics, safety by category, pairwise win rates, judge usage and cost)."""
    from medrl.ray_utils import init_ray
    from medrl.reward.pool import RewardPool
    from medrl.reward.preflight import check_judge

    chosen, skipped_models = resolve_models(cfg, run, models)
    eval_sets, skipped_sets = load_sets(cfg, run, sets)
    for note in skipped_models + skipped_sets:
        log.warning("eval: %s", note)
    log.info("eval: models %s on sets %s", ", ".join(chosen),
             ", ".join(f"{s} ({len(v)})" for s, v in eval_sets.items()))
    check_judge(cfg.reward)  # a bad key, model or cache stops here, before Ray and any generation
    run.record_stage(cfg, "eval")
    started = init_ray(cfg.ray)
    try:
        with RewardPool(cfg.reward) as pool:  # built first: a missing API key fails before any generation
            t0 = time.time()
            generations = generate_all(cfg, chosen, eval_sets)
            t1 = time.time()
            rows = score_all(pool, eval_sets, generations)
            t2 = time.time()
        consultation = {}
        if cfg.consult.cases and cfg.consult.eval_limit:  # single turn vs interviewed (docs/consultation.md)
            from medrl.consult.evaluate import run_consult_eval

            consultation = run_consult_eval(cfg, chosen)
        pairwise, pair_notes = pairwise_rows(cfg, rows)
        t3 = time.time()
    finally:
        if started:
            import ray

            ray.shutdown()
    meta = {
        "models": {m: str(a) if a else cfg.model.path for m, a in chosen.items()},
        "sets": {s: len(v) for s, v in eval_sets.items()},
        "skipped": skipped_models + skipped_sets + pair_notes,
        "decoding": cfg.eval.decoding.model_dump(),
        "judge": cfg.reward.judge.judge_id,
        "rubric_grader": cfg.reward.rubric_grader,
        "consultation": {m: r["metrics"] for m, r in consultation.items()},
        "timings": {"generate_s": {m: g["seconds"] for m, g in generations.items()},
                    "generate_wall_s": round(t1 - t0, 2), "score_s": round(t2 - t1, 2),
                    "pairwise_s": round(t3 - t2, 2)},
    }
    summary = save_eval(run, rows, pairwise, meta)
    shutil.rmtree(run.eval / "consultation", ignore_errors=True)  # the dialogues of this eval only
    for model, result in consultation.items():
        from medrl.consult.evaluate import write_dialogues

        write_dialogues(run.eval, model, result["dialogues"])
    refresh_cards(cfg, run)  # the adapters' model cards gain the eval table
    with MetricsLogger(run, "eval") as metrics:
        metrics.log_hparams(cfg.to_dict())
        metrics.log(0, eval_scalars(summary))
    return summary


def eval_scalars(summary: dict) -> dict[str, float]:
    """The summary's figures as tracker scalars: ``<model>/<set>/<metric>`` (judge dimensions and rules one level
    deeper) and ``<pair>/<set>/<figure>`` for the pairwise win rates."""
    flat = flatten({**summary["table"], **summary["pairwise"]}, sep="/")
    return {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def save_eval(run: RunDir, rows: list[dict], pairwise: dict[str, list[dict]], meta: dict) -> dict:
    """Write ``<model>.<set>.jsonl`` per model and set, ``pairwise.<a>_vs_<b>.jsonl`` per pair, and ``summary.json``
    (``meta`` + the metrics of ``summarize``); returns the summary. Results of an earlier eval are removed first,
    so the folder always holds one consistent eval."""
    run.eval.mkdir(parents=True, exist_ok=True)
    for old in [*run.eval.glob("*.jsonl"), run.eval_summary]:
        old.unlink(missing_ok=True)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["set"]), []).append(r)
    for (model, s), group in groups.items():
        _write_jsonl(run.eval / f"{model}.{s}.jsonl", group)
    for name, prows in pairwise.items():
        _write_jsonl(run.eval / f"pairwise.{name}.jsonl", prows)
    summary = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **meta,
               **summarize(rows, pairwise, meta.get("rubric_grader"))}
    tmp = run.eval_summary.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(run.eval_summary)
    log.info("eval summary written to %s", run.eval_summary)
    return summary
