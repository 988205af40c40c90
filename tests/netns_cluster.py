"""A real two-node Ray cluster on one machine, run by ``tests/test_cluster_on_cpu.py`` inside a network namespace
of its own (``unshare -n``) with only loopback up, so every byte stays on 127.0.0.1 although Ray runs in
multi-node mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``). Not collected by a plain ``pytest`` run.

The head (with the job server) and a second raylet (custom resource ``node_b``) share a PostgreSQL server and the
loopback judge started here. The API key and the database URL are in the head's environment only (the job driver
inherits them and hands them to its actors as secrets); no job metadata holds them.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from medrl.testing.loopback_server import LoopbackJudge
from pg_server import PostgresServer
from procs import stop_ray_node

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
FAKE_KEY = "sk-medrl-cluster-" + secrets.token_hex(8)
URL_ENV = "MEDRL_CACHE_URL"


NETNS_LAUNCH = """
import fcntl, os, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", 0x1 | 0x8 | 0x40))  # SIOCSIFFLAGS: IFF_UP|IFF_LOOPBACK|IFF_RUNNING
os.execv(sys.argv[1], sys.argv[1:])
"""
"""``unshare -n -- python -c NETNS_LAUNCH PROGRAM ARGS...``: bring loopback up in the new network namespace (no
iproute2 needed), then exec PROGRAM there."""


def _wait_http(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited:\n{proc.stdout.read().decode(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {seconds:.0f} s")


_COMMON = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]


class Cluster:
    """A head (GCS 6379, job server 8265) and a second raylet with the custom resource ``node_b``, each on ports
    of its own (both nodes are 127.0.0.1), started with ``--block`` in their own process groups."""

    def __init__(self, tmp: Path, env: dict):
        self.tmp, self.env = tmp, env
        # a temp dir per node: the runtime-env agents of two nodes sharing one would delete each other's job files
        self.temp_dir = Path("/tmp") / f"ray_cluster_{os.getpid()}"
        self.temp_dir_b = Path("/tmp") / f"ray_cluster_{os.getpid()}_b"
        self.head = self.node_b = None

    def start(self) -> "Cluster":
        return self.start_head().start_node_b()

    def start_head(self) -> "Cluster":
        self.head = subprocess.Popen(
            [RAY, "start", "--head", *_COMMON, "--port=6379", "--num-cpus=2", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", "--dashboard-port=8265", "--dashboard-agent-listen-port=52365",
             "--dashboard-agent-grpc-port=52366", "--metrics-export-port=52367", "--runtime-env-agent-port=52368",
             "--node-manager-port=52370", "--object-manager-port=52371", "--min-worker-port=20000",
             "--max-worker-port=20999", f"--temp-dir={self.temp_dir}"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http("http://127.0.0.1:8265/api/version", self.head, 120)
        _wait_http("http://127.0.0.1:52365/api/healthz", self.head, 60)
        return self

    def start_node_b(self) -> "Cluster":
        self.node_b = subprocess.Popen(
            [RAY, "start", "--address=127.0.0.1:6379", *_COMMON, "--num-cpus=2", '--resources={"node_b": 1}',
             "--dashboard-agent-listen-port=52375", "--dashboard-agent-grpc-port=52376",
             "--metrics-export-port=52377", "--runtime-env-agent-port=52378", "--node-manager-port=52380",
             "--object-manager-port=52381", "--min-worker-port=21000", "--max-worker-port=21999",
             f"--temp-dir={self.temp_dir_b}"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http("http://127.0.0.1:52375/api/healthz", self.node_b, 120)
        return self

    def raylet_b(self) -> psutil.Process:
        return next(p for p in psutil.Process(self.node_b.pid).children(recursive=True) if p.name() == "raylet")

    def submit(self, *args: str, no_wait: bool = False) -> subprocess.Popen:
        cmd = [RAY, "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", str(REPO),
               *(["--no-wait"] if no_wait else []), "--", sys.executable, *args]
        return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def stop(self) -> None:
        for proc, temp_dir in ((self.node_b, self.temp_dir_b), (self.head, self.temp_dir)):
            if proc is not None:
                stop_ray_node(proc, temp_dir)
        self.head = self.node_b = None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    t0 = time.perf_counter()
    with PostgresServer() as pg, LoopbackJudge(latency_s=0.2, api_key=FAKE_KEY) as judge:
        env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_AUTH_MODE="disabled",
                   RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                   DEEPSEEK_API_KEY=FAKE_KEY, **{URL_ENV: pg.url})
        c = Cluster(tmp, env)
        try:
            for attempt in range(3):
                try:
                    c.start()
                    break
                except RuntimeError as exc:  # Ray gives a raylet 30 s to register: a loaded machine can miss that
                    print(f"cluster start failed ({str(exc)[-120:].strip()}), attempt {attempt + 1}", file=sys.stderr)
                    c.stop()
            else:
                raise RuntimeError("the two-node cluster did not start in 3 attempts")
            print(f"cluster up in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            yield c, pg, judge
        finally:
            c.stop()


def _rows(lo: int, hi: int) -> list[dict]:
    return [{"id": f"c-{i}", "prompt": f"Cluster case {i}: sore throat and fever?",
             "response": f"<think>\nStrep, case {i}.\n</think>\n\nAmoxicillin for streptococcal pharyngitis ({i}).",
             "reference": "Amoxicillin for streptococcal pharyngitis."} for i in range(lo, hi)]


def _job_args(judge: LoopbackJudge, tmp: Path, name: str, rows: list[dict], backend: str, **judge_cfg) -> list[str]:
    src = tmp / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = ["reward.cache.backend=postgres"] if backend == "postgres" else \
        ["reward.cache.backend=sqlite", f"reward.cache.path={tmp}/cache.sqlite"]
    extra = [f"reward.judge.{k}={v}" for k, v in {"num_actors": 2, "concurrency": 4, "batch_size": 16,
                                                   **judge_cfg}.items()]
    return ["ray_jobs/score.py", "--config", "configs/local_tiny.yaml", "--input", str(src),
            "--out", str(tmp / f"{name}.scored.jsonl"), f"run.root={tmp}/runs", f"run.name={name}",
            "model.build_tiny_if_missing=false", "reward.judge.provider=openai",
            f"reward.judge.base_url={judge.base_url}", "reward.judge.budget_usd=null",
            "reward.cache.claim_ttl_s=15",  # short, so the kill test's restarted actor takes over soon
            *cache, *extra]  # one judge call per item (local_tiny's verifier is off: verifier claims are tested in
            # test_reward_verifier_on_cpu.py)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0 and "succeeded" in out, out[-4000:]
    assert FAKE_KEY not in out
    return json.loads(next(line for line in out.splitlines() if line.startswith('{"items"')))


def _results(tmp: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (tmp / f"{name}.scored.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_concurrent_jobs_over_overlapping_items_pay_no_key_twice(cluster, backend):
    c, pg, judge = cluster
    judge.reset()
    a = c.submit(*_job_args(judge, c.tmp, f"a-{backend}", _rows(0, 48), backend))
    b = c.submit(*_job_args(judge, c.tmp, f"b-{backend}", _rows(24, 72), backend))
    sa, sb = _finish(a), _finish(b)
    counts = _item_requests(judge, _rows(0, 72))  # each job's start-up check call is not an item's
    assert sa["judge_nodes"] == 2 and sb["judge_nodes"] == 2  # judge actors on both nodes
    assert sa["requests"] + sb["requests"] == 72  # one judge call per key over both jobs: no key paid twice
    # every item request the server saw is one of those calls or a transport retry of one (the openai client's)
    assert sum(counts.values()) == sa["http_attempts"] + sb["http_attempts"] and min(counts.values()) == 1
    assert sa["judged"] + sb["judged"] == 72 and sa["judged"] + sa["cached"] == 48 == sb["judged"] + sb["cached"]
    for name in (f"a-{backend}", f"b-{backend}"):
        assert all(r["judge_status"] in ("ok", "cached") and r["teacher"] is not None for r in _results(c.tmp, name))
    judge.reset()
    again = _finish(c.submit(*_job_args(judge, c.tmp, f"again-{backend}", _rows(0, 72), backend)))
    again_counts = _item_requests(judge, _rows(0, 72))
    assert again["cached"] == 72 and sum(again_counts.values()) == 0  # a second pass makes no judge call
    # neither the key nor the database password reached a file: run dirs, the cluster's session files, job logs
    secrets_ = (FAKE_KEY.encode(), pg.password.encode())
    leaks = [str(f) for root in (c.tmp, c.temp_dir, c.temp_dir_b) for f in root.rglob("*")
             if f.is_file() and not f.is_symlink() and any(s in f.read_bytes() for s in secrets_)]
    assert leaks == []


def test_two_step_ppo_with_the_learner_ranks_on_two_nodes(cluster, tiny_model_dir, tmp_path, monkeypatch):
    """(Runs before the raylet kill below.) 1.1 CPUs per rank: a node (2 CPUs) holds one rank, so ``PACK`` puts
    the two ranks on the two nodes; they meet at rank 0's node address, stay identical after every step, and the
    rollout engines on both nodes get every adapter through the object store (the log-prob gap proves it)."""
    import ray

    from medrl.errors import UsageError
    from medrl.ppo.driver import PPOTrainer
    from medrl.ray_utils import init_ray
    from ppo_setup import ppo_config, weights_digests

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    layout = ["ray.address=127.0.0.1:6379", "ppo.learner.num_cpus=1.1", "ppo.rollout.num_cpus=0.3"]
    cfg, run = ppo_config(tmp_path, tiny_model_dir, "xnode", "ppo.steps=2", "ppo.learner.ranks=2",
                          "ppo.rollout.num_actors=2", *layout)
    init_ray(cfg.ray)
    try:
        with PPOTrainer(cfg, run) as tr:
            infos, learners = tr.groups.learner.info, tr.groups.learner.actors
            assert len({i["node_id"] for i in infos}) == 2 and {i["world_size"] for i in infos} == {2}
            engines = ray.get([a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
                               for a in tr.groups.rollout.actors])
            assert set(engines) == {i["node_id"] for i in infos}  # one engine per node
            before = weights_digests(learners[0])[0]
            for _ in range(2):
                metrics = tr.step()
                assert metrics["logprob_gap"] < 1e-4 and metrics["samples"] == 16
                digests = weights_digests(*learners)
                assert digests[0] == digests[1] != before  # both ranks hold the same, updated weights
                before = digests[0]
        # three such ranks fit the cluster's CPU total (checked first) but no two nodes can hold them
        cfg3, run3 = ppo_config(tmp_path, tiny_model_dir, "too-many", "ppo.prompts_per_step=3", "ppo.minibatch_size=6",
                                "ppo.micro_batch_size=6", "ppo.learner.ranks=3", "ppo.rollout.num_actors=1", *layout)
        with pytest.raises(UsageError, match=r"^ppo.learner.ranks=3 ranks of 1.1 CPU each do not fit the Ray "
                                             r"cluster: its 2 node\(s\) hold 1 \+ 1 = 2; ") as err:
            PPOTrainer(cfg3, run3)
        assert "\n" not in str(err.value)
    finally:
        ray.shutdown()


def test_killing_the_second_nodes_raylet_mid_job_loses_and_repays_nothing_stored(cluster):
    from medrl.reward.config import CacheConfig
    from medrl.reward.store.database import open_store

    c, pg, judge = cluster
    judge.reset()
    rows = _rows(100, 196)
    job = c.submit(*_job_args(judge, c.tmp, "kill", rows, "postgres", batch_size=8))
    deadline = time.time() + 240
    while judge.stats()["total"] < 24 and time.time() < deadline and job.poll() is None:
        time.sleep(0.1)
    c.raylet_b().send_signal(signal.SIGKILL)
    store = open_store(CacheConfig(backend="postgres", url_env=URL_ENV), url=pg.url)
    stored = [r for r in store.get_many(_store_keys(rows)).values()]
    store.close()
    summary = _finish(job, timeout=400)
    counts = _item_requests(judge, rows)
    results = _results(c.tmp, "kill")
    assert [r["id"] for r in results] == [r["id"] for r in rows]
    assert all(r["judge_status"] in ("ok", "cached") and r["teacher"] is not None for r in results)  # nothing lost
    repaid = [k for k, n in counts.items() if n > 1]
    assert min(counts.values()) == 1 and len(stored) >= 16 and summary["items"] == 96
    assert all(counts[_request_key(r)] == 1 for r in stored)  # stored before the kill: never re-paid
    assert len(repaid) <= 4, counts  # only calls in flight on the dead node (its concurrency) repeat
    print(json.dumps({"stored_at_kill": len(stored), "repaid": len(repaid)}), file=sys.stderr)


def _item_requests(judge: LoopbackJudge, rows: list[dict]) -> dict[str, int]:
    """Requests the server got for each row (keyed by the server's request key), leaving out the one check call
    every ``medrl judge`` makes at start-up."""
    from medrl.reward.rubric import build_messages
    from medrl.reward.text import split_response
    from medrl.testing.loopback_server import request_key

    served = judge.stats()["requests"]
    keys = [request_key(build_messages(r["prompt"], split_response(r["response"]).answer, r["reference"])[1]["content"])
            for r in rows]
    return {k: served.get(k, 0) for k in keys}


def _store_keys(rows: list[dict]) -> list[str]:
    from medrl.reward.config import RewardConfig
    from medrl.reward.store.schema import judge_key
    from medrl.reward.text import split_response
    from medrl.reward.types import RewardInput

    cfg = RewardConfig()
    items = [RewardInput.from_record(r) for r in rows]
    return [judge_key(cfg, it, split_response(it.response).answer) for it in items]


def _request_key(record: dict) -> str:
    """The loopback server's name of the request that produced a stored judgement."""
    from medrl.reward.rubric import build_messages
    from medrl.testing.loopback_server import request_key

    return request_key(build_messages(record["prompt"], record["answer"], record["reference"])[1]["content"])
