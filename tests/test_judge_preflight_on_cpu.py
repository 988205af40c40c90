"""Fail-fast judge set-up: a wrong key or an unknown model stops a run at once with one line (checked with one
call before Ray starts, and again if it happens mid-run), never as per-sample failures; a corrupted judge cache is
one line naming the file, and the file is never modified."""
from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from pathlib import Path

import pytest

from medrl.errors import UsageError
from medrl.reward.config import CacheConfig, RewardConfig
from medrl.reward.judge import OpenAIJudge
from medrl.reward.judge_errors import JudgeSetupError
from medrl.reward.ledger import Ledger, local_gate
from medrl.reward.preflight import check_cache_file, probe_judge
from medrl.reward.store.database import open_store
from medrl.testing.loopback_server import LoopbackJudge

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-right-0123456789abcdef"
WRONG = "sk-wrong-9876543210fedcba"


def _cache(path: Path, rows: int = 400) -> Path:
    cache = open_store(CacheConfig(path=str(path)))
    for i in range(rows):
        cache.put({"key": f"k{i}", "judge": "j", "rubric_version": "v", "accuracy": 1, "safety": 2, "completeness": 3,
                   "clarity": 4, "reason": "r" * 200, "prompt": "p" * 300, "answer": f"a{i}", "reference": None,
                   "tokens_in": 1, "tokens_out": 1, "tokens_cache_hit": 0, "cost_usd": 0.0})
    cache.close()
    return path


