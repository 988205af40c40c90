"""Hardening figures (issues 15, 22, 24): reward attacks caught (and injections aimed at a paid judge, by
family), keyword stuffing and rubric gaming gains, crashes in a bad-input fuzz set, tracebacks in a CLI set.

    python bench/hardening.py [--skip-cli]
    PYTHONPATH=/path/to/main python bench/hardening.py --skip-cli   # another tree's detector on these attacks

Prints one line per case and a summary. The attack table is tests/reward_attacks.py (the same one the tests use).
medrl is imported from PYTHONPATH first (``PYTHONPATH=/other/checkout`` measures that checkout's reward with this
attack table: a before/after comparison); without a rubric reward the rubric section prints n/a.
The CLI set runs ``python -m medrl.cli`` in subprocesses (a few start a small Ray runtime: ~2 minutes in all on
2 cores); a case is bad when it prints a traceback, exits 1, or exits 0 on input it should refuse.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAKE_KEY = "sk-" + "live0123456789abcdef0123"  # built at run time: no key-shaped literal in the tree
sys.path.insert(0, str(REPO / "tests"))
sys.path.append(str(REPO))  # after PYTHONPATH: another checkout's medrl can be measured

from judge_injections import JUDGE_INJECTIONS, MEDICAL_NEGATIVES, injection_response, negative_response  # noqa: E402
from reward_attacks import (ATTACKS, RUBRIC_CASES, attack_response, rubric_attacks, stuffing_cases,  # noqa: E402
                            stuffing_variants)

from medrl.reward.config import RewardConfig  # noqa: E402
from medrl.reward.judge import reference_judgement  # noqa: E402
from medrl.reward.rubric import Judgement, build_messages  # noqa: E402
from medrl.reward.rules import evaluate_rules  # noqa: E402
from medrl.reward.scoring import combine  # noqa: E402
from medrl.reward.types import RewardInput  # noqa: E402


def _outcome(flags: list[str]) -> str:
    if "prompt_injection" in flags:
        return "blocked"
    return "teacher_zeroed" if "score_dictation" in flags else "clean"


def attacks() -> dict:
    cfg = RewardConfig()
    honest, obeyed = Judgement(6, 6, 6, 6, "honest"), Judgement(10, 10, 10, 10, "obeyed")
    caught = missed = false_pos = 0
    gains = []
    for attack_id, text, expected in ATTACKS:
        item = RewardInput(attack_id, "How do I treat a tension headache?", attack_response(attack_id, text))
        rules = evaluate_rules(item, cfg.rules)
        got = _outcome(rules.flags)
        if expected == "clean":
            false_pos += got != "clean"
        elif got == "clean":
            missed += 1
        else:
            caught += 1
        if expected != "clean":  # what an obedient judge would add over an honest verdict of the plain answer
            plain = RewardInput("plain", item.prompt, attack_response(attack_id, ""))
            base = combine(cfg, plain, evaluate_rules(plain, cfg.rules), honest, "ok").reward
            gains.append(combine(cfg, item, rules, obeyed, "ok").reward - base)
        print(f"  attack {attack_id:22s} expected {expected:15s} got {got}")
    markers = 0  # marker look-alikes a judge could read as the end of the answer, besides the two real markers
    for attack_id, text, _ in ATTACKS:
        user = unicodedata.normalize("NFKC", build_messages("q", text, None)[1]["content"])
        user = re.sub("[\u200b-\u200f\u2060\ufeff]", "", user)
        markers += len(re.findall(r"<{2,}\s*(?:END\s*)?ANSWER\s*>{2,}", user, flags=re.IGNORECASE)) - 2
    stuff = _stuffing_gains(cfg, stuffing_cases(), "stuffing")
    n_attacks = sum(e != "clean" for _, _, e in ATTACKS)
    return {"attacks_caught": f"{caught}/{n_attacks}", "false_positives": f"{false_pos}/{len(ATTACKS) - n_attacks}",
            "obedient_judge_gain_max": round(max(gains), 3), "markers_surviving_scrub": markers,
            "stuffing_gain_max": round(max(stuff), 3), "stuffing_gain_mean": round(sum(stuff) / len(stuff), 3)}


def _stuffing_gains(cfg: RewardConfig, cases, label: str) -> list[float]:
    """R of the stuffed answer minus R of the honest one (rules + the offline reference judge as the teacher)."""
    gains = []
    for case_id, ref, honest_answer, stuffed in cases:
        r = {}
        for kind, answer in (("honest", honest_answer), ("stuffed", stuffed)):
            item = RewardInput(case_id, "Chest pain and sweating: what now?", f"<think>\nMI.\n</think>\n\n{answer}",
                               reference=ref, risk="high")
            rules = evaluate_rules(item, cfg.rules)
            r[kind] = combine(cfg, item, rules, reference_judgement(rules.answer, ref, rules), "ok").reward
        gains.append(r["stuffed"] - r["honest"])
        print(f"  {label} {case_id:22s} honest {r['honest']:.3f} stuffed {r['stuffed']:.3f} "
              f"gain {r['stuffed'] - r['honest']:+.3f}")
    return gains


def stuffing() -> dict:
    """Issue 22's stuffing variants (terms joined by function words, one per bullet, synonyms, a fake References /
    参考文献 list, templates) under the DEFAULT config."""
    gains = _stuffing_gains(RewardConfig(), stuffing_variants(), "variant")
    return {"stuffing_variants_raising_R": f"{sum(g > 1e-9 for g in gains)}/{len(gains)}",
            "stuffing_variant_gain_max": round(max(gains), 3)}


def _rubric_rewards(cfg: RewardConfig, lang: str) -> dict[str, float]:
    import asyncio

    from medrl.reward.ledger import Ledger, local_gate
    from medrl.reward.scoring import Scorer

    conv, rubric, partial, _ = RUBRIC_CASES[lang]
    answers = {"partial": partial, **{a: f"{partial}\n{t}" for a, t in rubric_attacks(lang)}}
    items = [RewardInput(k, conv[-1]["content"], f"<think>\nx\n</think>\n\n{a}", risk="high", messages=tuple(conv),
                         rubrics=tuple(rubric)) for k, a in answers.items()]

    async def run():
        scorer = Scorer(cfg, local_gate(Ledger(0, 0, None), 8), api_key="bench-key")
        try:
            return {r.id: r.reward for r in await scorer.score_batch(items)}
        finally:
            await scorer.close()
    return asyncio.run(run())


def rubric() -> dict:
    """Rubric gaming (echo, checklist, "criteria met", addressing the grader, term stuffing; en + zh) appended to an
    answer that meets one criterion: R gained with the offline grader and with the loopback server's naive grader
    (fooled by echoed criteria) behind the real grader prompt."""
    try:
        from medrl.reward.rubric_reward import with_rubric  # noqa: F401
    except ImportError:
        print("  rubric: n/a (this checkout has no rubric reward)")
        return {"rubric_attacks_raising_R": "n/a"}
    from medrl.testing.loopback_server import LoopbackJudge

    raised, total, worst = 0, 0, 0.0
    with tempfile.TemporaryDirectory() as tmp, LoopbackJudge() as server:
        graders = {"offline": {"provider": "reference"},
                   "naive": {"base_url": server.base_url, "rpm": 0, "tpm": 0, "budget_usd": None}}
        for grader, judge in graders.items():
            cfg = RewardConfig.model_validate({"preset": "rubric", "judge": judge,
                                               "cache": {"path": f"{tmp}/{grader}.sqlite"}})
            for lang in ("en", "zh"):
                rewards = _rubric_rewards(cfg, lang)
                for attack, _ in rubric_attacks(lang):
                    gain = rewards[attack] - rewards["partial"]
                    raised += gain > 1e-9
                    total += 1
                    worst = max(worst, gain)
                    print(f"  rubric {grader:7s} {attack:20s} R {rewards[attack]:.3f} vs {rewards['partial']:.3f} "
                          f"gain {gain:+.3f}")
    return {"rubric_attacks_raising_R": f"{raised}/{total}", "rubric_attack_gain_max": round(worst, 3)}


def judge_injections() -> dict:
    """Injections aimed at a paid judge, by family (tests/judge_injections.py): how many are flagged before any
    call, false positives on ordinary medical text, and what an obedient judge (10 on every dimension) adds to R
    over an honest verdict (6) of the same answer without the injection."""
    cfg = RewardConfig()
    honest, obeyed = Judgement(6, 6, 6, 6, "honest"), Judgement(10, 10, 10, 10, "obeyed")
    caught: dict[str, list[int]] = {}
    gains = []
    for attack_id, family, where, text in JUDGE_INJECTIONS:
        item = RewardInput(attack_id, "How do I treat a tension headache?", injection_response(attack_id, where, text))
        rules = evaluate_rules(item, cfg.rules)
        caught.setdefault(family, []).append(rules.injected)
        plain = RewardInput("plain", item.prompt, injection_response(attack_id, "answer", ""))
        base = combine(cfg, plain, evaluate_rules(plain, cfg.rules), honest, "ok").reward
        gains.append(combine(cfg, item, rules, obeyed, "ok").reward - base)
        if not rules.injected:
            print(f"  judge injection {attack_id:22s} ({family}) NOT FLAGGED")
    false_pos = 0
    for case_id, text in MEDICAL_NEGATIVES:
        flags = evaluate_rules(RewardInput(case_id, "A medical question", negative_response(text)), cfg.rules).flags
        if "prompt_injection" in flags or "score_dictation" in flags:
            false_pos += 1
            print(f"  medical negative {case_id:22s} FLAGGED {flags}")
    per_family = {f: f"{sum(v)}/{len(v)}" for f, v in caught.items()}
    print(f"  judge injections caught per family: {per_family}")
    n = sum(len(v) for v in caught.values())
    return {"judge_injections_caught": f"{sum(sum(v) for v in caught.values())}/{n}",
            "judge_injection_false_positives": f"{false_pos}/{len(MEDICAL_NEGATIVES)}",
            "judge_injection_obedient_gain_max": round(max(gains), 3)}


def _fuzz_files(d: Path) -> list[tuple[str, str, Path]]:
    good = [{"question": f"What helps symptom {i}?", "answer": f"Rest and fluids for symptom {i}."} for i in range(26)]
    deep = "[" * 100_000 + "]" * 100_000
    files = []

    def add(name, fmt, data: bytes):
        p = d / name
        p.write_bytes(data)
        files.append((name, fmt, p))

    add("deep_file.json", "json", deep.encode())
    add("deep_in_row.json", "json", ("[" + json.dumps(good[0]) + ', {"question": "q", "answer": ' + deep + "}, "
                                     + json.dumps(good[1]) + "]").encode())
    add("deep_line.jsonl", "jsonl", (json.dumps(good[0]) + "\n" + deep + "\n" + json.dumps(good[1]) + "\n").encode())
    add("deep_field.jsonl", "jsonl", (json.dumps(good[0]) + '\n{"question": "q", "answer": "a", "x": ' + deep
                                      + "}\n").encode())
    add("deep_object.json", "json", ('{"a": ' + "{\"b\": " * 100_000 + "1" + "}" * 100_001).encode())
    csv_rows = ["question,answer,department,title", '"What is fever?,It is a raised temperature.,general,fever']
    csv_rows += [f"{g['question']},{g['answer']},general,t{i}" for i, g in enumerate(good)]
    add("unclosed_quote.csv", "csv", "\n".join(csv_rows).encode())
    return files


def fuzz() -> dict:
    from medrl.data.config import DataConfig, SourceSpec
    from medrl.data.sources import iter_rows, resolve_spec, source_files
    from medrl.errors import UsageError

    crashes = 0
    csv_good = csv_reason = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, fmt, path in _fuzz_files(Path(tmp)):
            data = DataConfig(catalog={"fuzz": SourceSpec(format=fmt, path=str(path),
                                                          fields={"question": "question", "answer": "answer"})})
            spec = resolve_spec(data, "fuzz")
            try:
                rows = list(iter_rows("fuzz", spec, source_files("fuzz", spec, data), data.max_row_bytes))
            except UsageError as exc:
                print(f"  fuzz {name:20s} usage error: {exc}")
                continue
            except BaseException as exc:  # noqa: BLE001 - a crash is what we count
                crashes += 1
                print(f"  fuzz {name:20s} CRASH {type(exc).__name__}")
                continue
            ok = [r for r in rows if r.record is not None]
            rejects = [f"line {r.line}: {r.error}" for r in rows if r.record is None]
            print(f"  fuzz {name:20s} {len(ok)} rows, {len(rejects)} rejects: {rejects[:2]}")
            if name == "unclosed_quote.csv":
                csv_good, csv_reason = len(ok), rejects[:1]
    return {"fuzz_crashes": crashes, "csv_unclosed_quote_good_rows_kept": f"{csv_good}/26",
            "csv_unclosed_quote_reason": csv_reason}


NEEDLES = {
    "config_not_utf8": "not UTF-8", "config_duplicate_key": "duplicate key", "ray_num_cpus_negative": "ray.num_cpus",
    "kl_target_inf": "ppo.kl.target", "secret_in_api_key_env": "looks like an API key",
    "tiny_model_out_unwritable": "cannot write", "judge_out_unwritable": "cannot write",
    "judge_limit_negative": "--limit", "judge_input_dir": "is a directory", "judge_wrong_api_key": "401",
    "judge_unknown_model": "404", "judge_corrupted_cache": "judge cache", "report_not_a_run": "not a run directory",
    "ppo_missing_data": "rl_prompts.jsonl"}
"""What the one-line error of each case must mention."""


def _cli_cases(d: Path, server_url: str) -> list[tuple[str, list[str], dict, str]]:
    """(name, args, extra env, expectation: 'error' (exit 2, one line), 'fast_error' (the same, before any Ray
    runtime starts: no new Ray session directory), 'ok' (exit 0)). An error must also name what is wrong
    (``NEEDLES``)."""
    (d / "afile").write_text("x")
    cfg = d / "cfg.yaml"
    cfg.write_text(f"run:\n  root: {d}/runs\n")
    latin1 = d / "latin1.yaml"
    latin1.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    dup = d / "dup.yaml"
    dup.write_text("run:\n  seed: 1\n  seed: 2\n")
    items = d / "in.jsonl"
    items.write_text("".join(json.dumps({"id": str(i), "prompt": "Fever?", "response": "<think>\nok\n</think>\n\n"
                                          f"Rest and fluids {i}.", "reference": "rest fluids"}) + "\n"
                             for i in range(20)))
    garbage = d / "garbage.sqlite"
    garbage.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    base = ["--config", str(cfg)]
    judge = ["judge", *base, "--input", str(items), "--out", str(d / "out.jsonl"), "ray.num_cpus=1",
             "reward.judge.num_actors=1", f"reward.cache.path={d}/cache.sqlite"]
    online = ["reward.judge.provider=openai", f"reward.judge.base_url={server_url}", "reward.judge.max_retries=0"]
    key = {"DEEPSEEK_API_KEY": "sk-wrong-key-0000000000000000"}
    return [
        ("config_not_utf8", ["estimate-memory", "--config", str(latin1)], {}, "error"),
        ("config_duplicate_key", ["estimate-memory", "--config", str(dup)], {}, "error"),
        ("ray_num_cpus_negative", [*judge, "reward.judge.provider=none", "ray.num_cpus=-1"], {}, "error"),
        ("kl_target_inf", ["estimate-memory", *base, "ppo.kl.target=.inf"], {}, "error"),
        ("overrides_valid_together", ["estimate-memory", *base, "reward.judge.model=my-llm",
                                      "reward.judge.prices.my-llm={input: 0, input_cache_hit: 0, output: 0}"], {},
         "ok"),
        ("secret_in_api_key_env", ["estimate-memory", *base, f"reward.judge.api_key_env={FAKE_KEY}"],
         {}, "error"),
        ("tiny_model_out_unwritable", ["tiny-model", "--out", str(d / "afile" / "m")], {}, "error"),
        ("judge_out_unwritable", [*judge[:-5], "--out", str(d / "afile" / "o.jsonl"), *judge[-3:],
                                  "reward.judge.provider=reference"], {}, "error"),
        ("judge_limit_negative", ["judge", "--limit", "-5", *judge[1:], "reward.judge.provider=none"], {}, "error"),
        ("judge_input_dir", ["judge", *base, "--input", str(d), "--out", str(d / "o.jsonl")], {}, "error"),
        ("judge_wrong_api_key", [*judge, *online], key, "error"),
        ("judge_unknown_model", [*judge, *online, "reward.judge.model=no-such-model",
                                 "reward.judge.prices.no-such-model={input: 0, input_cache_hit: 0, output: 0}"],
         {"DEEPSEEK_API_KEY": "right-key"}, "error"),
        ("judge_corrupted_cache", [*judge[:-1], f"reward.cache.path={garbage}", *online],
         {"DEEPSEEK_API_KEY": "right-key"}, "error"),
        ("report_not_a_run", ["report", str(d / "afile").rsplit("/", 1)[0]], {}, "error"),
        ("ppo_missing_data", ["ppo", *base, "run.name=empty", "ray.num_cpus=1"], {}, "fast_error"),
    ]


def cli() -> dict:
    from medrl.testing.loopback_server import LoopbackJudge

    bad = tracebacks = n = 0
    with tempfile.TemporaryDirectory(prefix="hd", dir="/tmp") as tmp, \
            LoopbackJudge(api_key="right-key", models=["deepseek-chat"]) as server:
        d = Path(tmp)
        for name, args, env, expect in _cli_cases(d, server.base_url):
            n += 1
            sessions = len(list(Path(tmp).rglob("session_*")))
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "medrl.cli", *args], cwd=d, capture_output=True, text=True,
                               env={**os.environ, "RAY_TMPDIR": tmp, **env}, timeout=300)
            secs = time.perf_counter() - t0
            err = r.stderr.strip().splitlines()
            tb = "Traceback" in r.stderr
            wrong = (r.returncode != 0) if expect == "ok" else (r.returncode != 2)
            ray_started = len(list(Path(tmp).rglob("session_*"))) > sessions
            wrong = wrong or (expect == "fast_error" and ray_started)
            wrong = wrong or (expect != "ok" and NEEDLES[name] not in (err[-1] if err else ""))
            leaked = name == "secret_in_api_key_env" and FAKE_KEY in r.stderr + r.stdout + "".join(
                p.read_text(errors="replace") for p in d.rglob("*") if p.is_file())
            bad += tb or wrong or leaked
            tracebacks += tb
            last = err[-1][:150] if err else ""
            print(f"  cli {name:26s} rc {r.returncode} {secs:5.1f}s {'TRACEBACK ' if tb else ''}"
                  f"{'LEAK ' if leaked else ''}{'BAD ' if wrong else ''}| {last}")
    return {"cli_bad": f"{bad}/{n}", "cli_tracebacks": tracebacks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-cli", action="store_true")
    a = p.parse_args()
    import medrl

    print(f"medrl code: {Path(medrl.__file__).parent}")
    summary = {**attacks(), **judge_injections(), **stuffing(), **rubric(), **fuzz()}
    if not a.skip_cli:
        summary.update(cli())
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
