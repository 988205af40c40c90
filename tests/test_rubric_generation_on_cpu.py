"""Rubric generation (Rubrics as Rewards): the reply's validation and the category points, the offline reference
rubric, then ``medrl rubrics generate`` against the loopback judge over real HTTP (once per prompt, never paid
twice, faults and malformed replies, a key another process holds), the dry run without a key, the store table on
SQLite and on a real PostgreSQL server, and the CLI's one-line errors."""
from __future__ import annotations

import json
import secrets
import threading
import time

import pytest

from medrl.cli import main
from medrl.reward.config import CacheConfig, RewardConfig
from medrl.reward.rubric import JudgementError
from medrl.reward.rubric_gen import parse_generated, reference_rubric, rubric_key, system_prompt, with_points
from medrl.reward.rubric_gen_cli import read_prompts, run_generate
from medrl.reward.store.database import open_store
from medrl.reward.text import estimate_tokens
from medrl.testing.loopback_server import LoopbackJudge

FAKE_KEY = "sk-medrl-rubrics-" + secrets.token_hex(8)
KEY_ENV = "MEDRL_TEST_RUBRIC_KEY"
URL_ENV = "MEDRL_TEST_RUBRIC_DB"

PROMPTS = [
    {"id": "a", "question": "Chest pain and sweating for 20 minutes, what should I do?",
     "reference": "Call emergency services now. This may be a heart attack. Chew aspirin if not allergic."},
    {"id": "b", "messages": [{"role": "user", "content": "我孩子发烧了"}, {"role": "assistant", "content": "多少度？"},
                             {"role": "user", "content": "39度，精神还好"}],
     "reference": "可以用对乙酰氨基酚退热。多喝水。如果出现抽搐或精神差，立即就医。", "language": "zh"},
    {"id": "a-again", "question": "Chest pain and sweating for 20 minutes, what should I do?",
     "reference": "Call emergency services now. This may be a heart attack. Chew aspirin if not allergic."},
    {"id": "no-ref", "question": "Is coffee healthy?", "reference": None},
    {"id": "has-rubric", "question": "Q?", "reference": "R.",
     "rubrics": [{"criterion": "Says R.", "points": 5, "tags": []}]},
]


def _reply(n, **over):
    rows = [{"criterion": f"Criterion {k}.", "category": "Important", "axis": "completeness"} for k in range(n)]
    rows[0].update(category="Essential", axis="accuracy")
    rows[-1].update(over)
    return json.dumps({"criteria": rows})


def test_reply_validation_and_points():
    parse = parse_generated(7, 20)
    got = parse(_reply(8, category="Pitfall"))
    assert len(got) == 8 and got[-1] == {"criterion": "Criterion 7.", "category": "pitfall", "axis": "completeness"}
    with pytest.raises(JudgementError, match="6 distinct criteria, expected 7-20"):
        parse(_reply(6))
    with pytest.raises(JudgementError, match="6 distinct criteria"):  # a duplicate does not count
        parse(_reply(7, criterion="criterion   0."))
    with pytest.raises(JudgementError, match="category 'Critical'"):
        parse(_reply(7, category="Critical"))
    with pytest.raises(JudgementError, match="no Essential"):
        parse(json.dumps({"criteria": [{"criterion": f"c{k}", "category": "Optional"} for k in range(7)]}))
    with pytest.raises(JudgementError, match="empty content"):
        parse("")
    assert parse(_reply(7, axis="bedside manner"))[-1]["axis"] == "accuracy"  # unknown axis: accuracy
    rubric = with_points(got, {"essential": 5, "important": 3, "optional": 1, "pitfall": -5})
    assert [c["points"] for c in rubric] == [5] + [3] * 6 + [-5]
    assert rubric[0]["tags"] == ["axis:accuracy", "category:essential"]


