"""Run records: commands that only read leave the run directory as it was (no config rewrite, no new run
directory); each stage records the config it ran with, and a later stage names the keys that changed."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from medrl.cli import main
from medrl.config import load_config
from medrl.prepare.stage import run_prepare
from medrl.evaluation.evaluate import save_eval
from medrl.runs import RunDir, setup_logging
from test_report_on_cpu import PAIRWISE, _eval_rows

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "local_tiny.yaml"


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the log file aside: reading commands may log)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name != "logs"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir):
    """A run with prepared data, an SFT adapter and an eval: what the reading commands read."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("records")
    overrides = [f"run.root={root}", f"model.path={tiny_model_dir}", "model.build_tiny_if_missing=false"]
    cfg = load_config(TINY, overrides)
    run = RunDir.from_config(cfg)
    old = os.getcwd()
    os.chdir(REPO)  # the sample paths of local_tiny are relative to the repository
    try:
        run_prepare(cfg, run)
    finally:
        os.chdir(old)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(run.sft_adapter))
    save_eval(run, _eval_rows(), PAIRWISE, {"decoding": {}, "judge": "openai:deepseek-chat"})
    return root, run, overrides


def test_prepare_records_its_config(prepared):
    root, run, overrides = prepared
    recorded = yaml.safe_load(run.stage_config_path("prepare").read_text())
    assert recorded == load_config(TINY, overrides).to_dict()
    assert run.config_path.read_text() == run.stage_config_path("prepare").read_text()
    assert "`config.prepare.yaml`" in run.data_card.read_text()


def test_reading_commands_leave_the_run_as_it_was(prepared, tmp_path, monkeypatch, capsys):
    root, run, overrides = prepared
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    before, runs_before = _snapshot(run.root), sorted(p.name for p in root.iterdir())
    scored = tmp_path / "scored.jsonl"
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"prompt": f"Is fever {i} bad?", "response": "Rest and drink water.",
                                           "reference": "Rest."}) + "\n" for i in range(3)), encoding="utf-8")
    commands = {
        "estimate-memory": ["estimate-memory", "-c", str(TINY), *overrides, "ppo.steps=999"],
        "estimate-memory other run": ["estimate-memory", "-c", "configs/qwen3_1p7b_24gb.yaml", f"run.root={root}"],
        "judge --dry-run": ["judge", "--dry-run", "-c", str(TINY), *overrides, "reward.judge.provider=openai",
                            f"reward.cache.path={tmp_path}/cache.sqlite", "--input", str(samples), "--out",
                            str(scored)],
        "merge": ["merge", "-c", str(TINY), *overrides, "sft.max_steps=7", "--out", str(tmp_path / "merged")],
        "config show": ["config", "show", "-c", str(TINY), *overrides, "model.lora.r=2"],
        "report": ["report", str(run.root)],
        "review export": ["review", "export", str(run.root)],
    }
    for name, argv in commands.items():
        assert main(argv) == 0, f"{name}: {capsys.readouterr().err}"
    out = capsys.readouterr().out
    assert "to judge" in out or "cost" in out  # the estimate was printed, without an API key
    assert not scored.exists() and not (tmp_path / "cache.sqlite").exists()
    assert (tmp_path / "merged" / "config.json").is_file()
    after = _snapshot(run.root)
    written = {k for k in after if k.startswith(("report/", "review/"))}  # the outputs of report and review
    assert written and {k: v for k, v in after.items() if k not in written} == before
    assert sorted(p.name for p in root.iterdir()) == runs_before  # no run directory made for qwen3_1p7b_24gb


def test_a_later_stage_names_the_keys_that_changed(tmp_path, capsys):
    run = RunDir(tmp_path / "r")
    setup_logging(None)  # the console, as the CLI sets it up
    base = ["model.lora.r=16", f"run.root={tmp_path}"]
    assert run.record_stage(load_config(None, base), "prepare") == []
    assert run.record_stage(load_config(None, [*base, "sft.learning_rate=0.001"]), "sft") == []
    assert capsys.readouterr().err == ""  # sft settings are not compared
    changed = load_config(None, ["model.lora.r=8", "model.system_prompt=Be brief.", "ppo.lr=0.001",
                                 "data.gold_size=5", f"run.root={tmp_path}"])
    drift = run.record_stage(changed, "ppo")
    assert drift == ["data.gold_size (prepare, sft)", "model.lora.r (prepare, sft)",
                     "model.system_prompt (prepare, sft)"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "WARNING medrl.runs: ppo runs with a config that differs from what earlier stages ran with, in: "
        f"{'; '.join(drift)} (records: {run.root}/config.<stage>.yaml)")
    assert yaml.safe_load(run.stage_config_path("sft").read_text())["model"]["lora"]["r"] == 16  # SFT's kept
    assert yaml.safe_load(run.stage_config_path("ppo").read_text())["model"]["lora"]["r"] == 8
    assert run.config_path.read_text() == run.stage_config_path("ppo").read_text()  # the newest stage's
    assert run.record_stage(changed, "judge") == []  # scoring a file builds on no earlier stage
    assert capsys.readouterr().err == ""
