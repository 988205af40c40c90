"""Eval metrics from saved generation rows (pure functions: no model, Ray or network code).

An eval row (one line of ``<run>/eval/<model>.<set>.jsonl``) holds the item, the response and its scores::

    id, set, model, language, risk, category, expected_behavior, label, options, question, reference,
    response, response_tokens, finished,
    reward, rule, teacher (floats, null when absent), rules ({rule: score in [0, 1]}),
    judge ({"id", "status", "scores": {dimension: score in [0, 1]} | null, "tokens_in", "tokens_out",
            "tokens_cache_hit", "cost_usd"})

``annotate`` adds what is read from the response (format, extracted answers, safety behaviour); ``summarize``
aggregates annotated rows per model and set. A pairwise row (``pairwise.<a>_vs_<b>.jsonl``) holds the judge's verdict
in both presentation orders: ``verdict_ab`` (``a`` shown as answer A) and ``verdict_ba`` (``b`` shown as answer A),
each ``"A"``, ``"B"``, ``"tie"`` or null (failed), and the same ``judge`` cost fields as an eval row.
"""
from __future__ import annotations

import math
from collections import defaultdict
from statistics import fmean

from medrl.evaluation.healthbench import healthbench_summary
from medrl.reward.extract import (classify_behavior, extract_choice, extract_yes_no_maybe, has_think_format,
                                      safety_pass)

YES_NO_MAYBE = ("yes", "no", "maybe")


def annotate(row: dict) -> dict:
    """The row plus ``format_ok``, extracted answers and correctness (items labelled with an option letter or a
    PubMedQA verdict), and the safety behaviour with ``safety_pass`` (items with an ``expected_behavior``). Fields
    that do not apply are None."""
    out = dict(row)
    text = row["response"]
    out["format_ok"] = has_think_format(text)
    label, options = row.get("label"), row.get("options")
    if label is not None and not options:
        label = label.strip().lower()
        if label not in YES_NO_MAYBE:
            label = None  # neither an option letter nor a PubMedQA verdict: nothing to extract
    preds: dict[str, str | None] = {"strict": None, "lenient": None}
    if label is not None:
        for mode in preds:
            preds[mode] = (extract_choice(text, options, mode, multi=len(label) > 1) if options
                           else extract_yes_no_maybe(text, mode))
    out["pred_strict"], out["pred_lenient"] = preds["strict"], preds["lenient"]
    out["correct_strict"] = None if label is None else preds["strict"] == label
    out["correct_lenient"] = None if label is None else preds["lenient"] == label
    expected = row.get("expected_behavior")
    out["behavior"] = classify_behavior(text) if expected else None
    out["safety_pass"] = safety_pass(expected, out["behavior"]) if expected else None
    return out


Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k / n (95% by default); None when n is 0."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(a: tuple[float, tuple[float, float]], b: tuple[float, tuple[float, float]]
                        ) -> tuple[float, float]:
    """95% interval of p_a - p_b from each proportion and its Wilson interval (Newcombe's hybrid score method 10;
    it treats the two as independent, so for two models on the same items it errs on the wide side)."""
    (pa, (la, ua)), (pb, (lb, ub)) = a, b
    d = pa - pb
    return d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2), d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)


def _interval(flags: list[bool]) -> list[float] | None:
    ci = wilson_interval(sum(1 for f in flags if f), len(flags))
    return None if ci is None else [round(ci[0], 4), round(ci[1], 4)]


def _mean(values: list[float]) -> float | None:
    return round(fmean(values), 4) if values else None


def _rate(flags: list[bool]) -> float | None:
    return _mean([1.0 if f else 0.0 for f in flags])


def set_metrics(rows: list[dict]) -> dict:
    """Aggregates of annotated rows of one model on one set."""
    judged = [r["judge"]["scores"] for r in rows if (r.get("judge") or {}).get("scores")]
    dims = sorted({d for s in judged for d in s})
    rule_names = sorted({k for r in rows for k in (r.get("rules") or {})})
    labelled = [r for r in rows if r.get("correct_strict") is not None]
    safety = [r["safety_pass"] for r in rows if r.get("safety_pass") is not None]
    return {
        "n": len(rows),
        **{k: _mean([r[k] for r in rows if r.get(k) is not None]) for k in ("reward", "rule", "teacher")},
        "judge": {d: _mean([s[d] for s in judged if d in s]) for d in dims},
        "judge_n": len(judged),
        "judge_failed": sum(1 for r in rows if (r.get("judge") or {}).get("status") == "failed"),
        "judge_cost_usd": round(sum((r.get("judge") or {}).get("cost_usd", 0.0) for r in rows), 6),
        "rules": {k: _mean([r["rules"][k] for r in rows if k in (r.get("rules") or {})]) for k in rule_names},
        "format_rate": _rate([r["format_ok"] for r in rows]),
        "finished_rate": _rate([bool(r.get("finished")) for r in rows]),
        "mean_tokens": _mean([r["response_tokens"] for r in rows]),
        "accuracy_n": len(labelled),
        "accuracy_strict": _rate([r["correct_strict"] for r in labelled]),
        "accuracy_lenient": _rate([r["correct_lenient"] for r in labelled]),
        "accuracy_strict_ci": _interval([r["correct_strict"] for r in labelled]),
        "accuracy_lenient_ci": _interval([r["correct_lenient"] for r in labelled]),
        "correct_strict": sum(1 for r in labelled if r["correct_strict"]),
        "correct_lenient": sum(1 for r in labelled if r["correct_lenient"]),
        "safety_n": len(safety),
        "safety_pass_rate": _rate(safety),
    }


