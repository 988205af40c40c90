"""HealthBench statistics against hand-computed values: item scores with negative criteria, the clipped mean, the
bootstrap std on a fixed seed, per-axis / per-theme scores and paired deltas."""
import math

import numpy as np
import pytest

from medrl.evaluation.healthbench import (bootstrap_std, healthbench_summary, item_scores, paired_delta,
                                          set_summary, stat)


def crit(points, met, *tags):
    return {"criterion": f"c{points}{met}", "points": points, "tags": list(tags), "met": met, "explanation": ""}


def row(model, item, criteria, themes=(), set_name="hb"):
    return {"model": model, "set": set_name, "id": item, "criteria": criteria, "example_tags": list(themes)}


def test_item_score_with_negative_criteria():
    # (5 - 2) / (5 + 3): the unmet +3 counts in the denominator, the met -2 subtracts
    s = item_scores([crit(5, True), crit(3, False), crit(-2, True)])
    assert s["overall"] == pytest.approx(0.375)
    # a met negative criterion can push the item below 0 (unclipped)
    assert item_scores([crit(2, False), crit(-5, True)])["overall"] == pytest.approx(-2.5)
    # an unmet negative criterion costs nothing
    assert item_scores([crit(4, True), crit(-9, False)])["overall"] == pytest.approx(1.0)
    # a failed verdict leaves the item unscored
    assert item_scores([crit(4, True), crit(2, None)]) is None


def test_reported_figure_clips_the_mean_not_the_items():
    # items -2.5 and 0.375 and 1.0: mean -0.375 -> 0 when the mean is clipped (clipping items first would give 0.458)
    rows = [row("base", "a", [crit(2, False), crit(-5, True)]),
            row("base", "b", [crit(5, True), crit(3, False), crit(-2, True)]),
            row("base", "c", [crit(1, True)])]
    assert set_summary(rows)["score"] == 0.0
    assert stat([1.0, 0.5])["score"] == 0.75
    assert stat([1.5, 1.0])["score"] == 1.0


def test_bootstrap_std_fixed_seed():
    assert bootstrap_std([0.4] * 7) == pytest.approx(0.0, abs=1e-12)
    # two items 0 and 1: resampled means are 0, .5, 1 with p 1/4, 1/2, 1/4 -> std sqrt(1/8) = 0.354
    s = bootstrap_std([0.0, 1.0])
    assert s == pytest.approx(math.sqrt(1 / 8), abs=0.015)
    assert s == bootstrap_std([0.0, 1.0])  # fixed seed: the same figure every time
    assert s != bootstrap_std([0.0, 1.0], seed=1)
    # clipping inside the bootstrap: items -1 and 1 give means -1, 0, 1 -> clipped 0, 0, 1: std sqrt(3/16) = 0.433
    # (the unclipped std would be 0.707)
    assert bootstrap_std([-1.0, 1.0]) == pytest.approx(math.sqrt(3 / 16), abs=0.02)
    assert len({bootstrap_std([0.0, 1.0], samples=1000, seed=k) for k in range(5)}) == 5


def test_per_axis_and_per_theme():
    item = [crit(5, True, "axis:accuracy"), crit(-3, True, "axis:accuracy"), crit(4, False, "axis:completeness"),
            crit(-6, True, "axis:communication_quality"), crit(1, True, "axis:completeness")]
    s = item_scores(item, ["theme:hedging"])
    assert s["axis:accuracy"] == pytest.approx(2 / 5)
    assert s["axis:completeness"] == pytest.approx(1 / 5)
    assert "axis:communication_quality" not in s  # no positive criterion with this tag: the item does not count
    assert s["overall"] == pytest.approx((5 - 3 + 1 - 6) / 10)
    assert s["theme:hedging"] == s["overall"]
    rows = [row("rl", "a", item, ["theme:hedging"]),
            row("rl", "b", [crit(10, True, "axis:accuracy")], ["theme:emergency_referrals"]),
            row("rl", "c", [crit(2, True, "axis:completeness"), crit(2, False, "axis:accuracy")], ["theme:hedging"])]
    summary = set_summary(rows)
    assert summary["axes"]["accuracy"] == {"score": round((0.4 + 1.0 + 0.0) / 3, 4), "std": summary["axes"][
        "accuracy"]["std"], "n": 3}
    assert summary["axes"]["completeness"]["n"] == 2
    assert summary["axes"]["completeness"]["score"] == pytest.approx((0.2 + 1.0) / 2)
    assert "communication_quality" not in summary["axes"]
    assert summary["themes"]["hedging"]["score"] == pytest.approx(np.clip((-0.3 + 0.5) / 2, 0, 1))
    assert summary["themes"]["emergency_referrals"] == {"score": 1.0, "std": 0.0, "n": 1}
    assert summary["criteria"] == 8 and summary["incomplete"] == 0


def test_paired_delta_uses_the_same_items():
    a = {"1": 1.0, "2": 0.5, "3": 0.0, "4": 0.25}
    b = {"1": 0.5, "2": 0.5, "3": 0.0, "4": 0.0, "only-b": 1.0}
    d = paired_delta(a, b)
    assert d["n"] == 4
    assert d["delta"] == pytest.approx((1.75 - 1.0) / 4)
    # a >= b on every item: every paired resample has a difference >= 0 (an unpaired bootstrap would not)
    assert d["ci"][0] >= 0.0 and d["ci"][1] <= 0.5 and d["ci"][0] < d["delta"] < d["ci"][1]
    assert paired_delta(a, {"x": 1.0}) == {"delta": None, "ci": None, "std": None, "n": 0}


def test_summary_per_set_and_model_with_deltas_and_failed_items():
    rows = []
    for i in range(6):
        rows.append(row("base", str(i), [crit(4, i % 3 == 0), crit(-2, i == 1)], ["theme:communication"]))
        rows.append(row("sft", str(i), [crit(4, i % 2 == 0), crit(-2, False)], ["theme:communication"]))
        rows.append(row("rl", str(i), [crit(4, True), crit(-2, None if i == 5 else False)], ["theme:communication"]))
    rows.append({"model": "rl", "set": "test", "id": "t", "criteria": None})  # not a rubric set
    out = healthbench_summary(rows, grader="g1")
    assert set(out) == {"hb"}
    hb = out["hb"]
    assert hb["models"]["base"]["score"] == pytest.approx(max(0, (1 + 1 - 0.5) / 6), abs=1e-4)
    assert hb["models"]["sft"]["score"] == 0.5
    assert hb["models"]["rl"]["score"] == 1.0 and hb["models"]["rl"]["n"] == 5 and hb["models"]["rl"]["incomplete"] == 1
    assert hb["deltas"]["rl-sft"]["n"] == 5  # item 5 has no rl score: left out of the pairs
    assert hb["deltas"]["sft-base"]["delta"] == pytest.approx(0.5 - 0.25, abs=1e-4)
    assert hb["graders"] == ["g1"]