def test_reference_rubric_is_small_and_deterministic():
    en = reference_rubric("Call emergency services now. This may be a heart attack. Chew aspirin if not allergic.",
                          "en")
    assert [c["criterion"] for c in en] == ["The response states: Call emergency services now.",
                                            "The response states: This may be a heart attack.",
                                            "The response states: Chew aspirin if not allergic."]
    assert [c["category"] for c in en] == ["essential", "essential", "important"]
    zh = reference_rubric("可以用对乙酰氨基酚退热。多喝水。如果出现抽搐，立即就医。", None)
    assert zh[0]["criterion"] == "回答指出：可以用对乙酰氨基酚退热。" and len(zh) == 3
    assert len(reference_rubric(". ".join(f"Point {k} about insulin" for k in range(10)), "en")) == 6
    assert reference_rubric("", "en") == []
    assert en == reference_rubric("Call emergency services now. This may be a heart attack. Chew aspirin if not "
                                  "allergic.", "en")


@pytest.fixture(scope="module")
def server():
    with LoopbackJudge(api_key=FAKE_KEY) as srv:
        yield srv


def _cfg(server, cache: CacheConfig, **judge) -> RewardConfig:
    base = {"base_url": server.base_url, "api_key_env": KEY_ENV, "timeout_s": 5.0, "max_retries": 0,
            "malformed_retries": 1, "rpm": 0, "tpm": 0, "budget_usd": None}
    return RewardConfig.model_validate({"judge": {**base, **judge}, "cache": cache.model_dump()})


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_generate_against_the_loopback_judge(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    server.reset()
    cfg = _cfg(server, CacheConfig(path=str(tmp_path / "store.sqlite")))
    src = _write(tmp_path / "prompts.jsonl", PROMPTS)
    out = run_generate(cfg, input_path=src, out_path=tmp_path / "rubrics.jsonl")
    assert server.stats()["total"] == 2  # a and a-again share one rubric; no reference / has a rubric: not sent
    assert (out["prompts"], out["distinct"], out["ok"], out["skipped"]) == (
        3, 2, 2, {"no_reference": 1, "has_rubric": 1})
    assert out["cost_usd"] > 0 and out["tokens_in"] > 0
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "rubrics.jsonl").read_text().splitlines())}
    assert list(rows) == ["a", "b", "a-again"] and rows["a"]["rubrics"] == rows["a-again"]["rubrics"]
    a = rows["a"]["rubrics"]
    assert len(a) == 7  # the prompt's lower bound: 3 reference sentences, a pitfall, 3 optional
    assert [c["points"] for c in a] == [5, 3, 3, -5, 1, 1, 1]
    assert a[0]["criterion"] == "States that Call emergency services now." and "category:essential" in a[0]["tags"]
    assert rows["b"]["question"] == "39度，精神还好"
    assert rows["b"]["generator"] == "openai:deepseek-chat · medrl-rubric-gen-v1"
    # the file is what prepare reads back: every row a valid rubric
    from medrl.reward.types import RewardInput

    assert all(RewardInput.from_record({"prompt": "q", "response": "", "rubrics": r["rubrics"]}).rubrics
               for r in rows.values())
    # a second run (other points, other output file) pays nothing: the store answers
    cfg2 = cfg.model_copy(update={"rubric_generation": cfg.rubric_generation.model_copy(update={
        "points": cfg.rubric_generation.points.model_copy(update={"essential": 8.0})})})
    again = run_generate(cfg2, input_path=src, out_path=tmp_path / "again.jsonl")
    assert server.stats()["total"] == 2 and (again["cached"], again["ok"], again["cost_usd"]) == (2, 0, 0.0)
    first = json.loads((tmp_path / "again.jsonl").read_text().splitlines()[0])
    assert first["rubrics"][0]["points"] == 8.0 and first["status"] == "cached"
    # the dry run needs no key, and knows what is stored
    monkeypatch.delenv(KEY_ENV)
    est = run_generate(cfg, input_path=src, out_path=tmp_path / "unused.jsonl", dry_run=True)
    assert (est["stored"], est["duplicates"], est["to_generate"], est["cost_usd_max"]) == (2, 1, 0, 0.0)
    more = _write(tmp_path / "more.jsonl", [{"id": f"n{k}", "question": f"New question {k}?",
                                             "reference": f"Answer {k}."} for k in range(4)])
    est = run_generate(cfg, input_path=more, out_path=tmp_path / "unused.jsonl", dry_run=True)
    assert est["to_generate"] == 4 and 0 < est["cost_usd_typical"] < est["cost_usd_max"]
    assert est["tokens_in_cache_hit_expected"] == 3 * estimate_tokens(system_prompt(7, 20))  # calls 2-4
    assert not (tmp_path / "unused.jsonl").exists() and server.stats()["total"] == 2


