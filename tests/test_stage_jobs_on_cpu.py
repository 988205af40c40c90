"""``ray_jobs/sft.py``, ``eval.py`` and ``pipeline.py`` submitted with ``ray job submit`` to a real ``ray start --head``
on 127.0.0.1, one run directory through all three (the tiny model, the offline reference judge, a few steps), with
``run.report_to: [tensorboard, wandb, mlflow]`` (W&B offline, MLflow's local SQLite store): the SFT job, the eval
job and the pipeline job (which then runs PPO, eval and the report) log into one W&B run and one MLflow run."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tracker_files import wandb_records

REPO = Path(__file__).resolve().parents[1]
SHRINK = ["sft.max_steps=2", "sft.eval_steps=2", "sft.save_steps=2", "sft.logging_steps=1", "ppo.steps=2",
          "ppo.checkpoint.every=2", "ppo.generation.max_new_tokens=12", "ppo.rollout.num_cpus=0.5",
          "ppo.learner.num_cpus=0.5", "eval.limit=2", "eval.set_limits={}", "eval.pairwise.limit=2",
          "eval.decoding.max_new_tokens=8", "eval.sets=[test]",
          "run.report_to=[tensorboard,wandb,mlflow]"]


def _submit(ray_head, runtime_env: Path, script: str, run, tiny_model_dir, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head["dashboard"],
           "--working-dir", str(REPO), "--runtime-env", str(runtime_env), "--", sys.executable, script,
           "--config", "configs/local_tiny.yaml", f"run.root={run.root.parent}", f"run.name={run.root.name}",
           f"model.path={tiny_model_dir}", "model.build_tiny_if_missing=false", *SHRINK, *args]
    job = subprocess.run(cmd, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=600)
    assert job.returncode == 0 and "succeeded" in job.stdout, f"{script}\n{job.stdout[-4000:]}\n{job.stderr[-2000:]}"
    assert "is relative" not in job.stdout
    return job


@pytest.mark.slow
def test_stage_jobs_share_one_tracker_run(ray_head, prepared_run, tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medrl.runs import read_metrics

    run = prepared_run
    wandb_home = tmp_path / "wandb_home"
    wandb_home.mkdir()
    env = yaml.safe_load((REPO / "ray_jobs" / "runtime_env.yaml").read_text())  # the shipped one + W&B offline
    env["env_vars"].update({"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_home), "WANDB_PROJECT": "medrl-jobs"})
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text(yaml.safe_dump(env))

    _submit(ray_head, runtime_env, "ray_jobs/sft.py", run, tiny_model_dir)
    assert (run.sft_adapter / "adapter_model.safetensors").is_file()
    _submit(ray_head, runtime_env, "ray_jobs/eval.py", run, tiny_model_dir, "--models", "base,sft", "--sets", "test")
    assert set(json.loads(run.eval_summary.read_text())["models"]) == {"base", "sft"}
    job = _submit(ray_head, runtime_env, "ray_jobs/pipeline.py", run, tiny_model_dir)
    assert "[prepare] skipped" in job.stdout + job.stderr and "[sft] skipped" in job.stdout + job.stderr
    assert (run.ppo_adapter / "adapter_model.safetensors").is_file() and run.report_html.is_file()
    summary = json.loads(run.eval_summary.read_text())
    assert set(summary["models"]) == {"base", "sft", "rl"}

    sft_rows = [r for r in read_metrics(run, "sft") if "train_loss" in r]
    ppo_rows = read_metrics(run, "ppo")
    assert [r["step"] for r in sft_rows] == [1, 2] and [r["step"] for r in ppo_rows] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) for r in sft_rows)
    ids = json.loads((run.root / "trackers.json").read_text())

    # W&B: three job drivers, one run id; each stage on its own step axis with the values of metrics.jsonl
    runs = wandb_records(wandb_home)
    assert list(runs) == [ids["wandb_run_id"]]
    history = [r for kind, r in runs[ids["wandb_run_id"]] if kind == "history"]
    assert [(r["sft/step"], r["sft/train_loss"]) for r in history if "sft/train_loss" in r] == \
        [(r["step"], pytest.approx(r["train_loss"])) for r in sft_rows]
    assert [(r["ppo/step"], r["ppo/reward_mean"]) for r in history if "ppo/reward_mean" in r] == \
        [(r["step"], pytest.approx(r["reward_mean"])) for r in ppo_rows]
    assert [r["ppo/step"] for r in history if r.get("ppo/samples/_type") == "table-file"] == [1, 2]
    assert any("reward/steps" in r or any(k.startswith("reward/") and k != "reward/step" for k in r)
               for r in history)
    eval_rows = [r for r in history if "eval/sft/test/reward" in r]
    assert len(eval_rows) == 2 and "eval/rl/test/reward" in eval_rows[1]  # the eval job, then the pipeline's eval
    assert eval_rows[1]["eval/rl/test/reward"] == pytest.approx(summary["table"]["rl"]["test"]["reward"])

    # MLflow: the same, in one run of the run directory's store
    client = MlflowClient(tracking_uri=f"sqlite:///{run.root / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("medrl").experiment_id])
    assert [r.info.run_id for r in found] == [ids["mlflow_run_id"]]
    run_id = ids["mlflow_run_id"]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "sft/train_loss")) == \
        [(r["step"], pytest.approx(r["train_loss"])) for r in sft_rows]
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "ppo/reward_mean")) == \
        [(r["step"], pytest.approx(r["reward_mean"])) for r in ppo_rows]
    assert found[0].data.metrics["eval/rl/test/reward"] == pytest.approx(summary["table"]["rl"]["test"]["reward"])
    assert found[0].data.params["sft.max_steps"] == "2" and found[0].data.params["ppo.steps"] == "2"
    artifacts = {a.path for d in ("config", "ppo/samples") for a in client.list_artifacts(run_id, d)}
    assert {"config/sft.json", "config/ppo.json", "config/eval.json", "ppo/samples/step_000002.json"} <= artifacts

    # TensorBoard: eval scalars, PPO sample tables and hparams
    acc = EventAccumulator(str(run.tb_dir("ppo")), size_guidance={"tensors": 0}).Reload()
    assert [e.step for e in acc.Tensors("ppo/samples/text_summary")] == [1, 2]
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    eval_acc = EventAccumulator(str(run.tb_dir("eval"))).Reload()
    assert "eval/rl/test/reward" in eval_acc.Tags()["scalars"]


def test_stage_jobs_refuse_tracker_credentials_in_the_runtime_env(monkeypatch, capsys):
    """The cluster stores and shows a job's runtime_env: a W&B key there stops the job before any work."""
    from medrl.ray_job import JOB_CONFIG_ENV, stage_job

    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"env_vars": {
        "WANDB_PROJECT": "medrl", "WANDB_API_KEY": "wandb-secret-123"}}, "metadata": {}}))
    assert stage_job("sft", ["run.report_to=[wandb]"]) == 2
    err = capsys.readouterr().err
    assert "ray_jobs/sft.py: error: the job's runtime_env sets WANDB_API_KEY" in err and "wandb-secret-123" not in err
