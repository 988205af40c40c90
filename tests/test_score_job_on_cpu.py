"""``ray_jobs/score.py`` submitted with ``ray job submit`` to a real ``ray start --head`` on 127.0.0.1, judging
against the loopback OpenAI-compatible server; the API key comes from the nodes' environment and is written nowhere."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from medrl.reward.rubric import build_messages
from medrl.reward.text import split_response
from medrl.testing.loopback_server import LoopbackJudge, request_key

REPO = Path(__file__).resolve().parents[1]
FAKE_KEY = "sk-medrl-job-" + secrets.token_hex(8)  # built at run time: the uploaded sources must not hold it


@pytest.fixture()
def node_key(monkeypatch):
    """Set before ``ray_head`` starts, so the head's processes (and the job) inherit it, as on a real cluster."""
    monkeypatch.setenv("DEEPSEEK_API_KEY", FAKE_KEY)


def test_score_job_on_a_real_ray_head(node_key, ray_head, tmp_path):
    rows = [{"id": f"job-{i}", "prompt": f"Job case {i}: sore throat and fever?",
             "response": f"<think>\nStrep, case {i}.\n</think>\n\nAmoxicillin for streptococcal pharyngitis ({i}).",
             "reference": "Amoxicillin for streptococcal pharyngitis."} for i in range(6)]
    src, out = tmp_path / "in.jsonl", tmp_path / "scored.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with LoopbackJudge(api_key=FAKE_KEY) as server:
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head["dashboard"],
               "--working-dir", str(REPO), "--", sys.executable, "ray_jobs/score.py",
               "--config", "configs/local_tiny.yaml", "--input", str(src), "--out", str(out),
               f"run.root={tmp_path}/runs", "run.name=job", "model.build_tiny_if_missing=false",
               "reward.judge.provider=openai", f"reward.judge.base_url={server.base_url}",
               f"reward.cache.path={tmp_path}/cache.sqlite", "reward.judge.num_actors=1"]  # one Likert call per row
        job = subprocess.run(cmd, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=300)
        served = server.stats()["requests"]
    # the requests of the rows (the job's start-up check call to the judge is left out)
    requests = sum(served.get(request_key(build_messages(r["prompt"], split_response(r["response"]).answer,
                                                         r["reference"])[1]["content"]), 0) for r in rows)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == [r["id"] for r in rows]
    assert all(r["judge"] == "openai:deepseek-chat" and r["judge_status"] == "ok" and r["teacher"] is not None
               for r in results)
    assert requests == 6
    summary = json.loads(next(line for line in job.stdout.splitlines() if line.startswith('{"items"')))
    assert summary["judged"] == 6 and summary["cost_usd"] > 0 and summary["teacher_judgements"] == 6
    head_tmp = ray_head["temp_dir"]
    assert head_tmp.is_dir()
    leaks = [str(p) for root in (tmp_path, head_tmp) for p in root.rglob("*")
             if p.is_file() and not p.is_symlink() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == [] and FAKE_KEY not in job.stdout + job.stderr
