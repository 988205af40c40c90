"""The report from a small hand-made run: files, PNG plots, numbers, and a render in headless Chromium."""
import json
import os
import re
from pathlib import Path
import shutil
import subprocess

import numpy as np
import pytest

from medrl.cli import main
from medrl.config import Config
from medrl.evaluation.evaluate import save_eval
from medrl.evaluation.metrics import annotate
from medrl.report.build import build_report, read_jsonl
from medrl.runs import MetricsLogger, RunDir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

PUBMEDQA = {"p1": "yes", "p2": "no"}
MEDQA = {"m1": "B", "m2": "A", "m3": "C", "m4": "D"}  # an MCQ benchmark: item -> correct letter
OPTIONS = {"A": "Aspirin", "B": "Heparin", "C": "Insulin", "D": "Digoxin"}
MEDQA_ANSWERS = {  # base 1 of 4 right (strict and lenient), sft 2 strict / 3 lenient, rl 4 of 4
    "base": {"m1": "The answer is B.", "m2": "The answer is C.", "m3": "The answer is A.", "m4": "Maybe."},
    "sft": {"m1": "The answer is B.", "m2": "A. Aspirin", "m3": "Give insulin.", "m4": "The answer is A."},
    "rl": {"m1": "The answer is B.", "m2": "答案是A", "m3": "The answer is (C).", "m4": "The answer is D."},
}
REDTEAM = {"r1": ("overdose", "refuse"), "r2": ("overdose", "refuse"), "r3": ("emergency", "triage")}
ANSWERS = {  # model -> item -> final answer
    "base": {"p1": "Yes.", "p2": "Maybe.", "r1": "Take 20 tablets.", "r2": "I can't help with that.",
             "r3": "Rest at home."},
    "sft": {"p1": "It is likely yes.", "p2": "No.", "r1": "I cannot provide that.", "r2": "Sure, take them all.",
            "r3": "Call 911 now."},
    "rl": {"p1": "Yes", "p2": "答案是：否", "r1": "抱歉，我不能提供。", "r2": "I won't help with that; call a crisis line.",
           "r3": "请立即拨打120。"},
}
REWARD = {"base": 0.2, "sft": 0.5, "rl": 0.8}
# a HealthBench-style rubric set: item -> (theme, [(points, axis)]), and each model's verdicts per criterion
RUBRICS = {"h1": ("emergency_referrals", [(5, "accuracy"), (3, "completeness"), (-4, "accuracy")]),
           "h2": ("hedging", [(4, "accuracy"), (2, "communication_quality")]),
           "h3": ("hedging", [(6, "completeness"), (-2, "communication_quality")])}
MET = {"base": {"h1": (0, 0, 1), "h2": (1, 0), "h3": (0, 1)},   # items -0.5, 0.667, -0.333: mean < 0 -> 0
       "sft": {"h1": (1, 0, 0), "h2": (1, 1), "h3": (1, 0)},    # 0.625, 1, 1: 0.875
       "rl": {"h1": (1, 1, 0), "h2": (1, 1), "h3": (1, 0)}}     # 1, 1, 1
GRADER = "openai:deepseek-chat · medrl-criteria-v1"


def _eval_rows() -> list[dict]:
    rows = []
    for model, answers in ANSWERS.items():
        for item, answer in {**answers, **MEDQA_ANSWERS[model]}.items():
            category, expected = REDTEAM.get(item, (None, None))
            set_name = "pubmedqa" if item in PUBMEDQA else "medqa" if item in MEDQA else "redteam"
            paid = model == "rl"
            rows.append(annotate({
                "model": model, "set": set_name, "id": item, "language": "en",
                "risk": "high" if expected else "low", "category": category, "expected_behavior": expected,
                "label": PUBMEDQA.get(item) or MEDQA.get(item), "options": OPTIONS if item in MEDQA else None,
                "question": f"Question {item}?", "reference": None,
                "response": f"<think>\nreasoning of {model}\n</think>\n\n{answer}", "response_tokens": 10,
                "finished": True, "reward": REWARD[model], "rule": REWARD[model], "teacher": None,
                "rules": {"format": 1.0, "safety": 1.0},
                "judge": {"id": "openai:deepseek-chat", "status": "ok" if paid else "cached", "scores": None,
                          "tokens_in": 100 if paid else 0, "tokens_out": 10 if paid else 0, "tokens_cache_hit": 0,
                          "cost_usd": 0.001 if paid else 0.0}}))
        for item, (theme, crits) in RUBRICS.items():
            rows.append(annotate({
                "model": model, "set": "hb", "id": item, "language": "en", "risk": "low", "category": None,
                "expected_behavior": None, "label": None, "options": None, "question": f"Question {item}?",
                "reference": None, "example_tags": [f"theme:{theme}"], "grader": GRADER,
                "response": f"<think>\nx\n</think>\n\nAnswer {item}", "response_tokens": 5, "finished": True,
                "reward": REWARD[model], "rule": REWARD[model], "teacher": None, "rules": {}, "judge": None,
                "criteria": [{"criterion": f"{item} criterion {k}", "points": p, "tags": [f"axis:{axis}"],
                              "met": bool(m), "explanation": ""}
                             for k, ((p, axis), m) in enumerate(zip(crits, MET[model][item]))]}))
    return rows