def test_corrupted_cache_is_one_line_naming_the_file_and_never_modified(tmp_path):
    good = _cache(tmp_path / "good.sqlite")
    check_cache_file(good)
    check_cache_file(tmp_path / "absent.sqlite")
    data = good.read_bytes()
    (tmp_path / "truncated.sqlite").write_bytes(data[: len(data) // 3])
    (tmp_path / "garbage.sqlite").write_bytes(data[:100] + os.urandom(len(data) - 100))
    (tmp_path / "text.sqlite").write_text("not a database\n")
    db = sqlite3.connect(tmp_path / "schema.sqlite")
    db.execute("CREATE TABLE judgements (key TEXT, verdict TEXT)")
    db.commit()
    db.close()
    (tmp_path / "dir.sqlite").mkdir()
    expected = {"truncated": "is damaged", "garbage": "is damaged", "text": "is not an SQLite database",
                "schema": "has a 'judgements' table of another schema", "dir": "is a directory"}
    for name, what in expected.items():
        path = tmp_path / f"{name}.sqlite"
        before = None if path.is_dir() else path.read_bytes()
        with pytest.raises(UsageError) as e:
            check_cache_file(path)
        msg = str(e.value)
        assert msg.startswith(f"judge cache {path} {what}") and "\n" not in msg, msg
        assert name == "dir" or "it was not modified: move it aside" in msg
        assert before is None or path.read_bytes() == before
        assert not Path(f"{path}-wal").exists() and not Path(f"{path}-journal").exists()


@pytest.fixture(scope="module")
def server():
    with LoopbackJudge(api_key=KEY, models=["deepseek-chat", "my-llm"]) as srv:
        yield srv


def _judge_cfg(server, **kw):
    prices = {"deepseek-chat": {"input": 0.28, "input_cache_hit": 0.028, "output": 0.42},
              "nope": {"input": 0, "input_cache_hit": 0, "output": 0}}
    return RewardConfig.model_validate({"judge": {"base_url": server.base_url, "max_retries": 0, "timeout_s": 5,
                                                  "prices": prices, **kw}}).judge


def test_probe_stops_on_key_and_model_errors(server):
    server.reset()
    with pytest.raises(JudgeSetupError) as e:
        probe_judge(_judge_cfg(server), WRONG)
    assert "refused the API key (HTTP 401" in str(e.value) and "$DEEPSEEK_API_KEY" in str(e.value)
    assert WRONG not in str(e.value)
    with pytest.raises(JudgeSetupError, match=r"does not know model 'nope' \(HTTP 404"):
        probe_judge(_judge_cfg(server, model="nope"), KEY)
    probe_judge(_judge_cfg(server), KEY)
    assert server.stats()["unauthorized"] == 1 and server.stats()["total"] == 1


def test_a_key_revoked_mid_run_raises_instead_of_failing_samples(server):
    jc = _judge_cfg(server)
    async def run():
        gate = local_gate(Ledger(0, 0, None), lease_size=4)
        judge = OpenAIJudge(jc, WRONG)
        try:
            return await judge.judge("Fever?", "Rest and fluids.", None, gate)
        finally:
            await judge.close()
    with pytest.raises(JudgeSetupError, match="HTTP 401"):
        asyncio.run(run())


def test_cli_judge_with_a_wrong_key_exits_2_before_ray(server, tmp_path, monkeypatch, capsys):
    import ray

    from medrl.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "prompt": "Fever?", "response": f"Rest {i}."}) + "\n"
                           for i in range(20)))
    monkeypatch.setenv("DEEPSEEK_API_KEY", WRONG)
    monkeypatch.chdir(REPO)
    server.reset()
    rc = main(["judge", "--config", "configs/local_tiny.yaml", "--input", str(src), "--out", str(tmp_path / "o.jsonl"),
               f"run.root={tmp_path}/runs", "reward.judge.provider=openai", f"reward.judge.base_url={server.base_url}",
               f"reward.cache.path={tmp_path}/c.sqlite", "reward.judge.max_retries=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "refused the API key (HTTP 401" in err[0], err
    assert server.stats()["unauthorized"] == 1 and not ray.is_initialized() and not (tmp_path / "o.jsonl").exists()


def test_rate_limit_cost_is_counted_per_call_and_warned_when_it_binds(caplog):
    from medrl.reward.ledger import RateWaitMeter

    now = [0.0]
    ledger = Ledger(rpm=60, tpm=0, budget_usd=None, clock=lambda: now[0])  # one call a second
    grants = [ledger.lease(8, 10, 0.0) for _ in range(3)]
    assert grants == [(1, 1.0), (1, 2.0), (1, 3.0)]
    stats = ledger.stats()
    assert stats["rate_wait_call_s"] == 6.0 and stats["rate_limited_calls"] == 3
    meter = RateWaitMeter(RewardConfig().judge)
    with caplog.at_level("WARNING", logger="medrl.reward"):
        assert meter.step({"rate_wait_call_s": 0.5, "rate_limited_calls": 1}, 10.0) == 0.5  # under a tenth
        assert meter.step({"rate_wait_call_s": 6.5, "rate_limited_calls": 4}, 4.0) == 6.0  # binds: warned once
        assert meter.step({"rate_wait_call_s": 12.5, "rate_limited_calls": 7}, 4.0) == 6.0
    assert [r.getMessage() for r in caplog.records] == [
        "the judge rate limit binds: 3 calls waited 6 s in all (2.00 s each) over 4.0 s (reward.judge.rpm=1200, "
        "tpm=2000000); raise them if your provider allows more"]


def test_failed_judgements_warn_once_per_batch(server, tmp_path, caplog):
    from medrl.reward.scoring import Scorer
    from medrl.reward.types import RewardInput

    cfg = RewardConfig.model_validate({"judge": {"base_url": server.base_url, "max_retries": 0, "timeout_s": 5,
                                                 "malformed_retries": 0},
                                       "cache": {"path": str(tmp_path / "c.sqlite")}})
    async def run():
        gate = local_gate(Ledger(0, 0, None), lease_size=8)
        scorer = Scorer(cfg, gate, KEY)
        try:
            return await scorer.score_batch([RewardInput(str(i), "Fever?", f"Rest {i}. [[fault:500]]")
                                             for i in range(12)])
        finally:
            await scorer.close()
    with caplog.at_level("DEBUG", logger="medrl.reward"):
        results = asyncio.run(run())
    assert [r.judge_status for r in results] == ["failed"] * 12
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["12 of 12 judgements failed in this batch (scored without them, dropped); first: HTTP 500 "
                        "(client retries: 0): Error code: 500 - server busy"]  # on_failure: drop is the default
    assert all(r.dropped for r in results)
    assert sum("judgement failed for item" in r.getMessage() for r in caplog.records) == 12  # in the log file


def _closed_port_url() -> str:
    import socket

    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_probe_stops_when_the_judge_cannot_be_reached(server):
    """Refused, DNS and TLS failures at the pre-start check are fatal (one line naming the URL, never the key)."""
    cases = [(_closed_port_url(), "connection refused"),
             ("http://medrl-judge.invalid/v1", "DNS lookup failed"),  # .invalid never resolves (RFC 6761)
             (server.base_url.replace("http://", "https://"), "TLS handshake failed (WRONG_VERSION_NUMBER)")]
    for url, what in cases:
        with pytest.raises(JudgeSetupError) as e:
            probe_judge(_judge_cfg(server, base_url=url), KEY)
        assert str(e.value).startswith(f"the judge at {url} cannot be reached: {what}"), str(e.value)
        assert KEY not in str(e.value) and "\n" not in str(e.value)


def test_mid_run_failure_reasons_say_what_happened(server):
    async def reason(url: str, answer: str = "Rest and fluids.") -> str:
        judge = OpenAIJudge(_judge_cfg(server, base_url=url, timeout_s=1.5, malformed_retries=0), KEY)
        try:
            out = await judge.judge("Fever?", answer, None, local_gate(Ledger(0, 0, None), lease_size=4))
        finally:
            await judge.close()
        assert out.status == "failed"
        return out.reason

    async def all_reasons():
        return await asyncio.gather(reason(_closed_port_url()), reason(server.base_url, "x [[fault:timeout]]"),
                                    reason(server.base_url, "x [[fault:503]]"),
                                    reason(server.base_url, "x [[fault:malformed]]"))

    refused, timeout, busy, malformed = asyncio.run(all_reasons())
    assert refused == "connection refused (client retries: 0)"
    assert timeout == "timeout (client retries: 0)"
    assert busy.startswith("HTTP 503 (client retries: 0)")
    assert malformed.startswith("malformed JSON")


def test_cli_judge_with_an_unreachable_judge_exits_2_before_ray(tmp_path, monkeypatch, capsys):
    import ray

    from medrl.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "1", "prompt": "Fever?", "response": "Rest."}) + "\n")
    monkeypatch.setenv("DEEPSEEK_API_KEY", KEY)
    monkeypatch.chdir(REPO)
    url = _closed_port_url()
    rc = main(["judge", "--config", "configs/local_tiny.yaml", "--input", str(src), "--out", str(tmp_path / "o.jsonl"),
               f"run.root={tmp_path}/runs", "reward.judge.provider=openai", f"reward.judge.base_url={url}",
               f"reward.cache.path={tmp_path}/c.sqlite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"medrl: error: the judge at {url} cannot be reached: connection refused: check "
                               "reward.judge.base_url"], err
    assert not ray.is_initialized() and not (tmp_path / "o.jsonl").exists()
