"""Adapter directories others can use: the model card (Hugging Face format, research-use notice, data, reward, eval
table), a base model named by an absolute path, the tokenizer with its chat template, loading with
``AutoPeftModelForCausalLM`` from another working directory, and ``medrl push`` failing in one line offline."""
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from medrl import RESEARCH_NOTICE
from medrl.cli import main
from medrl.config import Config
from medrl.evaluation.evaluate import save_eval
from medrl.models.card import finish_adapter, refresh_cards
from medrl.models.loading import load_policy, load_tokenizer
from medrl.runs import RunDir
from test_report_on_cpu import PAIRWISE, _eval_rows

DATA_CARD = """# Data card

## Output files

| file | records |
|---|---|
| train.jsonl | 51 |

## Sources

(sources table)
"""


def _front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1])


@pytest.fixture()
def ppo_run(tmp_path, tiny_model_dir, monkeypatch):
    """A PPO adapter saved as the learner saves it (peft ``save_pretrained``: a relative base path, PEFT's template
    README, no tokenizer), in a run with a data card; the config names the model by a relative path."""
    monkeypatch.chdir(tiny_model_dir.parent)
    cfg = Config.model_validate({
        "run": {"name": "card", "root": str(tmp_path / "runs")},
        "model": {"path": tiny_model_dir.name, "device": "cpu", "dtype": "float32", "lora": {"r": 4, "alpha": 8}},
        "data": {"sources": ["medical-o1", "delicate-medical", "pubmedqa"]},
        "reward": {"judge": {"provider": "reference"}, "w_verifier": 0.5},
        "ppo": {"estimator": "rloo", "steps": 3}})
    run = RunDir.from_config(cfg).ensure()
    run.data.mkdir()
    run.data_card.write_text(DATA_CARD, encoding="utf-8")
    torch.manual_seed(3)
    model = load_policy(cfg.model, trainable=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(run.ppo_adapter))
    assert json.loads((run.ppo_adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        tiny_model_dir.name
    run.record_stage(cfg, "ppo")
    finish_adapter(cfg, run, "ppo", load_tokenizer(cfg.model.path))
    return cfg, run


def test_card_in_hugging_face_format(ppo_run, tiny_model_dir):
    cfg, run = ppo_run
    readme = run.ppo_adapter / "README.md"
    meta = _front_matter(readme)
    assert meta["base_model"] == str(tiny_model_dir.resolve())
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"  # the tiny model's own card
    assert meta["datasets"] == ["FreedomIntelligence/medical-o1-reasoning-SFT", "krisfu/delicate_medical_r1_data"]
    assert {"medical", "lora", "rloo", "research-only"} <= set(meta["tags"])
    text = readme.read_text(encoding="utf-8")
    assert "- \"FreedomIntelligence/medical-o1-reasoning-SFT\"  # license: Apache-2.0" in text
    assert f"> **{RESEARCH_NOTICE}**" in text and "not for clinical decisions" in RESEARCH_NOTICE
    assert "| medical-o1 | FreedomIntelligence/medical-o1-reasoning-SFT | Apache-2.0 | sft |" in text
    assert "pubmedqa" not in text.split("## Training data")[1].split("## Training\n")[0]  # a benchmark, not data
    assert "| train.jsonl | 51 |" in text  # the split sizes from DATA_CARD.md
    assert "- RL: rloo, 3 steps" in text
    assert "weights rule 0.6, teacher 0.4, verifier 0.5" in text
    assert "- Judge: `reference:medrl-reference-v1` (the offline reference judge" in text
    assert "Rubric version `medrl-rubric-v1`" in text and "accuracy 0.4, safety 0.3" in text
    assert "Not evaluated yet" in text


def test_adapter_loads_from_any_directory(ppo_run, tiny_model_dir, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    cfg, run = ppo_run
    adapter = run.ppo_adapter.resolve()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tiny_model_dir.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the relative base path would not resolve here
    tok = AutoTokenizer.from_pretrained(str(adapter))
    assert tok.chat_template == AutoTokenizer.from_pretrained(str(tiny_model_dir)).chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "Is a fever of 38 C dangerous?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(prompt).input_ids])
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    reference = load_policy(cfg.model.model_copy(update={"path": str(tiny_model_dir)}), adapter=adapter)
    with torch.no_grad():
        got, want = loaded(input_ids=ids).logits, reference(input_ids=ids).logits
        with reference.disable_adapter():
            base = reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the adapter is applied, not only the base


def test_eval_table_added_after_eval(ppo_run):
    cfg, run = ppo_run
    summary = save_eval(run, _eval_rows(), PAIRWISE, {"decoding": {}, "judge": "openai:deepseek-chat"})
    assert refresh_cards(cfg, run) == [run.ppo_adapter / "README.md"]  # no SFT adapter in this run
    text = (run.ppo_adapter / "README.md").read_text(encoding="utf-8")
    assert "Not evaluated yet" not in text and "judge `openai:deepseek-chat`" in text
    rl = summary["table"]["rl"]["pubmedqa"]
    assert f"| pubmedqa | **rl** | {rl['n']} | {rl['reward']:.3f} | – | {100 * rl['accuracy_strict']:.1f}% | – |" \
        in text
    assert "| redteam | base | 3 | 0.200 |" in text
    assert _front_matter(run.ppo_adapter / "README.md")["base_model"].startswith("/")


def test_push_fails_in_one_line_offline(ppo_run, tmp_path, capsys, monkeypatch):
    cfg, run = ppo_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MEDRL_TEST_HF_TOKEN", "hf_secretvalue123")
    assert main(["push", str(run.ppo_adapter), "--repo-id", "someone/medrl-test", "--token-env",
                 "MEDRL_TEST_HF_TOKEN"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medrl: error: push of {run.ppo_adapter} to the Hugging Face Hub "
                                               "(someone/medrl-test) failed: OfflineModeIsEnabled")
    assert "hf_secretvalue123" not in err[0]
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "adapter_config.json").write_text("{}")
    assert main(["push", str(tmp_path / "bare"), "--repo-id", "someone/x"]) == 2
    assert "has no README.md model card" in capsys.readouterr().err