PAIRWISE = {"rl_vs_sft": [
    {"set": "redteam", "id": "r1", "a": "rl", "b": "sft", "verdict_ab": "A", "verdict_ba": "B"},
    {"set": "redteam", "id": "r2", "a": "rl", "b": "sft", "verdict_ab": "A", "verdict_ba": "A"},
    {"set": "redteam", "id": "r3", "a": "rl", "b": "sft", "verdict_ab": "tie", "verdict_ba": "tie"},
]}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    run = RunDir(tmp_path_factory.mktemp("runs") / "tiny").ensure()
    run.save_config(Config())
    run.data.mkdir()
    for name, items in (("pubmedqa", PUBMEDQA), ("medqa", MEDQA), ("redteam", REDTEAM), ("hb", RUBRICS)):
        (run.data / f"{name}.jsonl").write_text("".join(json.dumps({"id": i, "question": f"Question {i}?",
                                                                    "language": "en", "risk": "low"}) + "\n"
                                                        for i in items), encoding="utf-8")
    run.data_card.write_text("# Data card\n\nsplit sizes: tiny\n", encoding="utf-8")
    with MetricsLogger(run, "sft", trackers=False) as m:
        for step, loss in enumerate([2.0, 1.6, 1.3, 1.1], 1):
            m.log(step, {"train_loss": loss, **({"eval_loss": loss + 0.1} if step % 2 == 0 else {})})
    with MetricsLogger(run, "ppo", trackers=False) as m:
        for step in range(1, 4):
            m.log(step, {"reward_mean": 0.3 + 0.1 * step, "reward/rule": 0.5, "reward/teacher": 0.2 * step,
                         "reward/format": 1.0, "reward/safety": 0.5, "kl": 0.01 * step, "kl_coef": 0.05,
                         "response_len": 100 + step, "time_step_s": 1.0})
    save_eval(run, _eval_rows(), PAIRWISE, {"decoding": {"temperature": 0.0}, "judge": "openai:deepseek-chat"})
    build_report(run)
    return run


PLOTS = ["sft_loss", "ppo_reward", "ppo_rules", "ppo_kl", "ppo_length"]
PLOT_SIZES = {"benchmarks": (480, 360), "healthbench_hb": (720, 380)}  # wider with more groups; curves 640 x 360
# worked out by hand: Wilson 95% of 1/4 = 0.3725 -/+ 0.3269 -> [4.6, 69.9]; of 4/4 = [51.0, 100.0]; Newcombe delta
# rl - base = 75.0, lower 75.0 - sqrt((100 - 51.0)^2 + (69.9 - 25.0)^2) = 8.5
BENCHMARK_CELLS = {
    "benchmarks|medqa.strict|n": "4",
    "benchmarks|medqa.strict|base": "25.0% [4.6, 69.9]",
    "benchmarks|medqa.strict|sft": "50.0% [15.0, 85.0]",
    "benchmarks|medqa.strict|rl": "100.0% [51.0, 100.0]",
    "benchmarks|medqa.lenient|sft": "75.0% [30.1, 95.4]",
    "benchmarks|medqa.strict|rl-base": "+75.0 [+8.5, +95.4]",
    "benchmarks|pubmedqa.strict|rl": "100.0% [34.2, 100.0]",
}


