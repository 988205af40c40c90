"""The judge store survives a PostgreSQL restart: a real server (``tests/pg_server.py``) is stopped (fast shutdown:
every connection is cut) and started again while a real RewardPool (local Ray, two judge actors) judges against the
loopback judge. Every item is judged, each key is requested once, the judgements in flight are stored after the
reconnect and no claim is left; a store that stays down past ``reward.cache.outage_s`` stops with one line."""
from __future__ import annotations

import json
import secrets
import threading
import time

import pytest

from medrl.reward.config import CacheConfig, RewardConfig
from medrl.reward.store.database import StoreDownError, open_store
from medrl.reward.types import RewardInput
from medrl.testing.loopback_server import LoopbackJudge

FAKE_KEY = "sk-medrl-outage-" + secrets.token_hex(8)
URL_ENV = "MEDRL_TEST_OUTAGE_URL"


def _items(n: int, tag: str) -> list[RewardInput]:
    return [RewardInput(id=f"{tag}-{i}", prompt=f"{tag}: patient {i} has a sore throat and fever.",
                        response=f"<think>\nstrep {i}\n</think>\n\nAmoxicillin for streptococcal pharyngitis ({i}).",
                        reference="Amoxicillin for streptococcal pharyngitis.") for i in range(n)]


def test_a_postgres_restart_mid_run_loses_nothing_and_pays_no_key_twice(ray_local, postgres, monkeypatch):
    from medrl.reward.pool import RewardPool

    monkeypatch.setenv(URL_ENV, postgres.url)
    monkeypatch.setenv("DEEPSEEK_API_KEY", FAKE_KEY)
    cache = CacheConfig(backend="postgres", url_env=URL_ENV, claim_ttl_s=30, outage_s=60)
    items = _items(240, "restart")
    with LoopbackJudge(latency_s=0.2, api_key=FAKE_KEY) as server:
        cfg = RewardConfig.model_validate({"cache": cache.model_dump(), "judge": {
            "base_url": server.base_url, "timeout_s": 30.0, "max_retries": 1, "num_actors": 2, "concurrency": 4,
            "batch_size": 16, "rpm": 0, "tpm": 0, "budget_usd": 100.0}})
        out: dict = {}
        with RewardPool(cfg) as pool:
            def score():
                try:
                    out["results"] = pool.score(items, progress=False)
                except BaseException as exc:  # the assertion below shows it
                    out["error"] = exc

            worker = threading.Thread(target=score)
            worker.start()
            deadline = time.time() + 120
            while server.stats()["total"] < 40 and time.time() < deadline:
                time.sleep(0.05)
            before = server.stats()["total"]
            postgres.restart(down_s=2.0)  # judgements in flight finish while the store is down
            worker.join(timeout=300)
            stats = server.stats()
        assert "error" not in out, repr(out.get("error"))
        assert 40 <= before < len(items), before  # the restart fell mid-run
        results = out["results"]
        assert [r.judge_status for r in results] == ["ok"] * len(items)
        assert stats["total"] == len(items) and set(stats["requests"].values()) == {1}
    store = open_store(cache)
    try:
        assert store.count() == len(items)  # the judgements paid during the outage were stored after it
        assert store._run("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
        assert store.spent(next(iter(_scopes(store)))) > 0
    finally:
        store.close()


def _scopes(store) -> list[str]:
    return [row[0] for row in store._run("SELECT scope FROM spend").fetchall()]


def test_a_store_down_past_outage_s_stops_with_one_line(postgres, monkeypatch):
    monkeypatch.setenv(URL_ENV, postgres.url)
    store = open_store(CacheConfig(backend="postgres", url_env=URL_ENV, outage_s=1.5))
    try:
        assert store.get_many(["k"]) == {}
        postgres._stop()
        t0 = time.monotonic()
        with pytest.raises(StoreDownError, match=rf"^PostgreSQL at \${URL_ENV}: unreachable for 1.5 s "
                                                 r"\(reward.cache.outage_s\): .*refused") as err:
            store.get_many(["k"])
        waited = time.monotonic() - t0
        assert 1.5 <= waited < 5, waited
        assert "\n" not in str(err.value) and postgres.password not in str(err.value)
        postgres._start()
        assert store.get_many(["k"]) == {}  # back: the same store object reconnects
    finally:
        if postgres.proc is None:
            postgres._start()
        store.close()


def test_medrl_judge_stops_with_one_line_when_the_store_stays_down(ray_local, postgres, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from medrl.cli import main

    monkeypatch.setenv(URL_ENV, postgres.url)
    monkeypatch.setenv("DEEPSEEK_API_KEY", FAKE_KEY)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": it.id, "prompt": it.prompt, "response": it.response,
                                       "reference": it.reference}) + "\n" for it in _items(200, "down")))
    done = threading.Event()
    with LoopbackJudge(latency_s=0.2, api_key=FAKE_KEY) as server:
        def stop_mid_run():
            deadline = time.time() + 120
            while server.stats()["total"] < 20 and time.time() < deadline and not done.is_set():
                time.sleep(0.05)
            postgres._stop()

        stopper = threading.Thread(target=stop_mid_run)
        stopper.start()
        try:
            rc = main(["judge", "--config", "configs/local_tiny.yaml", "--input", str(src), "--out",
                       str(tmp_path / "o.jsonl"), f"run.root={tmp_path}/runs", "reward.judge.provider=openai",
                       f"reward.judge.base_url={server.base_url}", "reward.judge.concurrency=4",
                       "reward.cache.backend=postgres", f"reward.cache.url_env={URL_ENV}", "reward.cache.outage_s=2"])
        finally:
            done.set()
            stopper.join()
            postgres._start()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"medrl: error: PostgreSQL at ${URL_ENV}: unreachable for 2 s "
                                          "(reward.cache.outage_s): "), err[-3:]
    assert "Traceback" not in "\n".join(err) and postgres.password not in "\n".join(err)
    assert not (tmp_path / "o.jsonl").exists()
