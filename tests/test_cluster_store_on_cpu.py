"""The judge store shared by pools, processes and runs, on SQLite and on a real PostgreSQL server (loopback):
claims, insert-if-absent, rate buckets and spending shared between connections, schema versioning, one-line errors;
then two real RewardPools (one local Ray) against the loopback judge: concurrent pools over overlapping items pay no
key twice, a shared budget stops both and survives a restart, a per-run budget continues after a restart, and the
rate limit holds over both pools together."""
from __future__ import annotations

import secrets
import threading
import time

import pytest

from medrl.errors import UsageError
from medrl.reward.config import CacheConfig, RewardConfig
from medrl.reward.store.database import open_store
from medrl.reward.store.schema import SCHEMA_VERSION
from medrl.reward.types import RewardInput
from medrl.runs import RunDir
from medrl.testing.loopback_server import LoopbackJudge

FAKE_KEY = "sk-medrl-store-" + secrets.token_hex(8)
URL_ENV = "MEDRL_TEST_CACHE_URL"


@pytest.fixture(params=["sqlite", "postgres"])
def cache_cfg(request, tmp_path, monkeypatch) -> CacheConfig:
    if request.param == "postgres":
        pg = request.getfixturevalue("postgres")
        monkeypatch.setenv(URL_ENV, pg.url)
        store = open_store(CacheConfig(backend="postgres", url_env=URL_ENV))
        # one server for the module: every test starts empty
        store._run("TRUNCATE judgements, pairwise_verdicts, claims, rate_buckets, spend")
        store.close()
        return CacheConfig(backend="postgres", url_env=URL_ENV, claim_ttl_s=3)
    return CacheConfig(path=str(tmp_path / "store.sqlite"), claim_ttl_s=3)


def _record(key: str, reason: str = "r") -> dict:
    return {"key": key, "judge": "j", "rubric_version": "v", "accuracy": 1, "safety": 2, "completeness": 3,
            "clarity": 4, "reason": reason, "prompt": "p", "answer": "a", "reference": None, "tokens_in": 1,
            "tokens_out": 1, "tokens_cache_hit": 0, "cost_usd": 0.001}


def test_store_claims_rates_and_spend_are_shared_between_connections(cache_cfg, tmp_path):
    a, b = open_store(cache_cfg), open_store(cache_cfg)
    try:
        assert a.claim_many(["k1", "k2"], "A", 30) == {"k1", "k2"}
        assert b.claim_many(["k1", "k3"], "B", 30) == {"k3"}  # k1 is A's
        a.put(_record("k1", "first"), holder="A")  # committed and A's claim dropped in one transaction
        b.put(_record("k1", "second"))  # insert-if-absent: the first writer wins
        assert b.get_many(["k1", "k9"])["k1"]["reason"] == "first" and b.count() == 1
        assert b.claim_many(["k2"], "B", 30) == set()
        a.release(["k2"], "A")
        assert b.claim_many(["k2"], "B", 0.5) == {"k2"}  # released: taken at once
        time.sleep(0.7)
        assert a.claim_many(["k2", "k3"], "A", 30) == {"k2"}  # B's k2 claim expired; k3 (30 s) still holds
        b.renew_claims("B", 0.5)
        time.sleep(0.7)
        assert a.claim_many(["k3"], "A", 30) == {"k3"}  # renewed for only 0.5 s: expired
        # one bucket of 60 requests/min (bursts of 1) over both connections
        assert a.rate_lease([("ep|requests", 60, 1)], 5) == (1, 0.0)
        n, wait = b.rate_lease([("ep|requests", 60, 1)], 5)
        assert n == 1 and 0.8 < wait <= 1.0
        b.settle_usage("shared:team", 0.0, [("ep|requests", 60, -1)])  # given back: the next one waits as long again
        assert 0.8 < a.rate_lease([("ep|requests", 60, 1)], 5)[1] <= 1.0
        a.settle_usage("shared:team", 0.25, [])
        b.settle_usage("shared:team", 0.5, [("ep|requests", 60, 0)])
        assert a.spent("shared:team") == pytest.approx(0.75) and a.spent("shared:other") == 0.0
    finally:
        a.close()
        b.close()
    again = open_store(cache_cfg)  # everything survives reconnecting
    try:
        assert again.spent("shared:team") == pytest.approx(0.75) and again.count() == 1
        again._run("UPDATE medrl_schema SET version = ?", (SCHEMA_VERSION + 1,))
        with pytest.raises(UsageError, match=f"schema version {SCHEMA_VERSION + 1}, this medrl knows "
                                             f"{SCHEMA_VERSION}"):
            open_store(cache_cfg)
    finally:
        again._run("UPDATE medrl_schema SET version = ?", (SCHEMA_VERSION,))
        again.close()