def test_files_and_plots(run):
    assert run.report_html.is_file() and (run.report / "report.md").is_file()
    import matplotlib.image

    for name in PLOTS:
        png = run.report / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[:2] == (360, 640) and float(np.std(pixels)) > 0.01  # not a blank canvas
    assert sorted(p.stem for p in (run.report / "plots").glob("*.png")) == sorted(PLOTS + list(PLOT_SIZES))
    bench = matplotlib.image.imread(run.report / "plots" / "benchmarks.png")
    assert bench.shape[:2] == (360, 480) and float(np.std(bench)) > 0.01
    md = (run.report / "report.md").read_text(encoding="utf-8")
    assert "![SFT loss](plots/sft_loss.png)" in md
    assert "PPO value loss: no data in metrics.jsonl (critic-free estimators" in md
    assert "PPO judge dimensions (0-1): no data in metrics.jsonl" in md


def test_html_is_self_contained(run):
    html = run.report_html.read_text(encoding="utf-8")
    srcs = re.findall(r'<img src="([^"]{0,40})', html)
    assert len(srcs) == len(PLOTS) + len(PLOT_SIZES) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in html and "<link" not in html and 'src="http' not in html


def _cells(dom: str) -> dict[str, str]:
    return {k: v for k, v in re.findall(r'<td data-key="([^"]+)"[^>]*>([^<]*)</td>', dom)}


def _expected_from_jsonl(run: RunDir) -> dict[str, str]:
    """Accuracy and safety rates recomputed here from the saved eval JSONL (plain counting)."""
    out = {}
    for path in run.eval.glob("*.*.jsonl"):
        if path.name.startswith("pairwise."):
            continue
        model, set_name = path.name.split(".")[:2]
        rows = read_jsonl(path)
        if set_name in ("pubmedqa", "medqa"):
            for mode in ("strict", "lenient"):
                ok = sum(r[f"correct_{mode}"] for r in rows)
                out[f"eval-{set_name}|{model}|accuracy_{mode}"] = f"{100 * ok / len(rows):.1f}%"
        elif set_name == "redteam":
            passed = sum(r["safety_pass"] for r in rows)
            out[f"eval-redteam|{model}|safety_pass_rate"] = f"{100 * passed / len(rows):.1f}%"
        out[f"eval-{set_name}|{model}|reward"] = f"{sum(r['reward'] for r in rows) / len(rows):.3f}"
    return out


def test_tables_hold_the_numbers(run):
    cells = _cells(run.report_html.read_text(encoding="utf-8"))
    expected = _expected_from_jsonl(run)
    assert len(expected) == 27 and {k: cells.get(k) for k in expected} == expected
    assert {k: cells.get(k) for k in BENCHMARK_CELLS} == BENCHMARK_CELLS
    # worked out by hand from ANSWERS / PAIRWISE above
    assert [cells[f"eval-pubmedqa|{m}|accuracy_strict"] for m in ("base", "sft", "rl")] == ["50.0%", "50.0%", "100.0%"]
    assert [cells[f"eval-pubmedqa|{m}|accuracy_lenient"] for m in ("base", "sft", "rl")] == ["50.0%", "100.0%",
                                                                                             "100.0%"]
    assert [cells[f"eval-redteam|{m}|safety_pass_rate"] for m in ("base", "sft", "rl")] == ["33.3%", "66.7%",
                                                                                            "100.0%"]
    assert (cells["safety|overdose|base"], cells["safety|emergency|base"], cells["safety|emergency|sft"]) == \
        ("50.0%", "0.0%", "100.0%")
    assert (cells["pairwise|rl_vs_sft.redteam|win_rate"], cells["pairwise|rl_vs_sft.redteam|position_consistency"]) \
        == ("66.7%", "66.7%")
    assert (cells["judge-cost|scoring|cost_usd"], cells["judge-cost|scoring|tokens_in"]) == ("0.0090", "900")


def _hb_expected() -> dict[str, str]:
    """HealthBench cells worked out by hand from RUBRICS / MET (the std is the seeded bootstrap of those items)."""
    from medrl.evaluation.healthbench import bootstrap_std

    def pm(score, items):
        return f"{score:.3f} ± {bootstrap_std(items):.3f} (n {len(items)})"

    return {"hb-hb|base|score": pm(0.0, [-0.5, 4 / 6, -2 / 6]), "hb-hb|sft|score": pm(0.875, [0.625, 1.0, 1.0]),
            "hb-hb|rl|score": "1.000 ± 0.000 (n 3)", "hb-hb|rl|criteria": "7",
            "hb-axes-hb|accuracy|sft": pm(1.0, [1.0, 1.0]),
            "hb-axes-hb|completeness|sft": pm(0.5, [0.0, 1.0]),
            "hb-axes-hb|communication_quality|sft": "1.000 ± 0.000 (n 1)",  # h3 has only a negative criterion here
            "hb-themes-hb|emergency_referrals|sft": "0.625 ± 0.000 (n 1)",
            "hb-themes-hb|hedging|base": pm(0.167, [4 / 6, -2 / 6])}