def test_faults_and_bad_replies_fail_the_prompt_not_the_run(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    server.reset()
    cfg = _cfg(server, CacheConfig(path=str(tmp_path / "store.sqlite")))
    src = _write(tmp_path / "p.jsonl", [
        {"id": "ok", "question": "Q1?", "reference": "Rest. Drink water."},
        {"id": "busy", "question": "Q2? [[fault:503]]", "reference": "R2."},
        {"id": "short", "question": "Q3? [[criteria:3]]", "reference": "R3."},
        {"id": "flaky", "question": "Q4? [[fault:malformed*1]]", "reference": "R4."}])
    out = run_generate(cfg, input_path=src, out_path=tmp_path / "r.jsonl")
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert (out["ok"], out["failed"]) == (2, 2)
    assert rows["busy"]["rubrics"] is None and rows["busy"]["reason"].startswith("HTTP 503")
    assert rows["short"]["rubrics"] is None
    assert "3 distinct criteria, expected 7-20 (2 calls)" in rows["short"]["reason"]
    assert len(rows["flaky"]["rubrics"]) == 7  # a malformed reply is asked again
    assert FAKE_KEY not in (tmp_path / "r.jsonl").read_text()
    # failures were not stored: the next run asks again (and only for them)
    server.reset()
    run_generate(cfg, input_path=src, out_path=tmp_path / "r2.jsonl")
    assert server.stats()["total"] == 1 + 2  # busy once, short twice (malformed retry); ok and flaky stored


def test_a_key_another_process_holds_is_waited_for(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    server.reset()
    cache = CacheConfig(path=str(tmp_path / "store.sqlite"), claim_ttl_s=30)
    cfg = _cfg(server, cache)
    prompt = {"id": "x", "question": "Q?", "reference": "Take paracetamol. Rest."}
    src = _write(tmp_path / "p.jsonl", [prompt])
    g = cfg.rubric_generation
    key = rubric_key(cfg.judge.model, g.version, [{"role": "user", "content": "Q?"}], prompt["reference"],
                     g.min_criteria, g.max_criteria)
    other = open_store(cache)
    assert other.claim_many([key], "other-run", 30) == {key}
    criteria = [{"criterion": f"c{k}", "category": "essential", "axis": "accuracy"} for k in range(7)]

    def finish():
        time.sleep(0.6)
        other.put_rubric({"key": key, "generator": "g", "version": g.version, "criteria": criteria, "prompt": "p",
                          "reference": prompt["reference"], "tokens_in": 1, "tokens_out": 1, "tokens_cache_hit": 0,
                          "cost_usd": 0.01}, "other-run")

    t = threading.Thread(target=finish)
    t.start()
    out = run_generate(cfg, input_path=src, out_path=tmp_path / "r.jsonl")
    t.join()
    other.close()
    assert (out["cached"], out["ok"], server.stats()["total"]) == (1, 0, 0)
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert [c["criterion"] for c in row["rubrics"]] == [f"c{k}" for k in range(7)]


def test_store_table_on_postgres(postgres, server, tmp_path, monkeypatch):
    monkeypatch.setenv(URL_ENV, postgres.url)
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    cache = CacheConfig(backend="postgres", url_env=URL_ENV)
    store = open_store(cache)
    store._run("TRUNCATE generated_rubrics, claims")
    rec = {"key": "k1", "generator": "g", "version": "v", "criteria": [{"criterion": "一", "category": "essential",
                                                                         "axis": "accuracy"}],
           "prompt": "p", "reference": "r", "tokens_in": 3, "tokens_out": 4, "tokens_cache_hit": 0, "cost_usd": 0.5}
    assert store.claim_many(["k1"], "me", 30) == {"k1"}
    store.put_rubric(rec, "me")
    store.put_rubric({**rec, "criteria": []})  # first writer wins
    assert store.rubrics_many(["k1", "k2"]) == {"k1": rec["criteria"]}
    assert store.claim_many(["k1"], "someone", 30) == {"k1"}  # put dropped my claim
    store.close()
    server.reset()
    cfg = _cfg(server, cache)
    src = _write(tmp_path / "p.jsonl", PROMPTS[:2])
    assert run_generate(cfg, input_path=src, out_path=tmp_path / "a.jsonl")["ok"] == 2
    assert run_generate(cfg, input_path=src, out_path=tmp_path / "b.jsonl")["cached"] == 2
    assert server.stats()["total"] == 2


def test_cli_offline_rubrics_and_one_line_errors(tmp_path, capsys):
    src = _write(tmp_path / "p.jsonl", PROMPTS[:2])
    args = ["rubrics", "generate", "--input", str(src), "--out", str(tmp_path / "r.jsonl"), f"run.root={tmp_path}",
            "reward.judge.provider=reference", f"reward.cache.path={tmp_path}/c.sqlite"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [len(r["rubrics"]) for r in rows] == [3, 3] and rows[0]["generator"].startswith("reference:")
    assert rows[1]["rubrics"][0] == {"criterion": "回答指出：可以用对乙酰氨基酚退热。", "points": 5.0,
                                     "tags": ["axis:accuracy", "category:essential"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "question": "q", "reference": "r"}\n{"id": "2", "messages": [{"role": "user"}]}\n')
    capsys.readouterr()
    assert main([*args[:2], "--input", str(bad), *args[4:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medrl: error: {bad}:2: missing field 'messages.0.content'") and "\n" not in err
    assert read_prompts(src, limit=1)[0][0]["id"] == "a"


def test_prepare_reads_the_edited_rubrics_back(tmp_path):
    from medrl.config import load_config
    from medrl.prepare.stage import run_prepare
    from medrl.errors import UsageError
    from medrl.runs import RunDir

    src = _write(tmp_path / "qa.jsonl", [
        {"q": "What should I do for chest pain with sweating?", "r": "Call emergency services now. Chew aspirin."},
        {"q": "How is iron deficiency anaemia treated?", "r": "Oral iron. Treat the cause of the blood loss."}])
    pool = _write(tmp_path / "pool.jsonl", [{"q": f"Is {k} hours of sleep enough for an adult?",
                                             "a": "Adults need seven to nine hours."} for k in range(4, 10)])
    base = [f"run.root={tmp_path}/runs", f"model.path={tmp_path}/no-model", "model.build_tiny_if_missing=false",
            "data.sources=[qa,pool]", "data.catalog.qa.format=jsonl", f"data.catalog.qa.path={src}",
            "data.catalog.qa.fields={question: q, reference: r}", "data.catalog.qa.role=benchmark",
            "data.catalog.pool.format=jsonl", f"data.catalog.pool.path={pool}",
            "data.catalog.pool.fields={question: q, answer: a}", "data.gold_size=0"]

    def prepare(*extra):
        cfg = load_config(None, [*base, *extra])
        run = RunDir.from_config(cfg)
        run_prepare(cfg, run)
        rows = [json.loads(x) for x in (run.data / "qa.jsonl").read_text().splitlines()]
        return sorted(rows, key=lambda r: not r["question"].startswith("What should I do"))  # chest pain first

    first = prepare()
    assert [r.get("rubrics") for r in first] == [None, None]
    made = tmp_path / "rubrics.jsonl"
    args = ["rubrics", "generate", "--input", str(tmp_path / "runs/default/data/qa.jsonl"), "--out", str(made),
            *base[:3], "reward.judge.provider=reference", f"reward.cache.path={tmp_path}/c.sqlite"]
    assert main(args) == 0
    rows = sorted((json.loads(x) for x in made.read_text().splitlines()),
                  key=lambda r: not r["question"].startswith("What should I do"))
    assert [r["id"] for r in rows] == [r["id"] for r in first]
    rows[0]["rubrics"][1] = {"criterion": "Tells the patient to chew 300 mg aspirin.", "points": 4, "tags": []}
    rows[1]["rubrics"] = None  # a failed generation: passed over
    _write(made, rows)
    second = prepare(f"data.catalog.qa.rubrics={made}")
    assert second[0]["rubrics"][1] == {"criterion": "Tells the patient to chew 300 mg aspirin.", "points": 4.0,
                                       "tags": []}
    assert second[0]["rubrics"][0]["criterion"] == "The response states: Call emergency services now."
    assert second[1].get("rubrics") is None
    rows[0]["rubrics"][0]["points"] = 12
    _write(made, rows)
    bad_points = rf"^{made}:1: field 'rubrics\.0\.points' must be a number in \[-10, 10\], got 12$"
    with pytest.raises(UsageError, match=bad_points):
        prepare(f"data.catalog.qa.rubrics={made}")


def test_prepare_option_generates_rubrics(tmp_path):
    from medrl.config import load_config
    from medrl.prepare.stage import run_prepare
    from medrl.runs import RunDir

    src = _write(tmp_path / "qa.jsonl", [
        {"q": "What should I do for chest pain with sweating?", "r": "Call emergency services now. Chew aspirin."},
        {"q": "Is a rash after amoxicillin an allergy?", "r": None}])  # no reference: no rubric
    pool = _write(tmp_path / "pool.jsonl", [{"q": f"Is {k} hours of sleep enough for an adult?",
                                             "a": "Adults need seven to nine hours."} for k in range(4, 10)])
    cfg = load_config(None, [
        f"run.root={tmp_path}/runs", f"model.path={tmp_path}/no-model", "model.build_tiny_if_missing=false",
        "data.sources=[qa,pool]", "data.catalog.qa.format=jsonl", f"data.catalog.qa.path={src}",
        "data.catalog.qa.fields={question: q, reference: r, answer: r}", "data.catalog.qa.role=benchmark",
        "data.catalog.qa.generate_rubrics=true", "data.catalog.pool.format=jsonl",
        f"data.catalog.pool.path={pool}", "data.catalog.pool.fields={question: q, answer: a}", "data.gold_size=0",
        "reward.judge.provider=reference", f"reward.cache.path={tmp_path}/c.sqlite"])
    run = RunDir.from_config(cfg)
    run_prepare(cfg, run)
    rows = {r["question"][:7]: r for r in map(json.loads, (run.data / "qa.jsonl").read_text().splitlines())}
    assert [c["criterion"] for c in rows["What sh"]["rubrics"]] == [
        "The response states: Call emergency services now.", "The response states: Chew aspirin."]
    made = [json.loads(x) for x in (run.data / "rubrics" / "qa.jsonl").read_text().splitlines()]
    assert [m["id"] for m in made] == [rows["What sh"]["id"]] and made[0]["rubrics"] == rows["What sh"]["rubrics"]
    assert not [p for p in run.data.glob("*.jsonl") if "rubric" in p.name]  # not an eval set or a split


def test_a_bad_key_stops_at_once_and_is_never_shown(server, tmp_path, monkeypatch):
    from medrl.reward.judge_errors import JudgeSetupError

    wrong = "sk-wrong-" + secrets.token_hex(8)
    monkeypatch.setenv(KEY_ENV, wrong)
    server.reset()
    cfg = _cfg(server, CacheConfig(path=str(tmp_path / "store.sqlite")))
    src = _write(tmp_path / "p.jsonl", [{"id": f"k{k}", "question": f"Q{k}?", "reference": f"R{k}."}
                                        for k in range(6)])
    with pytest.raises(JudgeSetupError) as err:
        run_generate(cfg, input_path=src, out_path=tmp_path / "r.jsonl")
    assert wrong not in str(err.value) and "\n" not in str(err.value)
    assert server.stats()["unauthorized"] <= cfg.judge.concurrency  # nothing more is sent after the first refusal
    assert not (tmp_path / "r.jsonl").exists()
    store = open_store(CacheConfig(path=str(tmp_path / "store.sqlite")))
    assert store.claim_many(["x"], "probe", 1) == {"x"} and store._run("SELECT COUNT(*) FROM claims").fetchone()[0] == 1
    store.close()  # the stopped run left no claim behind
