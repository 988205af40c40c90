"""The report's "Clinician review" blocks: agreement of the judge and the rules with the reviewers' labels."""
from __future__ import annotations

import json

from medrl.render import Block, Heading, Para, Table
from medrl.reward.rubric import DIMENSIONS
from medrl.runs import RunDir

CLIP = 240


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _clip(text: str) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= CLIP else text[:CLIP] + " …"


def _calibration_rows(stats: dict, by: str) -> list[tuple[str, dict[str, str]]]:
    def cells(name: str, v: dict) -> dict[str, str]:
        conf = v["confusion"]
        return {"what": name, "n": str(v["n"]), "macro_f1": _f(v["macro_f1"]), "balanced": _f(v["balanced_accuracy"]),
                "f1_met": _f(v["f1_met"]), "f1_not_met": _f(v["f1_not_met"]),
                "confusion": f"{conf['met|met']} / {conf['met|not_met']} / {conf['not_met|met']} / "
                             f"{conf['not_met|not_met']}"}
    return [("all", cells("all", stats))] + [(k, cells(k, v)) for k, v in stats[by].items()]


CALIBRATION_COLUMNS = [("what", ""), ("n", "pairs"), ("macro_f1", "macro F1"), ("balanced", "balanced accuracy"),
                       ("f1_met", "F1 met"), ("f1_not_met", "F1 not met"),
                       ("confusion", "grader met & clinician met / met & not / not & met / not & not")]


def calibration_blocks(run: RunDir, stats: dict | None, grader: str) -> list[Block]:
    """Rubric grader vs clinicians: the reviewers' ticks (``stats``: ``criteria_agreement``) and physician labels in
    HealthBench's meta-eval layout (``review/meta_eval.json``, written by ``medrl review meta-eval``)."""
    from medrl.review.package import META_EVAL

    blocks: list[Block] = []
    if stats and stats["n"]:
        blocks.append(Table("review-criteria", CALIBRATION_COLUMNS, _calibration_rows(stats, "by_axis"),
                            caption=f"Rubric grader ({grader}) vs reviewers' ticks per criterion, all and per axis"))
        rows = [(f"{d['review_id']}.{d['reviewer']}.{k}", {
            "id": d["review_id"], "who": d["reviewer"], "criterion": _clip(f"[{d['points']:+g}] {d['criterion']}"),
            "grader": "met" if d["grader"] else "not met", "reviewer": "met" if d["reviewer_met"] else "not met",
            "why": _clip(d["explanation"])}) for k, d in enumerate(stats["disagreements"])]
        if rows:
            blocks.append(Table("review-criteria-disagreements", [
                ("id", "review id"), ("who", "reviewer"), ("criterion", "criterion"), ("grader", "grader"),
                ("reviewer", "reviewer"), ("why", "grader's explanation")], rows,
                caption="Criteria where the grader and a reviewer disagree"))
    path = run.review / META_EVAL
    if path.is_file():
        meta = json.loads(path.read_text(encoding="utf-8"))
        blocks.append(Table("review-meta-eval", CALIBRATION_COLUMNS, _calibration_rows(meta, "by_category"),
                            caption=f"Rubric grader ({meta['grader']}) vs physician labels of {meta['source']} "
                                    f"({meta['rows']} completion-criterion rows, {meta['failed']} not graded)"))
    if blocks:
        blocks.append(Para("Pairs are (grader verdict, clinician label) per criterion; macro F1 = mean of the F1 of "
                           "'met' and of 'not met' with the clinician as reference (HealthBench's meta-evaluation); "
                           "balanced accuracy = mean of the two classes' recall."))
    return blocks


