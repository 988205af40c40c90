"""The teacher-feedback section of the report: what the judge said, over eval sets and PPO samples.

* score distributions per dimension (0-10), one bar group per source (eval models, PPO), as shares;
* judge failures by reason (the reason's head: ``HTTP 503``, ``malformed JSON``, ``empty content``, ``timeout``);
* the most frequent terms in the judge's reasons for low-scoring answers (teacher score < ``LOW_TEACHER``): English
  words (stemmed, stopwords removed) and jieba tokens, the reward plane's ``key_terms``; each term's share among
  the low-scoring reasons and among the others shows what sets the low scores apart;
* scores by risk level and by red-team category;
* spend per PPO step and per useful judgement (scored, paid or cached) vs per paid judgement.

PPO samples (``ppo/samples.jsonl``) carry statuses, scores, reasons and rule flags like eval rows.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from statistics import fmean

from medrl.jsonl import read_jsonl
from medrl.render import Block, Heading, Image, Para, Table
from medrl.report.plots import png_figure
from medrl.review.items import items_from_eval, items_from_ppo
from medrl.reward.rubric import DIMENSIONS
from medrl.reward.text import key_terms
from medrl.runs import RunDir, load_eval_rows, load_ppo_samples, read_metrics

LOW_TEACHER = 0.5
TOP_TERMS = 15
_HEAD = re.compile(r"^(.+?)(?:\s+\(|:|$)")


def reason_head(reason: str) -> str:
    """The kind of a failure reason, without its details: ``HTTP 503 (client retries: 3): ...`` -> ``HTTP 503``."""
    m = _HEAD.match(reason.strip())
    return (m.group(1) if m else reason).strip() or "(no reason given)"


def _part(it: dict) -> str:
    return "ppo" if it["source"] == "ppo" else f"eval {it['model']}"


def _mean(values) -> str:
    values = list(values)
    return f"{fmean(values):.2f}" if values else "–"


# --------------------------------------------------------------------------- blocks
def _distributions(items: list[dict], out: Path) -> Image | None:
    parts = sorted({_part(it) for it in items if any(v is not None for v in it["judge_scores"].values())})
    if not parts:
        return None
    width = 0.8 / len(parts)
    with png_figure(out, 2, 2, figsize=(9, 5.6), sharey=True) as axes:
        for ax, d in zip(axes.flat, DIMENSIONS):
            for k, p in enumerate(parts):
                vals = [it["judge_scores"][d] for it in items if _part(it) == p and it["judge_scores"][d] is not None]
                counts = Counter(vals)
                ax.bar([x - 0.4 + width * (k + 0.5) for x in range(11)],
                       [counts[x] / len(vals) if vals else 0 for x in range(11)], width=width, label=p)
            ax.set_title(d)
            ax.set_xticks(range(11))
            ax.grid(alpha=0.3, axis="y")
        axes[0][0].set_ylabel("share of judged answers")
        axes[0][0].legend(fontsize=7)
    return Image(out, "Judge score distributions per dimension (0-10)")


def _failures(items: list[dict], pairwise: list[dict]) -> Table | Para:
    counts: Counter = Counter()
    for it in items:
        if it["judge_status"] in ("failed", "over_budget"):
            reason = it["judge_reason"] or ("budget cap reached" if it["judge_status"] == "over_budget" else
                                            "(reason not logged)")
            counts[("ppo" if it["source"] == "ppo" else "eval", it["judge_status"], reason_head(reason))] += 1
    for r in pairwise:
        for order in ("ab", "ba"):
            if r.get(f"verdict_{order}") is None:
                counts[("pairwise", "failed", reason_head(r.get(f"reason_{order}") or ""))] += 1
    rows = [(f"{p}.{s}.{why}", {"part": p, "status": s, "reason": why, "n": str(n)})
            for (p, s, why), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    if not rows:
        return Para("Judge failures: none (every judgement of the eval sets, pairwise and PPO samples succeeded or "
                    "was not needed).")
    return Table("feedback-failures", [("part", "part"), ("status", "status"), ("reason", "reason"), ("n", "count")],
                 rows, caption="Judge failures by reason")


def _reason_terms(reason: str) -> set[str]:
    """Words and jieba tokens of a reason, numbers left out (scores and counts, not feedback)."""
    return {t for t in key_terms(reason, 64) if not t.replace(".", "").isdigit()}


def _terms(items: list[dict]) -> Table | Para:
    judged = [it for it in items if it["teacher"] is not None and it["judge_reason"]]
    low = [it for it in judged if it["teacher"] < LOW_TEACHER]
    if not low:
        return Para(f"No judged answer with a reason scored below {LOW_TEACHER} (teacher score): no terms to show.",
                    note=True)
    others = [it for it in judged if it["teacher"] >= LOW_TEACHER]
    in_low = Counter(t for it in low for t in _reason_terms(it["judge_reason"]))
    in_others = Counter(t for it in others for t in _reason_terms(it["judge_reason"]))
    top = sorted(in_low.items(), key=lambda kv: (-kv[1], -(kv[1] / len(low) - in_others[kv[0]] / max(1, len(others))),
                                                 kv[0]))[:TOP_TERMS]
    rows = [(term, {"term": term, "n": str(n), "low": f"{100 * n / len(low):.1f}%",
                    "others": f"{100 * in_others[term] / len(others):.1f}%" if others else "–"}) for term, n in top]
    return Table("feedback-terms", [("term", "term"), ("n", "low-scoring reasons"), ("low", "share (low)"),
                                    ("others", "share (others)")], rows,
                 caption=f"Most frequent terms in the judge's reasons for low-scoring answers (teacher < "
                         f"{LOW_TEACHER}; {len(low)} low, {len(others)} others)")


def _by_group(items: list[dict], key: str, table_id: str, caption: str) -> Table | Para:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for it in items:
        if it["teacher"] is not None and it.get(key):
            groups[(it[key], _part(it))].append(it)
    cols = [(key, key.replace("_", " ")), ("part", "source"), ("n", "judged"), ("teacher", "teacher (0-1)")]
    cols += [(d, d) for d in DIMENSIONS]
    rows = []
    for (g, p), its in sorted(groups.items()):
        cells = {key: g, "part": p, "n": str(len(its)), "teacher": f"{fmean(it['teacher'] for it in its):.3f}"}
        cells.update({d: _mean(it["judge_scores"][d] for it in its if it["judge_scores"][d] is not None)
                      for d in DIMENSIONS})
        rows.append((f"{g}.{p}", cells))
    if not rows:
        return Para(f"{caption}: no judged answer has a {key.replace('_', ' ')}.", note=True)
    return Table(table_id, cols, rows, caption=caption)


def _spend(summary: dict | None, items: list[dict], ppo_metrics: list[dict], out: Path) -> list[Block]:
    parts = {}
    for name, v in ((summary or {}).get("cost") or {}).items():
        st = v.get("status", {})
        parts[f"eval {name}"] = (st.get("ok", 0), st.get("cached", 0), st.get("failed", 0) + st.get("over_budget", 0),
                                 v.get("cost_usd", 0.0))
    ppo = [it for it in items if it["source"] == "ppo"]
    if ppo or ppo_metrics:
        st = Counter(it["judge_status"] for it in ppo)
        parts["ppo"] = (st["ok"], st["cached"], st["failed"] + st["over_budget"],
                        sum(m.get("judge_cost_usd") or 0.0 for m in ppo_metrics))
    rows = []
    for name, (paid, cached, failed, cost) in parts.items():
        useful = paid + cached
        rows.append((name, {"part": name, "paid": str(paid), "cached": str(cached), "failed": str(failed),
                            "cost": f"{cost:.4f}", "per_useful": f"{cost / useful:.6f}" if useful else "–",
                            "per_paid": f"{cost / paid:.6f}" if paid else "–",
                            "cache_share": f"{100 * cached / useful:.1f}%" if useful else "–"}))
    blocks: list[Block] = [Table("feedback-spend", [
        ("part", "part"), ("paid", "paid judgements"), ("cached", "cached"), ("failed", "failed / over budget"),
        ("cost", "cost (USD)"), ("per_useful", "USD per useful judgement"), ("per_paid", "USD per paid judgement"),
        ("cache_share", "cached share")], rows, caption="Judge spend (useful = scored, paid or from the cache)")]
    if any("judge_cost_usd" in m for m in ppo_metrics):
        blocks.append(_spend_plot(ppo_metrics, ppo, out))
    return blocks


def _spend_plot(ppo_metrics: list[dict], ppo: list[dict], out: Path) -> Image:
    cost = {m["step"]: m["judge_cost_usd"] for m in ppo_metrics if "judge_cost_usd" in m}
    steps = sorted(cost)
    status = defaultdict(Counter)
    for it in ppo:
        status[it["step"]][it["judge_status"]] += 1
    with png_figure(out, 1, 2, figsize=(9, 3.4)) as (ax1, ax2):
        ax1.bar(steps, [cost[s] for s in steps], label="per step")
        cumulative, total = [], 0.0
        for s in steps:
            total += cost[s]
            cumulative.append(total)
        ax1.plot(steps, cumulative, color="C3", marker="o", markersize=3, label="cumulative")
        ax1.set_title("PPO judge spend (USD)")
        ax1.set_xlabel("step")
        ax1.legend(fontsize=7)
        for k, (st, label) in enumerate((("ok", "paid"), ("cached", "cached"), ("failed", "failed"))):
            ax2.plot(steps, [status[s][st] for s in steps], marker="o", markersize=3, label=label, color=f"C{k}")
        ax2.set_title("PPO judgements per step")
        ax2.set_xlabel("step")
        ax2.legend(fontsize=7)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
    return Image(out, "PPO judge spend and judgements per step")


def feedback_section(run: RunDir, summary: dict | None) -> list[Block]:
    """The report's "Teacher feedback" blocks for the run (eval rows and PPO samples, whatever exists)."""
    blocks: list[Block] = [Heading("Teacher feedback")]
    items = items_from_eval(load_eval_rows(run)) + items_from_ppo(*load_ppo_samples(run))
    if not items:
        return blocks + [Para("No eval generations or PPO samples yet: nothing the judge said to analyse.", note=True)]
    pairwise = [r for p in sorted(run.eval.glob("pairwise.*.jsonl")) for r in read_jsonl(p)]
    plot = _distributions(items, run.report / "plots" / "judge_scores.png")
    blocks.append(plot or Para("No judge scores in the eval rows or PPO samples (judge disabled?).", note=True))
    blocks.append(_failures(items, pairwise))
    blocks.append(_terms(items))
    blocks.append(_by_group(items, "risk", "feedback-risk", "Judge scores by risk level"))
    blocks.append(_by_group(items, "category", "feedback-category", "Judge scores by red-team category"))
    blocks += _spend(summary, items, read_metrics(run, "ppo"), run.report / "plots" / "judge_spend.png")
    return blocks
