import subprocess
import sys
from pathlib import Path

import pytest

from medrl.cli_args import build_parser

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["prepare", "sft", "merge", "judge", "ppo", "estimate-memory", "eval", "config", "report", "review", "rubrics",
            "demo", "pipeline", "push", "tiny-model", "download-model"]


def _medrl(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "medrl.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_help_for_every_subcommand():
    r = _medrl("--help")
    assert r.returncode == 0
    for cmd in COMMANDS:
        assert cmd in r.stdout
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0


def test_version_and_field_help_in_help():
    import medrl

    r = _medrl("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"medrl {medrl.__version__}"
    r = _medrl("sft", "--help")
    assert r.returncode == 0
    lines = [" ".join(line.split()) for line in r.stdout.splitlines()]
    assert "sft.learning_rate Peak learning rate of the LoRA weights." in lines
    assert "model.lora.alpha LoRA scaling numerator: the adapter update is multiplied by `alpha / r`." in lines
    r = _medrl("pipeline", "--help")  # the top-level sections
    assert "ppo `medrl ppo`: the RL algorithm, rollout actors and learner ranks." in [
        " ".join(line.split()) for line in r.stdout.splitlines()]


def test_bad_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  no_such_key: 1\n")
    r = _medrl("prepare", "--config", str(bad), f"run.root={tmp_path}/runs")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"medrl: error: {bad}: unknown key 'ppo.no_such_key'")
    assert "Traceback" not in r.stderr


def test_missing_config_and_bad_override_exit_2(tmp_path):
    r = _medrl("sft", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and r.stderr.strip() == f"medrl: error: config file not found: {tmp_path}/missing.yaml"
    r = _medrl("eval", "--config", "configs/local_tiny.yaml", "run.seed=x", f"run.root={tmp_path}")
    assert r.returncode == 2 and "key 'run.seed' expects int" in r.stderr


def test_tiny_model_command(tmp_path):
    r = _medrl("tiny-model", "--out", str(tmp_path / "m"), "--vocab-size", "1000")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()


def test_report_on_missing_dir_exits_2(tmp_path):
    r = _medrl("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and "run directory not found" in r.stderr


def test_bad_arguments_fail_at_once_with_one_line(tmp_path, capsys, monkeypatch):
    """Each case exits 2 with one line naming the problem, before any work (no Ray start, no model built)."""
    from medrl.cli import main

    monkeypatch.chdir(REPO)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "notrun").mkdir()
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"prompt": "Fever?", "response": "Rest."}\n')
    cfg = ["--config", "configs/local_tiny.yaml", f"run.root={tmp_path}/runs"]
    cases = [
        (["tiny-model", "--out", str(tmp_path / "afile" / "m")], f"{tmp_path}/afile is a file, not a directory"),
        (["judge", *cfg, "--input", str(rows), "--out", str(tmp_path / "afile" / "o.jsonl")],
         f"cannot write output file {tmp_path}/afile/o.jsonl: {tmp_path}/afile is a file"),
        (["judge", "--limit", "-5", *cfg, "--input", str(rows), "--out", str(tmp_path / "o.jsonl")],
         "argument --limit: must be at least 1, got -5"),
        (["judge", *cfg, "--input", str(tmp_path), "--out", str(tmp_path / "o.jsonl")],
         f"{tmp_path} is a directory, expected a JSONL file"),
        (["report", str(tmp_path / "notrun")], "is not a run directory (none of config.yaml, logs, metrics.jsonl"),
        (["ppo", *cfg, "run.name=empty"], "rl_prompts.jsonl not found: run `medrl prepare` first"),
    ]
    import ray

    for args, message in cases:
        try:
            rc = main(args)
        except SystemExit as exc:  # argparse
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2 and message in err.strip().splitlines()[-1], (args, err)
        assert "Traceback" not in err and not ray.is_initialized()
    assert not (tmp_path / "o.jsonl").exists()


def test_unusable_run_root_binary_input_negative_limit_and_a_bad_section_exit_2(tmp_path, capsys, monkeypatch):
    """No traceback: each case is one line naming the path, file:line or the override that is wrong."""
    from medrl.cli import main

    monkeypatch.chdir(REPO)
    (tmp_path / "afile").write_text("x")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"prompt": "Fever?", "response": "Rest."}\n' + bytes(range(128, 256)) + b"\n")
    root = f"run.root={tmp_path}/runs"
    cases = [
        (["prepare", "run.root=/proc/medrl"],  # a stage: estimate-memory reads only and makes no run directory
         "cannot create the run directory /proc/medrl/default (run.root / run.name): No such file or directory"),
        (["prepare", f"run.root={tmp_path}/afile/runs"],
         f"cannot create the run directory {tmp_path}/afile/runs/default (run.root / run.name): {tmp_path}/afile is "
         f"a file, not a directory"),
        (["judge", "--input", str(binary), "--out", str(tmp_path / "o.jsonl"), root, "reward.judge.provider=none"],
         f"{binary}:2: not UTF-8 text (byte 0x80 at column 1)"),
        (["estimate-memory", "eval.limit=-1", root], "override 'eval.limit=-1': key 'eval.limit' is out of range"),
        (["estimate-memory", "eval.set_limits.gold=-3", root], "override 'eval.set_limits.gold=-3'"),
        (["estimate-memory", "run=5", root], "override 'run=5': cannot set 'run.root': 'run' is not a mapping"),
    ]
    for args, message in cases:
        rc = main(args)
        err = capsys.readouterr().err
        assert rc == 2 and message in err.strip().splitlines()[-1], (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
