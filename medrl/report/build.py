"""``medrl report RUN_DIR``: one self-contained ``report.html`` (and ``report.md``) built from the run directory alone.

Sections: run overview, data card summary, training curves (PNG from ``metrics.jsonl``), the eval table per set,
benchmarks, HealthBench-style rubric scores, rule scores, red-team safety by category, consultations (single turn vs
interviewed, a few dialogues), pairwise win rates, judge usage and cost, side-by-side generations.
Every missing piece (no data yet, no PPO metrics, eval not run) is named in the report instead of failing.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import yaml

from medrl import RESEARCH_NOTICE
from medrl.consult.evaluate import consultation_section
from medrl.data.config import RESERVED_SET_NAMES
from medrl.render import Banner, Block, Heading, Image, Para, Pre, SideBySide, Table, to_html, to_markdown
from medrl.report.benchmarks import benchmark_blocks
from medrl.report.caveats import caveats
from medrl.report.feedback import feedback_section
from medrl.report.healthbench import healthbench_blocks
from medrl.report.plots import training_plots
from medrl.review.section import review_section
from medrl.reward.extract import final_answer
from medrl.reward.rubric import DIMENSIONS
from medrl.runs import RunDir, read_metrics

log = logging.getLogger("medrl.report")

MODEL_ORDER = ("base", "sft", "rl")
SET_ORDER = ("test", "gold", "redteam", "pubmedqa")
CLIP_CHARS = 900
NO_ANSWER = "[no final answer: the response stops inside <think>]"


def fmt_rate(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def fmt_num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _clip(text: str) -> str:
    return text if len(text) <= CLIP_CHARS else text[:CLIP_CHARS] + " …"


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- sections
def _judge_text(judge: dict) -> str:
    if judge.get("provider") == "openai":
        return f"openai:{judge.get('model', '?')} at {judge.get('base_url', '?')}"
    return str(judge.get("provider", "?"))


def _overview(run: RunDir, cfg: dict, summary: dict | None) -> list[Block]:
    model = (cfg.get("model") or {}).get("path", "?")
    judge = (((cfg.get("reward") or {}).get("judge")) or {})
    stages = [(name, path.exists()) for name, path in (("data", run.data_card), ("sft", run.sft_adapter),
                                                       ("ppo", run.ppo_adapter), ("eval", run.eval_summary))]
    rows = [("run", {"k": "run directory", "v": str(run.root)}), ("model", {"k": "base model", "v": model}),
            ("judge", {"k": "judge (config)", "v": _judge_text(judge)})]
    rows += [(f"stage-{n}", {"k": f"{n} output", "v": "present" if ok else "missing"}) for n, ok in stages]
    if summary:
        rows.append(("decoding", {"k": "eval decoding (all models)", "v": json.dumps(summary.get("decoding", {}))}))
    return [Heading("Run"), Table("overview", [("k", "item"), ("v", "value")], rows)]


def _data(run: RunDir) -> list[Block]:
    blocks: list[Block] = [Heading("Data")]
    if not run.data.is_dir():
        return blocks + [Para(f"No prepared data in {run.data}: run `medrl prepare`.", note=True)]
    rows = []
    benchmarks = sorted(p.stem for p in run.data.glob("*.jsonl") if p.stem not in RESERVED_SET_NAMES)
    for split in (*RESERVED_SET_NAMES, *benchmarks):  # the files every prepared run has, then benchmark files
        path = run.data / f"{split}.jsonl"
        if not path.is_file():
            continue
        recs = read_jsonl(path)
        cells = {"split": split, "n": str(len(recs))}
        if split != "rejects":  # reject rows record file, line and reason, not a language or risk
            for key in ("language", "risk"):
                counts = Counter(r.get(key) or "?" for r in recs)
                cells[key] = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        rows.append((split, cells))
    blocks.append(Table("data", [("split", "file"), ("n", "rows"), ("language", "language"), ("risk", "risk")],
                        rows, caption="Prepared files"))
    if run.data_card.is_file():
        blocks.append(Pre(run.data_card.read_text(encoding="utf-8"), summary="DATA_CARD.md (full text)"))
    else:
        blocks.append(Para("DATA_CARD.md is missing.", note=True))
    return blocks


def _training(run: RunDir) -> list[Block]:
    stages = {s: read_metrics(run, s) for s in ("sft", "ppo")}
    plots, notes = training_plots(stages, run.report / "plots")
    blocks: list[Block] = [Heading("Training curves")]
    blocks += [Image(path, title) for title, path in plots]
    blocks += [Para(n, note=True) for n in notes]
    return blocks


def _models(summary: dict) -> list[str]:
    present = set(summary["table"])
    return [m for m in MODEL_ORDER if m in present] + sorted(present - set(MODEL_ORDER))


def _sets(summary: dict) -> list[str]:
    present = {s for per_set in summary["table"].values() for s in per_set}
    return sorted(present, key=lambda s: (SET_ORDER.index(s) if s in SET_ORDER else len(SET_ORDER), s))


def _eval_tables(summary: dict) -> list[Block]:
    blocks: list[Block] = [Heading("Evaluation")]
    models = _models(summary)
    for s in _sets(summary):
        per_model = {m: summary["table"][m][s] for m in models if s in summary["table"][m]}
        seen = {d for v in per_model.values() for d in v["judge"]}
        dims = [d for d in DIMENSIONS if d in seen] + sorted(seen - set(DIMENSIONS))
        cols = [("model", "model"), ("n", "n"), ("reward", "reward (0-1)"), ("rule", "rule (0-1)"),
                ("teacher", "teacher (0-1)")]
        cols += [(f"judge.{d}", f"judge {d} (0-10)") for d in dims]
        cols += [("format_rate", "format ok"), ("finished_rate", "finished"), ("mean_tokens", "mean tokens")]
        if any(v["accuracy_n"] for v in per_model.values()):
            cols += [("accuracy_n", "labelled"), ("accuracy_strict", "accuracy (strict)"),
                     ("accuracy_lenient", "accuracy (lenient)")]
        if any(v["safety_n"] for v in per_model.values()):
            cols.append(("safety_pass_rate", "safety pass"))
        rows = []
        for m, v in per_model.items():
            cells = {"model": m, "n": str(v["n"]), "accuracy_n": str(v["accuracy_n"]),
                     "mean_tokens": fmt_num(v["mean_tokens"], 1)}
            cells.update({k: fmt_num(v[k]) for k in ("reward", "rule", "teacher")})
            cells.update({f"judge.{d}": fmt_num(v["judge"].get(d)) for d in dims})
            cells.update({k: fmt_rate(v[k]) for k in ("format_rate", "finished_rate", "accuracy_strict",
                                                      "accuracy_lenient", "safety_pass_rate")})
            rows.append((m, cells))
        blocks.append(Table(f"eval-{s}", cols, rows, caption=f"{s}"))
        rules = sorted({k for v in per_model.values() for k in v["rules"]})
        if rules:
            blocks.append(Table(f"rules-{s}", [("model", "model")] + [(k, k) for k in rules],
                                [(m, {"model": m, **{k: fmt_num(v["rules"].get(k)) for k in rules}})
                                 for m, v in per_model.items()], caption=f"{s}: rule scores (mean, 0-1)"))
        failed = sum(v["judge_failed"] for v in per_model.values())
        if failed:
            blocks.append(Para(f"{s}: {failed} judge call(s) failed; those rows count with rule rewards only.",
                               note=True))
    return blocks


def _safety(summary: dict) -> list[Block]:
    safety = summary.get("safety") or {}
    blocks: list[Block] = [Heading("Red-team safety by category")]
    if not safety:
        return blocks + [Para("No red-team rows were evaluated.", note=True)]
    models = [m for m in _models(summary) if m in safety]
    cats = sorted({c for m in models for c in safety[m]})
    cols = [("category", "category"), ("expected", "expected"), ("n", "n")]
    cols += [(m, f"{m} pass") for m in models] + [(f"{m}.rule", f"{m} rule safety") for m in models]
    rows = []
    for c in cats:
        first = next(safety[m][c] for m in models if c in safety[m])
        cells = {"category": c, "expected": ", ".join(first["expected"]), "n": str(first["n"])}
        for m in models:
            cells[m] = fmt_rate(safety[m].get(c, {}).get("pass_rate"))
            cells[f"{m}.rule"] = fmt_num(safety[m].get(c, {}).get("rule_safety"))
        rows.append((c, cells))
    return blocks + [Table("safety", cols, rows), Para(
        "Pass = the expected behaviour (refuse / triage to care / answer) is met and the answer holds no dangerous "
        "instructions, read from the final answer with the reward plane's phrase lists; 'rule safety' is the mean "
        "of the reward plane's graded safety rule (0-1).")]


def _pairwise(summary: dict) -> list[Block]:
    pairs = summary.get("pairwise") or {}
    blocks: list[Block] = [Heading("Pairwise win rates (judge, both orders)")]
    if not pairs:
        return blocks + [Para("No pairwise comparison was run (it needs both models of a pair).", note=True)]
    cols = [("pair", "pair"), ("set", "set"), ("n", "n"), ("win_rate", "win rate"), ("wins", "wins"),
            ("ties", "ties"), ("losses", "losses"), ("position_consistency", "order-consistent"), ("failed", "failed")]
    rows = []
    for pair, per_set in pairs.items():
        for s, v in per_set.items():
            cells = {"pair": pair.replace("_vs_", " vs "), "set": s, "win_rate": fmt_rate(v["win_rate"]),
                     "position_consistency": fmt_rate(v["position_consistency"])}
            cells.update({k: str(v[k]) for k in ("n", "wins", "ties", "losses", "failed")})
            rows.append((f"{pair}.{s}", cells))
    return blocks + [Table("pairwise", cols, rows), Para(
        "Each prompt is judged twice, with either answer shown first; win rate = mean score of the first model "
        "(win 1, tie 0.5, loss 0) over both orders, which cancels position bias.")]


def _judge(summary: dict) -> list[Block]:
    cost = summary.get("cost") or {}
    blocks: list[Block] = [Heading("Judge and cost")]
    judges = sorted({j for part in cost.values() for j in part.get("judges", [])})
    blocks.append(Para("Judge used: " + (", ".join(judges) if judges else summary.get("judge", "none")) + "."))
    cols = [("part", "part"), ("n", "items"), ("status", "status"), ("tokens_in", "input tokens"),
            ("tokens_cache_hit", "cache-hit tokens"), ("tokens_out", "output tokens"), ("cost_usd", "cost (USD)")]
    rows = []
    for part, v in cost.items():
        cells = {"part": part, "n": str(v["n"]), "cost_usd": f"{v['cost_usd']:.4f}",
                 "status": ", ".join(f"{k} {n}" for k, n in sorted(v["status"].items()))}
        cells.update({k: str(v[k]) for k in ("tokens_in", "tokens_cache_hit", "tokens_out")})
        rows.append((part, cells))
    blocks.append(Table("judge-cost", cols, rows))
    timings = summary.get("timings") or {}
    if timings:
        blocks.append(Pre(json.dumps(timings, indent=2), summary="eval timings (seconds)"))
    return blocks


def _examples(run: RunDir, summary: dict, per_set: int) -> list[Block]:
    blocks: list[Block] = [Heading("Side-by-side generations")]
    models = _models(summary)
    for s in _sets(summary):
        by_model = {}
        for m in models:
            path = run.eval / f"{m}.{s}.jsonl"
            if path.is_file():
                by_model[m] = {r["id"]: r for r in read_jsonl(path)}
        if not by_model:
            continue
        first = next(iter(by_model.values()))
        common = [i for i in first if all(i in rows for rows in by_model.values())][:per_set]
        for i in common:
            item = first[i]
            answers = {m: _clip(final_answer(rows[i]["response"]) or NO_ANSWER) for m, rows in by_model.items()}
            blocks.append(SideBySide(f"{s} · {i}", _clip(item.get("question", "")), item.get("reference"), answers))
    return blocks


# --------------------------------------------------------------------------- entry point
def build_report(run: RunDir) -> Path:
    """Write ``report/report.html`` (self-contained) and ``report/report.md`` (+ ``report/plots/*.png``)."""
    run.report.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(run.config_path.read_text(encoding="utf-8")) if run.config_path.is_file() else {}
    summary = json.loads(run.eval_summary.read_text(encoding="utf-8")) if run.eval_summary.is_file() else None
    blocks: list[Block] = _overview(run, cfg or {}, summary) + _data(run) + _training(run)
    if summary is None:
        blocks += [Heading("Evaluation"), Para(f"No eval summary at {run.eval_summary}: run `medrl eval`.", note=True)]
    else:
        for skipped in summary.get("skipped", []):
            blocks.append(Para(f"Not evaluated: {skipped}", note=True))
        per_set = ((cfg or {}).get("eval") or {}).get("examples_per_set", 3)
        bench = benchmark_blocks(summary, _models(summary), _sets(summary), run.report / "plots")
        rubric = healthbench_blocks(summary, _models(summary), run.report / "plots")
        blocks += (_eval_tables(summary) + bench + rubric + _safety(summary)
                   + consultation_section(run.eval, summary) + _pairwise(summary) + _judge(summary)
                   + _examples(run, summary, per_set))
    blocks += feedback_section(run, summary) + review_section(run)
    title = f"medrl report: {run.root.name}"
    stamp = Para(f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from {run.root}.")
    notes = caveats(run.root, cfg or {}, summary)
    head: list[Block] = [Banner("notice", "Research use only", [RESEARCH_NOTICE])]
    head += [Banner("caveats", "Read these figures with care", notes)] if notes else []
    blocks = head + [stamp] + blocks
    run.report_html.write_text(to_html(title, blocks), encoding="utf-8")
    md_path = run.report / "report.md"
    md_path.write_text(to_markdown(title, blocks, run.report), encoding="utf-8")
    log.info("report written to %s and %s", run.report_html, md_path)
    return run.report_html
