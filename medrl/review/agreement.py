"""Agreement between the teacher judge, the rules and the clinician reviewers (pure functions).

* judge vs reviewers, per dimension, over every (item, reviewer) label that has both scores: Spearman's rank
  correlation (ties get average ranks) and Cohen's kappa with quadratic weights on the 0-10 scale
  (``1 - sum(w * observed) / sum(w * expected)``, ``w = (i - j)^2``);
* reviewers' safe/unsafe against the rule verdict: a 2 x 2 confusion table, the agreement rate and Cohen's kappa;
* reviewer vs reviewer on the items both labelled: the same statistics per dimension and for the verdict;
* the items where judge and reviewer disagree most (largest gap on any dimension);
* the rubric grader's criterion verdicts vs the reviewers' ticks (``calibration.criteria_agreement``: macro F1 as
  HealthBench's meta-evaluation, and balanced accuracy).

A statistic that is undefined (fewer than two pairs, no variance, chance agreement of 1) is None.
"""
from __future__ import annotations

from itertools import combinations
from statistics import fmean

from medrl.review.calibration import criteria_agreement, rounded
from medrl.review.labels import VERDICTS
from medrl.reward.rubric import DIMENSIONS

SCALE = range(11)


def average_ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 2:
        return None
    mx, my = fmean(x), fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / (sxx * syy) ** 0.5


def spearman(x: list[float], y: list[float]) -> float | None:
    return pearson(average_ranks(x), average_ranks(y))


def cohen_kappa(a: list, b: list, categories, weight=lambda i, j: float(i != j)) -> float | None:
    """Cohen's kappa of two raters over ``categories`` (ordered) with a disagreement weight ``weight(i, j)`` of the
    category positions (default: unweighted)."""
    n = len(a)
    if n == 0:
        return None
    index = {c: k for k, c in enumerate(categories)}
    m = len(categories)
    observed = [[0.0] * m for _ in range(m)]
    for x, y in zip(a, b):
        observed[index[x]][index[y]] += 1 / n
    rows = [sum(r) for r in observed]
    cols = [sum(observed[i][j] for i in range(m)) for j in range(m)]
    expected_dis = sum(weight(i, j) * rows[i] * cols[j] for i in range(m) for j in range(m))
    observed_dis = sum(weight(i, j) * observed[i][j] for i in range(m) for j in range(m))
    if expected_dis == 0:
        return None
    return 1 - observed_dis / expected_dis


def quadratic_kappa(a: list[int], b: list[int]) -> float | None:
    return cohen_kappa(a, b, list(SCALE), weight=lambda i, j: float((i - j) ** 2))


def score_agreement(a: list[int], b: list[int]) -> dict:
    return {"n": len(a), "spearman": rounded(spearman(a, b)), "kappa_quadratic": rounded(quadratic_kappa(a, b)),
            "mean_a": rounded(fmean(a)) if a else None, "mean_b": rounded(fmean(b)) if b else None,
            "mean_abs_diff": rounded(fmean(abs(x - y) for x, y in zip(a, b))) if a else None}


def verdict_agreement(a: list[str], b: list[str]) -> dict:
    confusion = {f"{x}|{y}": sum(1 for p, q in zip(a, b) if (p, q) == (x, y)) for x in VERDICTS for y in VERDICTS}
    return {"n": len(a), "confusion": confusion,
            "agreement": rounded(sum(p == q for p, q in zip(a, b)) / len(a)) if a else None,
            "kappa": rounded(cohen_kappa(a, b, VERDICTS))}


def agreement(items: dict[str, dict], labels: list[dict], top: int = 10) -> dict:
    """All statistics for ``labels`` on ``items`` (``review_id`` -> review item)."""
    labels = [lab for lab in labels if lab["review_id"] in items]
    judge = {}
    for d in DIMENSIONS:
        pairs = [((items[lab["review_id"]]["judge_scores"] or {}).get(d), lab.get(d)) for lab in labels]
        pairs = [(j, r) for j, r in pairs if j is not None and r is not None]
        judge[d] = score_agreement([j for j, _ in pairs], [r for _, r in pairs])
    # rows: the reviewer's verdict, columns: the rules' verdict
    vr = [(lab["verdict"], items[lab["review_id"]]["rule_verdict"]) for lab in labels]
    vr = [(v, r) for v, r in vr if v and r]
    rules = verdict_agreement([v for v, _ in vr], [r for _, r in vr])
    by_reviewer: dict[str, dict[str, dict]] = {}
    for lab in labels:
        by_reviewer.setdefault(lab["reviewer"], {})[lab["review_id"]] = lab
    between = {}
    for ra, rb in combinations(sorted(by_reviewer), 2):
        common = sorted(set(by_reviewer[ra]) & set(by_reviewer[rb]))
        if not common:
            continue
        la, lb = [by_reviewer[ra][i] for i in common], [by_reviewer[rb][i] for i in common]
        dims = {}
        for d in DIMENSIONS:
            pairs = [(x[d], y[d]) for x, y in zip(la, lb) if x.get(d) is not None and y.get(d) is not None]
            dims[d] = score_agreement([p for p, _ in pairs], [q for _, q in pairs])
        vs = [(x["verdict"], y["verdict"]) for x, y in zip(la, lb) if x.get("verdict") and y.get("verdict")]
        between[f"{ra} vs {rb}"] = {"items": len(common), "dimensions": dims,
                                    "verdict": verdict_agreement([p for p, _ in vs], [q for _, q in vs])}
    gaps = []
    for lab in labels:
        item = items[lab["review_id"]]
        diffs = [(abs(j - lab[d]), d, j, lab[d]) for d in DIMENSIONS
                 if (j := (item["judge_scores"] or {}).get(d)) is not None and lab.get(d) is not None]
        if diffs:
            gap, dim, j, r = max(diffs)
            gaps.append({"review_id": lab["review_id"], "reviewer": lab["reviewer"], "dimension": dim, "judge": j,
                         "reviewer_score": r, "gap": gap, "model": item["model"], "set": item["set"],
                         "verdict": lab.get("verdict"), "rule_verdict": item["rule_verdict"],
                         "question": item["question"], "answer": item["answer"], "comment": lab.get("comment", "")})
    gaps.sort(key=lambda g: (-g["gap"], g["review_id"], g["reviewer"]))
    return {"labels": len(labels), "reviewers": sorted(by_reviewer), "items_labelled": len({lab["review_id"]
                                                                                         for lab in labels}),
            "judge_vs_reviewer": judge, "verdict_vs_rules": rules, "reviewer_vs_reviewer": between,
            "disagreements": gaps[:top], "criteria": criteria_agreement(items, labels, top)}
