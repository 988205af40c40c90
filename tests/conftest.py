"""Shared fixtures: a tiny Qwen3 built once per session, the real shared data, Ray runtimes and a PostgreSQL server
that tests stop."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import stop_ray_node

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
               "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
               "TORCH_EXTENSIONS_DIR": str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"),
               }.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CONFIGS = REPO / "configs"
SAMPLES = REPO / "data" / "samples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server on 127.0.0.1 for one test module (``tests/pg_server.py``), stopped by its PID."""
    from pg_server import PostgresServer, pg_bin

    if pg_bin() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is missing in CI (.ci/run installs it)")
        pytest.skip("PostgreSQL not installed (apt-get install -y postgresql)")
    with PostgresServer() as pg:
        yield pg


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3 + tokenizer directory, built once per test session (seed 0)."""
    from medrl.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen3")


@pytest.fixture()
def prepared_run(tiny_model_dir, tmp_path, monkeypatch):
    """``medrl prepare`` of the shipped samples (configs/local_tiny.yaml) into ``tmp_path/runs/job/data`` (the run
    the Ray job tests submit their stages for)."""
    from medrl.config import load_config
    from medrl.prepare.stage import run_prepare
    from medrl.runs import RunDir

    monkeypatch.chdir(REPO)  # the config's sample paths are relative to the repository
    cfg = load_config(CONFIGS / "local_tiny.yaml",
                      [f"run.root={tmp_path}/runs", "run.name=job", f"model.path={tiny_model_dir}"])
    run = RunDir.from_config(cfg)
    assert run_prepare(cfg, run)["rl_prompts"] > 0
    return run


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real PubMedQA and Chinese dialogue files); CI always has it."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_DATA} is missing in CI")
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray runtime (2 CPUs, no dashboard) for one test module; shut down afterwards."""
    import ray

    from medrl.config import RayConfig
    from medrl.ray_utils import init_ray

    started = init_ray(RayConfig(num_cpus=2))
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture()
def ray_head(tmp_path_factory):
    """A real ``ray start --head`` on 127.0.0.1 with the job server; yields (address for ray.init, dashboard url).

    Started with ``--block`` in its own process group and stopped by signalling that group, so it never touches
    other Ray runtimes on the machine (``ray stop`` would kill all of them)."""
    gcs_port, dash_port, agent_port = free_port(), free_port(), free_port()
    temp_dir = Path("/tmp") / f"ray_t{os.getpid()}_{gcs_port}"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--dashboard-agent-listen-port={agent_port}", "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash_port}"
    deadline = time.time() + 90
    import urllib.request

    # the job server answers once the dashboard is up, but submits only after the node's agent (own free port: the
    # default 52365 would collide between heads) is serving; it gives up on the agent after 10 s
    pending = [url + "/api/version", f"http://127.0.0.1:{agent_port}/api/healthz"]
    while time.time() < deadline and pending:
        if proc.poll() is not None:
            raise RuntimeError("ray start failed:\n" + proc.stdout.read().decode(errors="replace"))
        try:
            with urllib.request.urlopen(pending[0], timeout=2) as r:
                if r.status == 200:
                    pending.pop(0)
        except OSError:
            time.sleep(1)
    if pending:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("ray head did not come up in 90 s")
    try:
        yield {"address": f"127.0.0.1:{gcs_port}", "dashboard": url, "env": env, "temp_dir": temp_dir}
    finally:
        stop_ray_node(proc, temp_dir)