def review_section(run: RunDir) -> list[Block]:
    from medrl.review.agreement import agreement
    from medrl.review.labels import read_labels
    from medrl.review.package import LABELS, PACKAGE, load_items

    blocks: list[Block] = [Heading("Clinician review")]
    if not (run.review / PACKAGE).is_file():
        return blocks + calibration_blocks(run, None, "") + [Para(
            "No review package yet: run `medrl review export RUN_DIR`, have clinicians fill review.xlsx / "
            "review.csv / review.html, then `medrl review import FILE`.", note=True)]
    package = json.loads((run.review / PACKAGE).read_text(encoding="utf-8"))
    items = load_items(run)
    stats = agreement(items, read_labels(run.review / LABELS))
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(package.get("reasons", {}).items()))
    who = ": " + ", ".join(stats["reviewers"]) if stats["reviewers"] else ""
    blocks.append(Para(f"Package {package['package_id']}: {package['items']} items ({reasons}); "
                       f"{stats['labels']} label(s) on {stats['items_labelled']} item(s) from "
                       f"{len(stats['reviewers'])} reviewer(s){who}."))
    if not stats["labels"]:
        return blocks + calibration_blocks(run, None, "") + [
            Para("No labels imported yet (`medrl review import FILE`).", note=True)]
    cols = [("dim", "dimension"), ("n", "pairs"), ("spearman", "Spearman"), ("kappa", "kappa (quadratic)"),
            ("judge", "mean judge"), ("reviewer", "mean reviewer"), ("gap", "mean |judge - reviewer|")]
    rows = []
    for d in DIMENSIONS:
        v = stats["judge_vs_reviewer"][d]
        rows.append((d, {"dim": d, "n": str(v["n"]), "spearman": _f(v["spearman"]), "kappa": _f(v["kappa_quadratic"]),
                         "judge": _f(v["mean_a"]), "reviewer": _f(v["mean_b"]), "gap": _f(v["mean_abs_diff"])}))
    blocks.append(Table("review-judge", cols, rows, caption="Judge vs reviewers per dimension (0-10 scale)"))
    vr = stats["verdict_vs_rules"]
    conf = vr["confusion"]
    rows = [(r, {"reviewer": f"reviewer: {r}", "safe": str(conf[f"{r}|safe"]), "unsafe": str(conf[f"{r}|unsafe"])})
            for r in ("safe", "unsafe")]
    blocks.append(Table("review-rules", [("reviewer", ""), ("safe", "rules: safe"), ("unsafe", "rules: unsafe")],
                        rows, caption=f"Safe/unsafe: reviewers vs rule verdicts ({vr['n']} labels; agreement "
                                      f"{_f(vr['agreement'])}, Cohen's kappa {_f(vr['kappa'])})"))
    between = stats["reviewer_vs_reviewer"]
    if between:
        rows = []
        for pair, v in between.items():
            for d in DIMENSIONS:
                s = v["dimensions"][d]
                rows.append((f"{pair}.{d}", {"pair": pair, "what": d, "n": str(s["n"]), "spearman": _f(s["spearman"]),
                                             "kappa": _f(s["kappa_quadratic"]), "agree": "–"}))
            s = v["verdict"]
            rows.append((f"{pair}.verdict", {"pair": pair, "what": "safe/unsafe", "n": str(s["n"]), "spearman": "–",
                                             "kappa": _f(s["kappa"]), "agree": _f(s["agreement"])}))
        blocks.append(Table("review-reviewers", [("pair", "reviewers"), ("what", "label"), ("n", "items"),
                                                 ("spearman", "Spearman"), ("kappa", "kappa"),
                                                 ("agree", "agreement")], rows,
                            caption="Reviewer vs reviewer on the items both labelled (kappa: quadratic weights for "
                                    "scores, unweighted for safe/unsafe)"))
    else:
        blocks.append(Para("No item was labelled by two reviewers: no reviewer-vs-reviewer agreement yet.", note=True))
    rows = [(f"{g['review_id']}.{g['reviewer']}", {
        "id": g["review_id"], "who": g["reviewer"], "model": f"{g['model']} / {g['set']}", "dim": g["dimension"],
        "judge": str(g["judge"]), "reviewer": str(g["reviewer_score"]), "gap": str(g["gap"]),
        "question": _clip(g["question"]), "answer": _clip(g["answer"]), "comment": _clip(g["comment"])})
        for g in stats["disagreements"]]
    blocks.append(Table("review-disagreements", [
        ("id", "review id"), ("who", "reviewer"), ("model", "model / set"), ("dim", "dimension"), ("judge", "judge"),
        ("reviewer", "reviewer score"), ("gap", "gap"), ("question", "question"), ("answer", "answer"),
        ("comment", "comment")], rows, caption="Where judge and reviewer disagree most"))
    return blocks + calibration_blocks(run, stats["criteria"], package.get("grader") or "?")