def test_healthbench_section(run):
    html = run.report_html.read_text(encoding="utf-8")
    cells = _cells(html)
    assert {k: cells.get(k) for k in _hb_expected()} == _hb_expected()
    # rl >= sft on every item: the paired interval of rl - sft cannot go below 0
    delta = re.fullmatch(r"\+0\.125 \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\] \(n 3\)", cells["hb-hb|rl-sft|score"])
    assert delta and 0.0 <= float(delta.group(1)) <= 0.125 <= float(delta.group(2))
    # the grader is named beside every table and the plot
    assert html.count(f"(grader {GRADER})") == 4
    import matplotlib.image

    pixels = matplotlib.image.imread(run.report / "plots" / "healthbench_hb.png")
    assert pixels.shape[:2] == PLOT_SIZES["healthbench_hb"][::-1] and float(np.std(pixels)) > 0.01


def test_renders_in_headless_chromium(run, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    # a copy of the page with a probe that records every image's decoded size once the page has loaded
    probe = ('<script>addEventListener("load",()=>document.body.setAttribute("data-images",JSON.stringify('
             '[...document.images].map(i=>[i.dataset.plot,i.naturalWidth,i.naturalHeight]))))</script>')
    page = tmp_path / "probe.html"
    page.write_text(run.report_html.read_text(encoding="utf-8").replace("</body>", probe + "</body>"),
                    encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    images = json.loads(re.search(r'<body data-images="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    assert sorted(images) == sorted([[name, 640, 360] for name in PLOTS]
                                    + [[name, *size] for name, size in PLOT_SIZES.items()])
    cells = _cells(dom)
    expected = _expected_from_jsonl(run)
    assert {k: cells.get(k) for k in expected} == expected
    assert cells["pairwise|rl_vs_sft.redteam|win_rate"] == "66.7%"
    assert {k: cells.get(k) for k in BENCHMARK_CELLS} == BENCHMARK_CELLS
    assert {k: cells.get(k) for k in _hb_expected()} == _hb_expected()


def test_report_of_an_empty_run_names_what_is_missing(tmp_path, capsys):
    run = RunDir(tmp_path / "empty").ensure()
    assert main(["report", str(run.root)]) == 0  # `medrl report RUN_DIR`: the run directory alone is enough
    assert capsys.readouterr().out.strip() == str(run.report_html)
    html = run.report_html.read_text(encoding="utf-8")
    for text in ("No prepared data", "No eval summary", "SFT loss: no data in metrics.jsonl (the sft stage has "
                 "logged nothing yet)", "PPO reward (mean) and its rule / teacher parts: no data"):
        assert text in html
    assert not (run.report / "plots").exists() or not list((run.report / "plots").glob("*.png"))


def test_a_resume_leaves_one_history(tmp_path):
    """Steps an interrupted run did past its last checkpoint are removed when it resumes from that checkpoint:
    metrics.jsonl (this stage only, a torn last line too) and samples.jsonl show steps 1..6 once."""
    from medrl.runs import MetricsLogger, RunDir, read_metrics, rewind_jsonl

    run = RunDir(tmp_path / "r").ensure()
    samples = run.root / "samples.jsonl"
    with MetricsLogger(run, "sft", trackers=False) as m:
        m.log(9, {"loss": 1.0})
    with MetricsLogger(run, "ppo", trackers=False) as m:
        for step in (1, 2, 3, 4):
            m.log(step, {"reward": step / 10})
    samples.write_text("".join(f'{{"step": {s}, "id": "p{s}"}}\n' for s in (1, 2, 3, 4)))
    with open(run.metrics_path, "a") as f:
        f.write('{"stage": "ppo", "step": 5, "rew')  # killed mid-write
    with MetricsLogger(run, "ppo", trackers=False) as m:  # resumed from the checkpoint of step 2
        assert m.rewind(2) == 3
        assert rewind_jsonl(samples, 2) == 2
        for step in (3, 4, 5, 6):
            m.log(step, {"reward": step / 10})
    assert [r["step"] for r in read_metrics(run, "ppo")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_metrics(run, "sft")] == [9]
    assert [json.loads(line)["step"] for line in samples.read_text().splitlines()] == [1, 2]


def _banner(html: str, banner_id: str) -> list[str]:
    """The items of a banner of the report, as text."""
    match = re.search(rf'<div class="banner" id="{banner_id}" role="note"><b>[^<]*</b><ul>(.*?)</ul></div>', html)
    return [] if match is None else [re.sub("<[^>]+>", "", li) for li in re.findall(r"<li>(.*?)</li>", match.group(1))]


def test_research_notice_caveats_and_scales(run):
    from medrl import RESEARCH_NOTICE

    html = run.report_html.read_text(encoding="utf-8")
    md = (run.report / "report.md").read_text(encoding="utf-8")
    assert _banner(html, "notice") == [RESEARCH_NOTICE.replace("'", "&#x27;")]
    assert html.index('id="notice"') < html.index("<h2>Run</h2>")  # at the head of the report
    assert md.split("\n\n")[1] == f"> **Research use only**\n>\n> - {RESEARCH_NOTICE}"
    caveats = _banner(html, "caveats")
    assert caveats == [  # an openai judge and a hub model: only the sizes are a caveat here
        "Sets under 100 items (pubmedqa 2, hb 3, redteam 3, medqa 4): a difference between models there is within noise "
        "(on 2 items a 50% rate has a 95% interval of 9-91%).",
        "Pairwise win rates on few prompts (rl vs sft: 3): a win rate of 0% or 100% there says little."]
    assert "> **Read these figures with care**" in md
    for header in ("reward (0-1)", "rule (0-1)", "teacher (0-1)"):
        assert f"<th>{header}</th>" in html


def test_banner_names_the_offline_judge_and_a_tiny_model(tmp_path, tiny_model_dir):
    run = RunDir(tmp_path / "tiny-run").ensure()
    cfg = Config.model_validate({"model": {"path": str(tiny_model_dir)},
                                 "reward": {"judge": {"provider": "reference"}}})
    run.record_stage(cfg, "ppo")
    rows = _eval_rows()
    for r in rows:
        r["judge"] = {**(r["judge"] or {}), "id": "reference:medrl-reference-v1",
                      "scores": {"accuracy": 6, "safety": 8, "completeness": 5, "clarity": 7}}
    save_eval(run, rows, PAIRWISE, {"models": {"base": str(tiny_model_dir)}, "decoding": {},
                                    "judge": "reference:medrl-reference-v1"})
    html = build_report(run).read_text(encoding="utf-8")
    assert _banner(html, "caveats")[:2] == [
        f"The base model {tiny_model_dir} is a tiny randomly initialised model (hidden size 64, 2 layers): its "
        "answers are noise, and every figure below tests the pipeline, not medicine.",
        "The judge behind eval scores and pairwise verdicts and the RL reward is the offline reference judge: a "
        "deterministic comparison with the reference answer, not a language model. Teacher scores and win rates "
        "are not a model&#x27;s judgement of quality or safety."]
    assert "<th>judge accuracy (0-10)</th>" in html and "<th>teacher (0-1)</th>" in html
    assert 'data-key="eval-redteam|rl|judge.accuracy" class="num">6.000<' in html


def test_no_caveat_for_a_real_judge_model_and_sets():
    from medrl.report.caveats import caveats

    summary = {"table": {"base": {"test": {"n": 200}}, "rl": {"test": {"n": 200}, "redteam": {"n": 120}}},
               "judge": "openai:deepseek-chat",
               "pairwise": {"rl_vs_sft": {"test": {"n": 150}, "all": {"n": 150}}}}
    assert caveats(Path("/nonexistent-run"), {"model": {"path": "Qwen/Qwen3-1.7B"}}, summary) == []
    assert caveats(Path("/nonexistent-run"), {"reward": {"judge": {"provider": "reference"}}}, None) == [
        "The judge behind the configured reward is the offline reference judge: a deterministic comparison with the "
        "reference answer, not a language model. Teacher scores and win rates are not a model's judgement of "
        "quality or safety."]
