"""`medrl pipeline` (what `make run` does) end to end on the embedded default config, shrunk for the test."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHRINK = ["sft.max_steps=4", "sft.eval_steps=2", "sft.save_steps=2", "sft.logging_steps=1", "ppo.steps=2",
          "ppo.checkpoint.every=1", "ppo.generation.max_new_tokens=16", "eval.limit=2", "eval.set_limits={}",
          "eval.pairwise.limit=2", "eval.decoding.max_new_tokens=12"]


def _pipeline(tmp_path, *extra):
    cmd = [sys.executable, "-m", "medrl.cli", "pipeline", "--config", "configs/local_tiny.yaml", *extra,
           f"run.root={tmp_path}", f"model.path={tmp_path}/tiny-qwen3", *SHRINK]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def _stage_lines(stderr: str) -> dict[str, str]:
    finished = [ln for ln in stderr.splitlines() if "pipeline finished:" in ln][-1]
    parts = finished.split("pipeline finished: ", 1)[1].split(", ")
    return {p.split(" ", 1)[0]: p.split(" ", 1)[1] for p in parts}


def test_pipeline_runs_every_stage_then_skips_them(tmp_path):
    r = _pipeline(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    stages = _stage_lines(r.stderr)
    assert list(stages) == ["prepare", "sft", "ppo", "eval", "report"]
    assert all(v.startswith("done in") for v in stages.values()), stages
    run = tmp_path / "local_tiny"
    assert (run / "data" / "DATA_CARD.md").is_file()
    for stage in ("sft", "ppo"):
        assert (run / stage / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert list(summary["models"]) == ["base", "sft", "rl"] and summary["skipped"] == []
    assert set(summary["sets"]) == {"test", "gold", "redteam", "pubmedqa", "mcq-sample", "healthbench-sample"}
    assert summary["judge"].startswith("reference:") and "rl_vs_sft" in summary["pairwise"]
    assert (run / "report" / "report.html").stat().st_size > 10_000
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in metrics if m["stage"] == "ppo") == 2
    assert max(m["step"] for m in metrics if m["stage"] == "sft") == 4
    saved = (run / "config.yaml").read_text()
    assert "max_steps: 4" in saved and "provider: reference" in saved
    assert saved == (run / "config.eval.yaml").read_text()  # each stage's record; config.yaml is the newest
    assert all((run / f"config.{stage}.yaml").is_file() for stage in ("prepare", "sft", "ppo"))
    for stage in ("sft", "ppo"):  # model cards with the research notice and, after eval, the eval table
        card = (run / stage / "adapter" / "README.md").read_text()
        assert "not for clinical decisions" in card and "| reward (0-1) |" in card and "Not evaluated" not in card
    report = (run / "report" / "report.html").read_text()
    assert 'id="notice"' in report and "offline reference judge" in report and "is a tiny randomly" in report

    # a second run skips what is done; --force ppo redoes PPO from scratch (not resumed) and every stage after it
    r = _pipeline(tmp_path, "--force", "ppo")
    assert r.returncode == 0, r.stderr[-3000:]
    stages = _stage_lines(r.stderr)
    assert [k for k, v in stages.items() if v == "skipped"] == ["prepare", "sft"]
    assert all(stages[k].startswith("done in") for k in ("ppo", "eval", "report"))
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["stage"] == "ppo" and "reward_mean" in m] == [1, 2, 1, 2]