def test_store_errors_are_one_line_and_never_show_the_url(tmp_path, postgres, monkeypatch):
    bad = tmp_path / "broken.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    for readonly in (False, True):
        with pytest.raises(UsageError, match=f"^{bad}: not a usable judge cache") as err:
            open_store(CacheConfig(path=str(bad)), readonly=readonly)
        assert "\n" not in str(err.value)
    monkeypatch.delenv(URL_ENV, raising=False)
    with pytest.raises(UsageError, match=f"environment variable {URL_ENV}"):
        open_store(CacheConfig(backend="postgres", url_env=URL_ENV))
    wrong = postgres.url.replace(postgres.password, "wrong-" + postgres.password)
    monkeypatch.setenv(URL_ENV, wrong)
    with pytest.raises(UsageError, match=rf"^PostgreSQL at \${URL_ENV}: cannot connect") as err:
        open_store(CacheConfig(backend="postgres", url_env=URL_ENV))
    assert postgres.password not in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- pools on one store
@pytest.fixture(scope="module")
def server():
    with LoopbackJudge(latency_s=0.2, api_key=FAKE_KEY) as srv:
        yield srv


def _cfg(server, cache: CacheConfig, **judge) -> RewardConfig:
    base = {"base_url": server.base_url, "timeout_s": 5.0, "max_retries": 1, "num_actors": 1, "concurrency": 8,
            "rpm": 0, "tpm": 0, "budget_usd": None}
    return RewardConfig.model_validate({"judge": {**base, **judge}, "cache": cache.model_dump()})


def _items(lo: int, hi: int, tag: str = "s") -> list[RewardInput]:
    return [RewardInput(id=f"{tag}-{i}", prompt=f"{tag}: patient {i} has a sore throat and fever.",
                        response=f"<think>\nstrep {i}\n</think>\n\nAmoxicillin for streptococcal pharyngitis ({i}).",
                        reference="Amoxicillin for streptococcal pharyngitis.") for i in range(lo, hi)]


