"""``medrl review export RUN_DIR`` and ``medrl review import FILE``: the clinician review package of a run.

Export writes ``<run>/review/``: ``items.jsonl`` (every field of the chosen items, the package's manifest),
``package.json`` (id, counts, options), and what the reviewer fills in: ``review.csv``, ``review.xlsx`` and
``review.html`` (self-contained form). Import validates a filled file, adds its labels to ``review/labels.jsonl``
and writes ``review/agreement.json`` (judge vs reviewers, rules vs reviewers, reviewer vs reviewer); ``medrl
report`` shows the same numbers.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

from medrl.errors import UsageError
from medrl.jsonl import read_jsonl
from medrl.review.agreement import agreement
from medrl.review.calibration import meta_eval_agreement, read_meta_eval
from medrl.review.forms import now_iso, read_label_rows, write_csv, write_html, write_xlsx
from medrl.review.items import Quotas, items_from_eval, items_from_ppo, select
from medrl.review.labels import merge_labels, read_labels, validate_rows
from medrl.runs import RunDir, load_eval_rows, load_ppo_samples

log = logging.getLogger("medrl.review")

ITEMS, PACKAGE, LABELS, AGREEMENT = "items.jsonl", "package.json", "labels.jsonl", "agreement.json"
META_EVAL = "meta_eval.json"


def export_review(run: RunDir, quotas: Quotas, *, include_ppo: bool = False, blind: bool = False) -> dict:
    rows = load_eval_rows(run)
    candidates = items_from_eval(rows)
    ppo_n = 0
    if include_ppo:
        samples, prompts = load_ppo_samples(run)
        if not samples:
            raise UsageError(f"--ppo: no PPO samples at {run.ppo_samples} (run `medrl ppo` with ppo.log_samples)")
        ppo_items = items_from_ppo(samples, prompts)
        ppo_n = len(ppo_items)
        candidates += ppo_items
    if not candidates:
        raise UsageError(f"nothing to review in {run.root}: no eval generations in {run.eval} (run `medrl eval`)")
    chosen = select(candidates, quotas)
    out = run.review
    out.mkdir(parents=True, exist_ok=True)
    ids = sorted(it["review_id"] for it in chosen)
    package = {"package_id": f"{run.root.name}-{hashlib.sha256(''.join(ids).encode()).hexdigest()[:8]}",
               "run_dir": str(run.root.resolve()), "created": now_iso(), "items": len(chosen), "blind": blind,
               "candidates": {"eval": len(rows), "ppo": ppo_n},
               "reasons": dict(Counter(r for it in chosen for r in it["reasons"])),
               "models": dict(Counter(it["model"] for it in chosen)), "quotas": quotas.__dict__,
               "grader": _eval_grader(run)}
    with open(out / ITEMS, "w", encoding="utf-8") as f:
        for it in chosen:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    (out / PACKAGE).write_text(json.dumps(package, indent=2, ensure_ascii=False), encoding="utf-8")
    write_csv(out / "review.csv", chosen, blind)
    write_xlsx(out / "review.xlsx", chosen, blind)
    write_html(out / "review.html", chosen, package, blind)
    in_package = set(ids)
    stale = [lab for lab in read_labels(out / LABELS) if lab["review_id"] not in in_package]
    if stale:
        log.warning("%d stored label(s) refer to items not in the new package: kept in %s, not counted",
                    len(stale), out / LABELS)
    log.info("review package %s: %d items (%s) in %s", package["package_id"], len(chosen),
             ", ".join(f"{k} {v}" for k, v in sorted(package["reasons"].items())), out)
    return package


def _eval_grader(run: RunDir) -> str | None:
    """The rubric grader of the run's eval (``eval/summary.json``), shown beside the calibration figures."""
    if not run.eval_summary.is_file():
        return None
    return json.loads(run.eval_summary.read_text(encoding="utf-8")).get("rubric_grader")


