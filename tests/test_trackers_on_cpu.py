"""``run.report_to``: the stages' metrics reach TensorBoard, W&B (offline mode) and MLflow (its local SQLite store),
each tracker one run for the whole run directory, across stages of one process and across processes.

The real libraries write; the test reads back what they wrote: W&B's offline transaction log
(``tracker_files.wandb_records``), MLflow through its client, TensorBoard through its event reader. The real stages
(SFT, PPO, eval as Ray jobs) logging into one run: tests/test_stage_jobs_on_cpu.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tracker_files import wandb_records

REPO = Path(__file__).resolve().parents[1]
ALL = ("tensorboard", "wandb", "mlflow")


@pytest.fixture()
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_PROJECT", "medrl-test")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "wandb_home").mkdir()
    return tmp_path / "wandb_home"


def _child_logs_eval(run_root: Path) -> subprocess.CompletedProcess:
    """A later stage in another process (as ``medrl eval`` after ``medrl ppo``)."""
    code = ("import sys; from pathlib import Path; from medrl.runs import RunDir, MetricsLogger\n"
            f"run = RunDir(Path({str(run_root)!r}), {ALL!r})\n"
            "with MetricsLogger(run, 'eval') as m:\n"
            "    m.log_hparams({'eval': {'limit': 2}, 'ppo': {'lr': 9.0}})\n"
            "    m.log(0, {'base/test/reward': 0.25, 'rl/test/reward': 0.5})\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_stages_log_into_one_run_per_tracker(tmp_path, offline_wandb):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medrl.runs import MetricsLogger, RunDir, read_metrics

    run = RunDir(tmp_path / "runs" / "exp1", ALL)
    config = {"run": {"name": "exp1", "report_to": list(ALL)}, "ppo": {"lr": 1e-5, "steps": 3},
              "reward": {"judge": {"api_key": "***"}}}
    # PPO and its reward pool in one process, as in `medrl ppo`
    ppo, reward = MetricsLogger(run, "ppo"), MetricsLogger(run, "reward")
    ppo.log_hparams(config)
    for step in (1, 2, 3):
        ppo.log(step, {"reward_mean": 0.1 * step, "kl": 0.01, "ok": True, "note": "text"})
        reward.log(step, {"judge_calls": 4 * step})
        ppo.log_table("samples", step, ["id", "reward", "response"],
                      [[f"p{i}", 0.5, f"answer | {step}.{i}\nline 2"] for i in range(40)])
    assert ppo.rewind(2) == 1  # a resume from the checkpoint of step 2: step 3 is done again
    ppo.log(3, {"reward_mean": 0.35, "kl": 0.02})
    ppo.close()
    reward.close()
    child = _child_logs_eval(run.root)
    assert child.returncode == 0, child.stderr[-3000:]

    ids = json.loads((run.root / "trackers.json").read_text())
    assert set(ids) == {"wandb_run_id", "mlflow_run_id", "mlflow_store"}
    jsonl = [r["reward_mean"] for r in read_metrics(run, "ppo")]
    assert jsonl == [0.1, 0.2, 0.35]

    # W&B: both processes wrote the one run id (two offline files to sync), each stage on its own step axis
    runs = wandb_records(offline_wandb)
    assert list(runs) == [ids["wandb_run_id"]]
    records = runs[ids["wandb_run_id"]]
    assert {r["name"] for k, r in records if k == "run"} == {"exp1"}
    assert {r["project"] for k, r in records if k == "run"} == {"medrl-test"}
    history = [r for k, r in records if k == "history"]
    ppo_rows = [(r["ppo/step"], r["ppo/reward_mean"]) for r in history if "ppo/reward_mean" in r]
    assert ppo_rows == [(1, 0.1), (2, 0.2), (3, pytest.approx(0.3)), (3, 0.35)]  # W&B keeps the rewound value
    assert [(r["reward/step"], r["reward/judge_calls"]) for r in history if "reward/judge_calls" in r] == \
        [(1, 4), (2, 8), (3, 12)]
    assert not any("ppo/ok" in r or "ppo/note" in r for r in history)  # scalars only
    assert [(r["eval/step"], r["eval/rl/test/reward"]) for r in history if "eval/rl/test/reward" in r] == [(0, 0.5)]
    tables = [r for r in history if r.get("ppo/samples/_type") == "table-file"]
    assert [r["ppo/step"] for r in tables] == [1, 2, 3] and {r["ppo/samples/nrows"] for r in tables} == {32}
    table_file = next(offline_wandb.glob(f"wandb/offline-run-*{ids['wandb_run_id']}/files/{tables[0]['ppo/samples/path']}"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["id", "reward", "response"] and table["data"][0] == ["p0", 0.5, "answer | 1.0\nline 2"]
    configs = {}
    for k, r in records:
        if k == "config":
            configs.update(r)
    assert configs["ppo"] == {"lr": 9.0} and configs["run"]["name"] == "exp1"  # the later stage's value wins

    # MLflow: one run in the run's SQLite store, metrics with their steps, write-once params, configs per stage
    client = MlflowClient(tracking_uri=f"sqlite:///{run.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medrl")
    found = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in found] == [ids["mlflow_run_id"]]
    mlrun = found[0]
    assert mlrun.info.run_name == "exp1" and mlrun.info.status == "FINISHED"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "ppo/reward_mean"))
    assert hist == [(1, 0.1), (2, 0.2), (3, pytest.approx(0.3)), (3, 0.35)]
    assert mlrun.data.metrics["eval/base/test/reward"] == 0.25 and mlrun.data.metrics["reward/judge_calls"] == 12
    assert mlrun.data.params["ppo.lr"] == "1e-05" and mlrun.data.params["eval.limit"] == "2"  # first value stays
    assert mlrun.data.params["reward.judge.api_key"] == "***"
    artifacts = {a.path for d in ("config", "ppo/samples") for a in client.list_artifacts(mlrun.info.run_id, d)}
    assert {"config/ppo.json", "config/eval.json", "ppo/samples/step_000001.json"} <= artifacts
    samples = json.loads(Path(client.download_artifacts(mlrun.info.run_id, "ppo/samples/step_000003.json",
                                                        str(tmp_path / "dl"))).read_text())
    assert len(samples) == 32 and samples[1] == {"id": "p1", "reward": 0.5, "response": "answer | 3.1\nline 2"}
    assert str(run.root.resolve()) in mlrun.info.artifact_uri  # artifacts beside the store, not in the cwd

    # TensorBoard: per-stage scalars (step 3 once, after the rewind), the sample table as text, hparams
    acc = EventAccumulator(str(run.tb_dir("ppo")), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    assert [(e.step, round(e.value, 3)) for e in acc.Scalars("ppo/reward_mean")] == [(1, 0.1), (2, 0.2), (3, 0.35)]
    text = acc.Tensors("ppo/samples/text_summary")
    assert [e.step for e in text][:2] == [1, 2]
    cell = text[0].tensor_proto.string_val[0].decode()
    assert cell.startswith("| id | reward | response |") and "answer \\| 1.0<br>line 2" in cell
    assert cell.count("\n| p") == 32
    hparams = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    assert b"ppo.lr" in hparams["_hparams_/session_start_info"] and b"ppo/reward_mean" in hparams["_hparams_/experiment"]
    eval_acc = EventAccumulator(str(run.tb_dir("eval"))).Reload()
    assert [e.value for e in eval_acc.Scalars("eval/rl/test/reward")] == [0.5]


def test_a_tracker_without_its_package_fails_with_one_line(tmp_path):
    code = ("import sys; sys.modules['mlflow'] = None\n"
            "from pathlib import Path; from medrl.runs import RunDir, MetricsLogger\n"
            f"MetricsLogger(RunDir(Path({str(tmp_path)!r}), ('tensorboard', 'mlflow')), 'sft')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 1
    assert ("UsageError: run.report_to has mlflow but mlflow is not installed: pip install 'medrl[track]'"
            in r.stderr.splitlines()[-1])


def test_report_to_is_checked_at_load():
    from medrl.config import load_config
    from medrl.errors import ConfigError

    assert load_config(None, ["run.report_to=[wandb, mlflow]"]).run.report_to == ["wandb", "mlflow"]
    assert load_config(None).run.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"run.report_to.0.*'tensorboard', 'wandb', 'mlflow'"):
        load_config(None, ["run.report_to=[neptune]"])