def safety_by_category(rows: list[dict]) -> dict[str, dict]:
    """Red-team pass rate per category (rows with an expected behaviour), plus the mean rule ``safety`` score when
    the reward plane produced one (the classifier in ``extract`` decides pass/fail, independent of the reward)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("safety_pass") is not None:
            groups[r.get("category") or "uncategorised"].append(r)
    out = {}
    for cat in sorted(groups):
        rs = groups[cat]
        rule = [r["rules"]["safety"] for r in rs if "safety" in (r.get("rules") or {})]
        out[cat] = {"n": len(rs), "expected": sorted({r["expected_behavior"] for r in rs}),
                    "pass_rate": _rate([r["safety_pass"] for r in rs]), "rule_safety": _mean(rule)}
    return out


_A_FIRST = {"A": "a", "B": "b", "tie": "tie"}  # verdict_ab: model a was shown as answer A
_B_FIRST = {"A": "b", "B": "a", "tie": "tie"}  # verdict_ba: model b was shown as answer A
_POINTS = {"a": 1.0, "tie": 0.5, "b": 0.0}


def pairwise_score(row: dict) -> float | None:
    """Score of model ``a`` on one item: each order gives 1 (a preferred), 0.5 (tie) or 0 (b preferred); the mean
    over the orders that did not fail (None when both failed)."""
    winners = [order[v] for v, order in ((row.get("verdict_ab"), _A_FIRST), (row.get("verdict_ba"), _B_FIRST))
               if v is not None]
    return fmean(_POINTS[w] for w in winners) if winners else None


def pairwise_summary(rows: list[dict]) -> dict:
    """Win rate of ``a`` over ``b`` (ties count half) from both presentation orders; ``position_consistency`` is the
    share of items judged in both orders whose two verdicts name the same winner (or both say tie)."""
    scored = [s for r in rows if (s := pairwise_score(r)) is not None]
    both = [r for r in rows if r.get("verdict_ab") is not None and r.get("verdict_ba") is not None]
    return {
        "n": len(scored),
        "failed": len(rows) - len(scored),
        "wins": sum(1 for s in scored if s > 0.5),
        "ties": sum(1 for s in scored if s == 0.5),
        "losses": sum(1 for s in scored if s < 0.5),
        "win_rate": _mean(scored),
        "position_consistency": _rate([_A_FIRST[r["verdict_ab"]] == _B_FIRST[r["verdict_ba"]] for r in both]),
    }


COST_FIELDS = ("tokens_in", "tokens_out", "tokens_cache_hit", "cost_usd")


def judge_usage(judges: list[dict]) -> dict:
    """Calls by status, judges seen, tokens and money over ``judge`` dicts of eval or pairwise rows."""
    statuses: dict[str, int] = defaultdict(int)
    for j in judges:
        statuses[j.get("status") or "none"] += 1
    usage = {k: sum(j.get(k) or 0 for j in judges) for k in COST_FIELDS}
    usage["cost_usd"] = round(usage["cost_usd"], 6)
    return {"n": len(judges), "judges": sorted({j["id"] for j in judges if j.get("id")}), "status": dict(statuses),
            **usage}


def summarize(rows: list[dict], pairwise: dict[str, list[dict]] | None = None, grader: str | None = None) -> dict:
    """Per model and set metrics, red-team safety by category per model, pairwise win rates per set, and the
    HealthBench-style scores of rubric sets (``medrl.evaluation.healthbench``; ``grader`` names the rubric grader
    of rows that do not name it).

    ``rows``: annotated eval rows of any models and sets; ``pairwise``: ``{"rl_vs_sft": [pairwise rows]}``."""
    by_model_set: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_model_set[r["model"]][r["set"]].append(r)
    table = {m: {s: set_metrics(rs) for s, rs in sets.items()} for m, sets in by_model_set.items()}
    safety = {m: safety_by_category([r for rs in sets.values() for r in rs]) for m, sets in by_model_set.items()}
    pairs = {}
    for name, prows in (pairwise or {}).items():
        per_set: dict[str, list[dict]] = defaultdict(list)
        for r in prows:
            per_set[r["set"]].append(r)
        pairs[name] = {s: pairwise_summary(rs) for s, rs in sorted(per_set.items())}
        pairs[name]["all"] = pairwise_summary(prows)
    cost = {"scoring": judge_usage([r["judge"] for r in rows if r.get("judge")]),
            "pairwise": judge_usage([r["judge"] for prows in (pairwise or {}).values() for r in prows
                                     if r.get("judge")])}
    return {"table": table, "safety": {m: c for m, c in safety.items() if c}, "pairwise": pairs, "cost": cost,
            "healthbench": healthbench_summary(rows, grader)}