def run_meta_eval(cfg, run: RunDir, path: Path, limit: int | None = None) -> dict:
    """Grade the completions of a HealthBench meta-eval file (``calibration.read_meta_eval``) with the configured
    rubric grader (through the reward pool: cached, claimed, rate-limited, budgeted like every verdict) and write
    ``review/meta_eval.json``: macro F1 and balanced accuracy against the physicians' labels, overall and per
    category. Each criterion is shown to the grader as worth +1 point (met = the behaviour it describes is present,
    which is what the physicians labelled); the format gate is off (the completions have no think block)."""
    from medrl.ray_utils import init_ray
    from medrl.reward.pool import RewardPool
    from medrl.reward.preflight import check_judge
    from medrl.reward.types import RewardInput

    rows = read_meta_eval(path, limit)
    grader = cfg.reward.rubric_grader
    if grader is None:
        raise UsageError("meta-eval needs a rubric grader: reward.w_rubric > 0 and reward.judge.provider openai or "
                         "reference")
    reward = cfg.reward.model_copy(update={"rubric": cfg.reward.rubric.model_copy(update={"format_gate": False})})
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r["prompt_id"] or json.dumps(r["prompt"]), r["completion_id"]), []).append(i)
    inputs = [RewardInput(id=f"meta/{n}", prompt=rows[idx[0]]["prompt"][-1]["content"],
                          response=rows[idx[0]]["completion"], messages=tuple(rows[idx[0]]["prompt"]),
                          rubrics=tuple({"criterion": rows[i]["rubric"], "points": 1.0, "tags": []} for i in idx))
              for n, idx in enumerate(groups.values())]
    check_judge(reward)
    started = init_ray(cfg.ray)
    try:
        with RewardPool(reward) as pool:
            results = pool.score(inputs)
    finally:
        if started:
            import ray

            ray.shutdown()
    verdicts: list[bool | None] = [None] * len(rows)
    for idx, res in zip(groups.values(), results):
        for i, c in zip(idx, res.criteria or []):
            verdicts[i] = c.get("met")
    stats = {**meta_eval_agreement(rows, verdicts), "grader": grader, "source": Path(path).name,
             "created": now_iso()}
    run.review.mkdir(parents=True, exist_ok=True)
    (run.review / META_EVAL).write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    log.info("meta-eval of %s: macro F1 %s, balanced accuracy %s over %d pairs", path, stats["macro_f1"],
             stats["balanced_accuracy"], stats["n"])
    return stats


def find_run(path: Path, meta: dict, run_dir: Path | None) -> RunDir:
    """The run a labels file belongs to: ``--run``; else the run recorded in a saved HTML-form file; else the
    run whose ``review/`` folder holds the file."""
    candidates = [run_dir] if run_dir else [Path(meta["run_dir"])] if meta.get("run_dir") else []
    if not run_dir:
        candidates += [p.parent for p in Path(path).resolve().parents if p.name == "review"]
    for c in candidates:
        if (Path(c) / "review" / ITEMS).is_file():
            return RunDir(Path(c))
    where = f"{run_dir}/review/{ITEMS}" if run_dir else "the file's run (pass --run RUN_DIR)"
    raise UsageError(f"{path}: no review package found at {where}; run `medrl review export RUN_DIR` first")


def load_items(run: RunDir) -> dict[str, dict]:
    return {it["review_id"]: it for it in read_jsonl(run.review / ITEMS, ("review_id",))}


def import_labels(path: Path, run_dir: Path | None = None, reviewer: str | None = None) -> dict:
    """Validate a filled file and store its good rows; returns counts, the error lines and the agreement."""
    rows, meta = read_label_rows(path)
    run = find_run(path, meta, run_dir)
    package = json.loads((run.review / PACKAGE).read_text(encoding="utf-8"))
    if meta.get("package_id") and meta["package_id"] != package["package_id"]:
        log.warning("%s was saved from package %s; the run now holds package %s (labels of items that are still "
                    "in it are imported)", path, meta["package_id"], package["package_id"])
    items = load_items(run)
    known = {rid: len(it.get("criteria") or []) for rid, it in items.items()}
    labels, errors, blank = validate_rows(rows, known, reviewer or meta.get("reviewer"), Path(path).name)
    for line in errors:
        log.debug("%s: %s", path, line)
    added, replaced = merge_labels(run.review / LABELS, labels) if labels else (0, 0)
    stats = agreement(items, read_labels(run.review / LABELS))
    (run.review / AGREEMENT).write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    return {"run": str(run.root), "imported": len(labels), "added": added, "replaced": replaced, "blank": blank,
            "errors": errors, "reviewers": sorted({lab["reviewer"] for lab in labels}), "agreement": stats}