def _score_together(pools_and_items) -> list[list]:
    """Score each (pool, items) in its own thread at the same time (two independent runs)."""
    out: list = [None] * len(pools_and_items)

    def one(i, pool, items):
        out[i] = pool.score(items, progress=False)

    threads = [threading.Thread(target=one, args=(i, p, it)) for i, (p, it) in enumerate(pools_and_items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_pools_over_overlapping_items_pay_no_key_twice(ray_local, server, cache_cfg, monkeypatch):
    from medrl.reward.pool import RewardPool

    monkeypatch.setenv("DEEPSEEK_API_KEY", FAKE_KEY)
    server.reset()
    a_items, b_items = _items(0, 40), _items(20, 60)  # 20 shared keys
    with RewardPool(_cfg(server, cache_cfg)) as a, RewardPool(_cfg(server, cache_cfg, num_actors=2)) as b:
        ra, rb = _score_together([(a, a_items), (b, b_items)])
        paid = a.stats()["requests"] + b.stats()["requests"]
    stats = server.stats()
    assert stats["total"] == 60 and set(stats["requests"].values()) == {1}, stats["requests"]
    assert paid == 60
    assert all(r.teacher is not None and r.judge_status in ("ok", "cached") for r in ra + rb)
    shared = {r.id: r.teacher for r in ra if r.id in {x.id for x in b_items}}
    assert shared and all(shared[r.id] == r.teacher for r in rb if r.id in shared)  # one judgement, both runs
    assert sum(r.judge_status == "cached" for r in ra + rb) == 20


def test_shared_budget_stops_both_runs_and_survives_restart(ray_local, server, tmp_path, monkeypatch):
    from medrl.reward.pool import RewardPool

    monkeypatch.setenv("DEEPSEEK_API_KEY", FAKE_KEY)
    cache = CacheConfig(path=str(tmp_path / "budget.sqlite"))
    with RewardPool(_cfg(server, cache)) as probe:
        one_call = probe.score(_items(0, 1, "probe"), progress=False)[0].cost_usd
    budget = 40 * one_call
    shared = dict(budget_usd=budget, budget_scope="team", concurrency=2)
    server.reset()
    with RewardPool(_cfg(server, cache, **shared)) as a, RewardPool(_cfg(server, cache, **shared)) as b:
        ra, rb = _score_together([(a, _items(0, 60, "a")), (b, _items(0, 60, "b"))])
        sa, sb = a.stats(), b.stats()
    spent = sa["cost_usd"] + sb["cost_usd"]
    in_flight = 2 * 2 * max(r.cost_usd for r in ra + rb)  # two runs, two calls in flight each
    assert sa["over_budget"] > 0 and sb["over_budget"] > 0  # both stopped
    assert sa["judged"] > 0 and sb["judged"] > 0  # both spent from the one budget
    assert budget / 2 <= spent <= budget + in_flight
    assert sa["budget_spent_usd"] == pytest.approx(spent, abs=2e-6)  # stats are rounded to 1e-6
    assert server.stats()["total"] == sa["requests"] + sb["requests"]
    server.reset()
    with RewardPool(_cfg(server, cache, **shared)) as again:  # a restarted run finds the budget (nearly) spent
        results = again.score(_items(0, 30, "c"), progress=False)  # a fresh budget would pay for all 30
        left = again.stats()
    judged = sum(r.judge_status == "ok" for r in results)
    assert judged <= (budget - spent) / one_call + 1 and left["over_budget"] == 30 - judged >= 20
    assert spent + left["cost_usd"] <= budget + in_flight
    # a per-run budget continues where the run left off when the run restarts; another run has its own
    run = RunDir(tmp_path / "runs" / "r1")
    with RewardPool(_cfg(server, cache, budget_usd=None), run) as first:
        first.score(_items(0, 10, "r"), progress=False)
        spent_first = first.stats()["cost_usd"]
    per_run = dict(budget_usd=spent_first * 1.05, budget_scope="run")
    with RewardPool(_cfg(server, cache, **per_run), run) as resumed:
        assert {r.judge_status for r in resumed.score(_items(10, 12, "r"), progress=False)} == {"over_budget"}
    with RewardPool(_cfg(server, cache, **per_run), RunDir(tmp_path / "runs" / "r2")) as other_run:
        assert other_run.score(_items(12, 13, "r"), progress=False)[0].judge_status == "ok"


def test_rate_limit_holds_over_two_pools_together(ray_local, server, tmp_path, monkeypatch):
    from medrl.reward.pool import RewardPool

    monkeypatch.setenv("DEEPSEEK_API_KEY", FAKE_KEY)
    cache = CacheConfig(path=str(tmp_path / "rate.sqlite"))
    server.reset()
    with RewardPool(_cfg(server, cache, rpm=120)) as a, RewardPool(_cfg(server, cache, rpm=120)) as b:
        a.score(_items(0, 1, "warm-a"), progress=False)  # actors up before the clock starts
        b.score(_items(0, 1, "warm-b"), progress=False)
        time.sleep(1.0)  # the bucket refills its burst of 2
        t0 = time.perf_counter()
        _score_together([(a, _items(0, 8, "ra")), (b, _items(0, 8, "rb"))])
        elapsed = time.perf_counter() - t0
    # 16 calls at 2/s with bursts of 2 take >= 7 s together; a limit per pool would let each finish in ~3 s
    assert server.stats()["total"] == 18 and elapsed >= 6.5, elapsed


def test_a_judgement_stored_between_lookup_and_claim_is_not_paid(cache_cfg):
    """Claims looks the keys it has just claimed up once more (one query for the batch): a key another holder stored
    after the caller's lookup comes back cached, without a call, and its claim is given back at once."""
    import asyncio

    from medrl.reward.judge import JudgeOutcome
    from medrl.reward.store.claims import Claims

    store, calls = open_store(cache_cfg), []

    async def go():
        claims = Claims(store, store.get_many, 30)

        async def call(key: str) -> JudgeOutcome:
            calls.append(key)
            return JudgeOutcome("judged now", "ok")

        async def put(key: str, outcome: JudgeOutcome) -> None:
            store.put(_record(key, outcome.judgement), holder=claims.holder)

        try:
            store.put(_record("late", "stored by another run"))  # after the caller's lookup, before its claim
            futures, started = claims.start(["late", "new"], call, put, lambda key, record: record["reason"])
            return {k: await f for k, f in futures.items()}, started
        finally:
            await claims.close()

    try:
        out, started = asyncio.run(go())
        assert calls == ["new"] and started == {"new"}
        assert (out["late"].status, out["late"].judgement) == ("cached", "stored by another run")
        assert (out["new"].status, out["new"].judgement) == ("ok", "judged now")
        assert store._run("SELECT COUNT(*) FROM claims").fetchone()[0] == 0 and store.count() == 2
    finally:
        store.close()


def test_group_commit_returns_no_reward_before_its_judgement_is_committed(server, cache_cfg):
    """Judge responses arrive while another connection holds the judgements table locked: no reward comes back
    until the lock is released and the group's transaction has committed; then every judgement is in the store."""
    import asyncio

    from medrl.reward.ledger import Ledger, local_gate
    from medrl.reward.scoring import Scorer

    cfg, items, out = _cfg(server, cache_cfg, concurrency=16), _items(0, 12, "gc"), {}

    def score() -> None:
        async def go():
            scorer = Scorer(cfg, local_gate(Ledger(0, 0, None), 8), FAKE_KEY)
            try:
                out["results"] = await scorer.score_batch(items)
            finally:
                await scorer.close()
        asyncio.run(go())

    server.reset()
    server.set_latency(1.0)
    blocker, reader = open_store(cache_cfg), open_store(cache_cfg)
    thread = threading.Thread(target=score)
    try:
        thread.start()
        deadline = time.monotonic() + 30
        while server.stats()["total"] < len(items) and time.monotonic() < deadline:
            time.sleep(0.02)  # every request is in flight: claimed and sent, answers due in 1 s
        assert server.stats()["total"] == len(items)
        if cache_cfg.backend == "postgres":
            blocker._db.execute("BEGIN")
            blocker._db.execute("LOCK TABLE judgements IN EXCLUSIVE MODE")  # readers pass, writers wait
        else:
            blocker._db.execute("BEGIN IMMEDIATE")  # the one SQLite writer: the group commit waits
        time.sleep(2.5)  # the answers have arrived; their commit waits for the lock
        assert "results" not in out and thread.is_alive() and reader.count() == 0
        blocker._db.execute("COMMIT")
        thread.join(30)
        assert [r.judge_status for r in out["results"]] == ["ok"] * len(items)
        assert reader.count() == len(items) and server.stats()["total"] == len(items)
    finally:
        server.set_latency(0.2)
        blocker.close()
        reader.close()
        thread.join(30)


def _open_and_close(path: str) -> str | None:
    try:
        open_store(CacheConfig(path=path)).close()
        return None
    except UsageError as exc:
        return str(exc)


def test_processes_opening_one_new_sqlite_store_at_once_all_get_it(tmp_path):
    # SQLite refuses the switch to WAL at once ("database is locked", no busy wait) while another process opens the
    # same new file; two evals started together once failed on it. Six processes, twenty fresh files.
    import multiprocessing

    errors = []
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        for round_ in range(20):
            path = str(tmp_path / f"c{round_}.db")
            errors += [e for e in pool.map(_open_and_close, [path] * 6) if e]
            assert open_store(CacheConfig(path=path), readonly=True).count() == 0
    assert errors == []
