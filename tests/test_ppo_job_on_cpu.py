"""``ray_jobs/ppo.py`` submitted with ``ray job submit`` to a real ``ray start --head`` on 127.0.0.1: a two-step PPO
run of the tiny model on prepared data, judged by the loopback OpenAI-compatible server. The API key comes from the
nodes' environment and appears nowhere: not in the job's entrypoint, metadata or runtime_env, nor in any file."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from medrl.testing.loopback_server import LoopbackJudge

REPO = Path(__file__).resolve().parents[1]
FAKE_KEY = "sk-medrl-ppo-job-" + uuid.uuid4().hex[:12]
"""Made at run time: the literal must not sit in this file, which travels with the job's working directory."""


@pytest.fixture()
def node_key(monkeypatch):
    """Set before ``ray_head`` starts, so the head's processes (and the job) inherit it, as on a real cluster."""
    monkeypatch.setenv("DEEPSEEK_API_KEY", FAKE_KEY)


def test_ppo_job_on_a_real_ray_head(node_key, ray_head, prepared_run, tiny_model_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from safetensors import safe_open

    run = prepared_run
    submission_id = f"medrl-ppo-test-{os.getpid()}"
    with LoopbackJudge(api_key=FAKE_KEY) as server:
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head["dashboard"],
               "--submission-id", submission_id, "--working-dir", str(REPO),
               "--runtime-env", "ray_jobs/runtime_env.yaml", "--", sys.executable, "ray_jobs/ppo.py",
               "--config", "configs/local_tiny.yaml", f"run.root={run.root.parent}", f"run.name={run.root.name}",
               f"model.path={tiny_model_dir}", "model.build_tiny_if_missing=false",
               "ppo.steps=2", "ppo.prompts_per_step=2", "ppo.samples_per_prompt=2", "ppo.generation.max_new_tokens=12",
               "ppo.micro_batch_size=4", "ppo.minibatch_size=4", "ppo.rollout.batch_size=2", "ppo.init_adapter=null",
               "ppo.rollout.num_cpus=0.5", "ppo.learner.num_cpus=0.5", "ppo.checkpoint.every=2",
               "reward.judge.provider=openai", f"reward.judge.base_url={server.base_url}",
               f"reward.cache.path={tmp_path}/cache.sqlite", "reward.judge.num_actors=1"]
        job = subprocess.run(cmd, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=300)
        requests = server.stats()["total"]
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout

    # the job ran `medrl ppo` against the job's cluster and left the adapter, metrics and a checkpoint
    saved = run.config_path.read_text()
    assert "address: auto" in saved
    with safe_open(str(run.ppo_adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert (run.ppo_adapter / "adapter_config.json").is_file() and any("lora_A" in k for k in keys)
    rows = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    ppo = [r for r in rows if r["stage"] == "ppo"]
    assert [r["step"] for r in ppo] == [1, 2]
    for r in ppo:
        # 2 prompts x 2 samples, and local_tiny's 2 consultation cases x 2 dialogues
        assert r["samples"] == 8 and math.isfinite(r["reward_mean"]) and r["judge_failed"] == 0
        assert r["time_generate_s"] > 0 and r["time_learn_s"] > 0 and r["logprob_gap"] < 1e-3
    assert sum(r["judge_tokens_in"] for r in ppo) > 0 and requests >= 1
    assert (run.checkpoints("ppo") / "step_000002" / "trainer_state.json").is_file()

    # what the cluster stores about the job holds no key; the runtime_env kept our excludes
    info = JobSubmissionClient(ray_head["dashboard"]).get_job_info(submission_id)
    assert info.status == JobStatus.SUCCEEDED
    stored = json.dumps({"entrypoint": info.entrypoint, "metadata": info.metadata, "runtime_env": info.runtime_env})
    assert FAKE_KEY not in stored and "DEEPSEEK_API_KEY" not in stored
    assert ".venv/" in info.runtime_env["excludes"] and info.runtime_env["working_dir"]
    head_tmp = ray_head["temp_dir"]
    assert head_tmp.is_dir()
    leaks = [str(p) for root in (tmp_path, head_tmp) for p in root.rglob("*")
             if p.is_file() and not p.is_symlink() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == [] and FAKE_KEY not in job.stdout + job.stderr


def test_job_refuses_a_key_in_its_runtime_env(monkeypatch, capsys):
    """A key put into the submitted runtime_env (which the cluster stores) stops the job before any work."""
    from medrl.ray_job import JOB_CONFIG_ENV, stage_job

    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"env_vars": {
        "HF_HUB_OFFLINE": "1", "MY_JUDGE_KEY": "sk-xyz"}}, "metadata": {}}))
    assert stage_job("ppo", ["reward.judge.api_key_env=MY_JUDGE_KEY"]) == 2
    err = capsys.readouterr().err
    assert "ray_jobs/ppo.py: error: the job's runtime_env sets MY_JUDGE_KEY" in err and "sk-xyz" not in err
