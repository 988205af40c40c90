"""HealthBench-style statistics of rubric-graded eval rows (pure: numpy only, no Ray, model or network code).

As OpenAI's ``simple-evals`` ``healthbench_eval.py`` computes them (arXiv 2505.08775):

* item score = sum of the points of the met criteria / sum of the positive points (``medrl.reward.criteria.
  item_score``), unclipped (a met negative criterion subtracts);
* the reported figure is the mean of the item scores, **the mean** clipped to [0, 1]; its bootstrap standard deviation
  is the std of that clipped mean over 1,000 resamples of the items (here with a fixed numpy seed, so a report is
  reproducible);
* per criterion tag (``axis:accuracy`` ...): each item scored on its criteria with that tag only (an item without a
  positive criterion of the tag does not count for it), then the same clipped mean and std;
* per item tag (``theme:*`` in ``example_tags``): the overall item scores of the items with that tag.

An item with a criterion whose grading failed (``met`` None) has no score: it is counted as ``incomplete`` and left
out (HealthBench grades until a valid verdict arrives; we never guess one).

Deltas between two models (``sft`` − ``base`` ...) are paired: each bootstrap resample draws the same items for both
models (items scored for both), the interval is the 2.5 / 97.5 percentile of the resampled differences.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import numpy as np

from medrl.reward.criteria import item_score

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
AXIS_PREFIX = "axis:"
THEME_PREFIX = "theme:"


def scored(points: list[float], met: list[bool | None]) -> float | None:
    """The item score, None when a verdict is missing or no criterion has positive points."""
    if any(m is None for m in met) or sum(p for p in points if p > 0) <= 0:
        return None
    return item_score(points, [bool(m) for m in met])


def item_scores(criteria: list[dict], example_tags: Iterable[str] | None = None) -> dict[str, float] | None:
    """``{"overall": score, <criterion tag>: score on that tag's criteria, <item tag>: overall score}`` of one graded
    response (``criteria``: ``{"points", "tags", "met"}`` each); None when a criterion has no verdict."""
    overall = scored([c["points"] for c in criteria], [c.get("met") for c in criteria])
    if overall is None:
        return None
    out = {"overall": overall}
    by_tag: dict[str, list[dict]] = defaultdict(list)
    for c in criteria:
        for tag in dict.fromkeys(c.get("tags") or []):
            by_tag[tag].append(c)
    for tag, cs in by_tag.items():
        s = scored([c["points"] for c in cs], [c["met"] for c in cs])
        if s is not None:
            out[tag] = s
    for tag in example_tags or []:
        out[tag] = overall
    return out


def clipped_mean(values) -> float:
    return float(np.clip(np.mean(values), 0.0, 1.0))


def _resamples(n: int, samples: int, seed: int) -> np.ndarray:
    """(samples, n) item indices drawn with replacement, the same for every call with the same arguments."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def bootstrap_std(values, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> float:
    """Std of the clipped mean over ``samples`` resamples of the items (numpy's default, ddof 0, as simple-evals)."""
    v = np.asarray(values, dtype=float)
    means = np.clip(v[_resamples(len(v), samples, seed)].mean(axis=1), 0.0, 1.0)
    return float(means.std())


def stat(values: list[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """``{"score": clipped mean, "std": bootstrap std, "n": items}`` (score and std None without items)."""
    if not values:
        return {"score": None, "std": None, "n": 0}
    return {"score": round(clipped_mean(values), 4), "std": round(bootstrap_std(values, samples, seed), 4),
            "n": len(values)}


def set_summary(rows: list[dict], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """One model on one rubric set: overall, per axis and per theme, from eval rows with ``criteria``."""
    per_item = [item_scores(r["criteria"], r.get("example_tags")) for r in rows]
    done = [s for s in per_item if s is not None]
    tags = sorted({t for s in done for t in s if t != "overall"})
    return {**stat([s["overall"] for s in done], samples, seed), "incomplete": len(per_item) - len(done),
            "criteria": sum(len(r["criteria"]) for r in rows),
            "axes": {t[len(AXIS_PREFIX):]: stat([s[t] for s in done if t in s], samples, seed)
                     for t in tags if t.startswith(AXIS_PREFIX)},
            "themes": {t[len(THEME_PREFIX):]: stat([s[t] for s in done if t in s], samples, seed)
                       for t in tags if t.startswith(THEME_PREFIX)}}


def paired_delta(a: dict[str, float], b: dict[str, float], samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> dict:
    """clipped mean(a) − clipped mean(b) over the items scored for both (``{item id: item score}``), with the paired
    bootstrap 95% interval and std of that difference."""
    ids = sorted(set(a) & set(b))
    if not ids:
        return {"delta": None, "ci": None, "std": None, "n": 0}
    va, vb = np.array([a[i] for i in ids]), np.array([b[i] for i in ids])
    idx = _resamples(len(ids), samples, seed)
    diffs = np.clip(va[idx].mean(axis=1), 0, 1) - np.clip(vb[idx].mean(axis=1), 0, 1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"delta": round(clipped_mean(va) - clipped_mean(vb), 4), "ci": [round(float(lo), 4), round(float(hi), 4)],
            "std": round(float(diffs.std()), 4), "n": len(ids)}


DELTAS = (("sft", "base"), ("rl", "sft"), ("rl", "base"))


def healthbench_summary(rows: list[dict], grader: str | None = None, samples: int = BOOTSTRAP_SAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> dict:
    """``{set: {"models": {model: set_summary}, "deltas": {"sft-base": paired_delta ...}, "graders": [...]}}`` over
    the eval rows that carry ``criteria`` (rubric sets). ``graders`` lists the grader model and version of the rows
    (``row["grader"]``, else ``grader``), so every figure can name what graded it."""
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("criteria"):
            groups[r["set"]][r["model"]].append(r)
    out = {}
    for s, per_model in groups.items():
        overall = {m: {r["id"]: sc["overall"] for r in rs if (sc := item_scores(r["criteria"])) is not None}
                   for m, rs in per_model.items()}
        deltas = {f"{x}-{y}": paired_delta(overall[x], overall[y], samples, seed) for x, y in DELTAS
                  if x in overall and y in overall}
        ids = sorted({r.get("grader") or grader or "?" for rs in per_model.values() for r in rs})
        out[s] = {"models": {m: set_summary(rs, samples, seed) for m, rs in per_model.items()}, "deltas": deltas,
                  "graders": ids}
    return out
