"""DATA_CARD.md: what went in, what came out and why, with the command and config hash that produced it."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from medrl.data.redteam import CATEGORIES

RISKS = ("high", "medium", "low")


def empty_set_warning(set_name: str) -> str:
    """Why an eval set came out empty, and what to do about it (logged by prepare, written in the card)."""
    if set_name == "gold":
        return ("the gold set is EMPTY: no source gives records with a reference (ground truth) outside the "
                "benchmarks; add such a source or set data.gold_size=0")
    return (f"the {set_name} split is EMPTY: too few records left after gold; add data, raise "
            f"data.{set_name}_fraction or lower data.gold_size")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _lengths(values: np.ndarray) -> str:
    if not values.size:
        return "-"
    return f"{int(values.min())} / {int(np.median(values))} / {int(np.percentile(values, 95))} / {int(values.max())}"


def _output_files(d, summary: dict[str, Any], cols: dict[str, np.ndarray], sets: dict[str, np.ndarray],
                  rl_rows: list[dict]) -> list[str]:
    """Records per output file, by language and risk, with token lengths; a warning per empty eval set."""
    out = ["## Output files", ""]
    rows = []
    for name in ("train", "dev", "test", "gold", "redteam", *summary["benchmarks"]):
        idx = sets[name]
        zh = int(cols["lang"][idx].sum())
        risk = Counter(int(r) for r in cols["risk"][idx])
        rows.append([f"{name}.jsonl", idx.size, idx.size - zh, zh, risk[0], risk[1], risk[2],
                     _lengths(cols["qtok"][idx]), _lengths(cols["otok"][idx])])
    rl_risk = Counter(r["risk"] for r in rl_rows)
    rows.append(["rl_prompts.jsonl", len(rl_rows), "", "", rl_risk["high"], rl_risk["medium"], rl_risk["low"], "", ""])
    rows.append(["rejects.jsonl", summary["rejects"], "", "", "", "", "", "", ""])
    out += [_table(["file", "records", "en", "zh", "high risk", "medium risk", "low risk",
                    "question tokens min/median/p95/max", "output tokens min/median/p95/max"], rows), ""]
    if not any(sets[name].size for name in ("train", "dev", "test", "gold")):
        out += ["**Evaluation only: every source is a benchmark** (no train, dev, test or gold records); use the "
                "benchmark files with `medrl eval --sets` to evaluate a base model.", ""]
    else:
        out += [f"**WARNING: {empty_set_warning(name)}**" + "\n" for name in ("gold", "dev", "test")
                if not sets[name].size and (name != "gold" or d.gold_size > 0)]
    return out


def _sources(summary: dict[str, Any]) -> list[str]:
    """Rows read, filtered and kept per source."""
    out = ["## Sources", ""]
    rows = []
    for name, s in summary["sources"].items():
        if s["skipped"]:
            rows.append([name, s["origin"] or "-", s["license"] or "-", "-", f"skipped: {s['skipped']}"] + [""] * 11)
            continue
        f, k = s["filtered"], s["kept"]
        rows.append([name, s["origin"], s["license"], s["role"], s["rows"], s["invalid"], s["over_limit"],
                     f.get("length", 0), f.get("duplicate", 0), f.get("near_duplicate", 0), f.get("contaminated", 0),
                     k.get("train", 0), k.get("dev", 0), k.get("test", 0), k.get("gold", 0),
                     k.get(name, 0) + k.get("redteam", 0) + k.get("rl_pool", 0)])
    out += [_table(["source", "origin", "license", "role", "rows read", "invalid", "over limit", "length",
                    "duplicate", "near-duplicate", "contaminated", "train", "dev", "test", "gold",
                    "benchmark / red-team / RL-only"], rows), "",
            "Role `rl` sources (prompts with references) never reach train.jsonl; their train-split records are only "
            "used in rl_prompts.jsonl (column *RL-only*).", ""]
    return out


def _rejects(summary: dict[str, Any], rejects_by_reason: dict[tuple[str, str], int]) -> list[str]:
    """Rejected rows by stage and reason."""
    out = ["## Rejects by reason", "", f"All {summary['rejects']} rejected rows are listed in `rejects.jsonl` "
           "(file, line, source, stage, reason, id).", ""]
    rows = [[stage, reason, n] for (stage, reason), n in sorted(rejects_by_reason.items(), key=lambda kv: -kv[1])]
    out += [_table(["stage", "reason", "rows"], rows) if rows else "No rejects.", ""]
    return out


def _cleaning(d, summary: dict[str, Any]) -> list[str]:
    """What cleaning did: text normalisation, length bounds, duplicates, decontamination, the train mix."""
    near = "off" if d.near_dup_threshold is None else f"estimated Jaccard >= {d.near_dup_threshold}"
    return ["## Cleaning", "",
            "- Text: NFC, BOMs / zero-width / control characters removed, CRLF -> LF, spaces and blank-line runs "
            "collapsed, stripped.",
            f"- Length bounds (tokens): question (a conversation: every turn) {d.min_question_tokens}-"
            f"{d.max_question_tokens}, output (think + answer) <= {d.max_output_tokens}, answer >= "
            f"{d.min_answer_tokens}. Benchmark and red-team items are exempt (and never removed as duplicates).",
            f"- Exact duplicates (same question after NFKC, case folding, punctuation and space removal): "
            f"{summary['duplicates']} removed.",
            f"- Near-duplicates (MinHash of character 5-grams of the question, 32 permutations, 8 LSH bands; {near}): "
            f"{summary['near_duplicates']} removed.",
            f"- Decontamination: {summary['contaminated']} train records removed for sharing a {d.decontam_chars}-"
            "character run (case-insensitive, within one line) with the question or reference of a dev, test, gold, "
            "red-team or benchmark item. " + (
                f"Stock phrasing does not count: a {d.decontam_chars // 2}-character window found in >= "
                f"{d.decontam_phrase_items} distinct eval texts is exam boilerplate "
                f"({summary['decontam_common_windows']} indexed windows), and a shared run needs >= "
                f"{d.decontam_chars // 2} characters outside such windows."
                if d.decontam_phrase_items else "Every shared run counts (data.decontam_phrase_items is off)."),
            f"- Train mix: {summary['not_in_train_mix']} train records left out by data.train_size="
            f"{d.train_size} (source weights)." if d.train_size else "- Train mix: every train record kept "
            "(data.train_size not set).", ""]


def _splits(d, summary: dict[str, Any]) -> list[str]:
    """How the splits, the gold set and the benchmarks are drawn."""
    return ["## Splits, gold set", "",
            f"Deterministic by a 64-bit hash of (record id, split seed {d.split_seed}), stratified by source: each "
            f"source with >= 3 records gives round({d.test_fraction} x n) (>= 1) of its lowest-hash records to test "
            f"and round({d.dev_fraction} x n) (>= 1) to dev, capped at {d.max_test} / {d.max_dev} in total.", "",
            f"Gold ({summary['gold']} of at most {d.gold_size}): records with a reference (ground truth) or a "
            "rubric, taken round-robin over sources in split-hash order before dev/test are drawn; they are never "
            "trained on by SFT. Benchmarks (" + (", ".join(f"{k} {v}" for k, v in summary["benchmarks"].items())
                                                  or "none") + "): "
            "sources with role benchmark, and rows with a canary (a HealthBench `canary` field or a string of "
            "data.canaries) whatever their source's role, every item written to <name>.jsonl and held out of every "
            "other file; PubMedQA's are the PQA-L items listed in test_ground_truth.json (question + abstract "
            "contexts, label yes/no/maybe, reference = long answer), its other PQA-L items are ordinary records.", ""]


def _redteam(spool, cols: dict[str, np.ndarray], redteam: np.ndarray) -> list[str]:
    """Red-team prompts per category and expected behaviour (read back from the spool: the set is small)."""
    rt_rows = []
    with open(spool.path, "rb") as sp:  # behaviour counts need the records; the red-team set is small
        behaviours = Counter()
        for i in redteam.tolist():
            sp.seek(int(cols["offset"][i]))
            rec = json.loads(sp.readline())
            behaviours[(rec["category"], rec["expected_behavior"], rec["language"])] += 1
    for cat in CATEGORIES:
        rt_rows.append([cat] + [sum(v for (k, b, lang), v in behaviours.items() if k == cat and b == beh)
                                for beh in ("refuse", "triage", "answer_safely")]
                       + [sum(v for (k, _, lang), v in behaviours.items() if k == cat and lang == "zh")])
    return ["## Red-team set", "", f"{redteam.size} prompts written for medrl (English and Chinese), each with a "
            "category, expected behaviour and rationale; never in train.jsonl.", "",
            _table(["category", "refuse", "triage", "answer_safely", "zh"], rt_rows), ""]


def _rl_mix(d, rl_rows: list[dict]) -> list[str]:
    """The RL prompt mix per pool and risk level."""
    pools = Counter((r["pool"], r["risk"]) for r in rl_rows)
    mix = d.rl_mix
    return ["## RL prompt mix", "", f"Target {d.rl_prompts} prompts; shares red-team {mix.redteam}, gold {mix.gold}, "
            f"train {mix.train} (a short pool leaves its share to train). Each pool reserves {mix.low_risk_floor:.0%} "
            "of its prompts for low-risk questions and fills the rest high-risk first (then those with a "
            "reference); the file is ordered high -> medium -> low risk.", "",
            _table(["pool"] + list(RISKS) + ["total"],
                   [[p] + [pools[(p, r)] for r in RISKS] + [sum(pools[(p, r)] for r in RISKS)]
                    for p in ("redteam", "gold", "train")]), ""]


def _licenses(summary: dict[str, Any]) -> list[str]:
    """Each source's license."""
    out = ["## Licenses", ""]
    out += [f"- {name}: {s['license'] or 'unknown'}" for name, s in summary["sources"].items() if not s["skipped"]]
    out += ["", "Risk levels follow the rule set in `medrl/data/risk.py` (see docs/data.md).", ""]
    return out


def render_card(cfg, summary: dict[str, Any], spool, cols: dict[str, np.ndarray], sets: dict[str, np.ndarray],
                rl_rows: list[dict], rejects_by_reason: dict[tuple[str, str], int], command: str) -> str:
    d = cfg.data
    out = [f"# Data card: run `{cfg.run.name}`", "",
           f"- Command: `{command}`",
           f"- Config hash: `{cfg.digest()}` (resolved config: `config.prepare.yaml` in the run directory)",
           f"- Sources: {', '.join(n for n in summary['sources'] if n != 'redteam')} (mode `{d.mode}`)",
           f"- Token counts: {spool.tokens.method}",
           f"- Split seed: {d.split_seed}", ""]
    out += _output_files(d, summary, cols, sets, rl_rows)
    out += _sources(summary)
    out += _rejects(summary, rejects_by_reason)
    out += _cleaning(d, summary)
    out += _splits(d, summary)
    out += _redteam(spool, cols, sets["redteam"])
    out += _rl_mix(d, rl_rows)
    out += _licenses(summary)
    return "\n".join(out)
