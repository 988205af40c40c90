"""LoRA SFT on the tiny Qwen3: overfitting, completion-only labels, truncation, adapter reload, resume, merge, and
real DeepSpeed ZeRO-2 runs over gloo (one rank, then two ranks launched by ``medrl sft`` through torchrun)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from medrl.config import Config
from medrl.errors import UsageError
from medrl.models.chat import messages_for
from medrl.models.loading import load_policy
from medrl.runs import RunDir, read_metrics
from medrl.sft.merge import merge_adapter
from medrl.sft.trainer import run_sft, train_sft

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = REPO / "configs" / "deepspeed"

SYSTEM = "You are a careful medical assistant."
QA = [("What should I do for a mild fever?", "Mild fever: rest and fluids.", "Rest and drink fluids."),
      ("Chest pain spreading to the left arm?", "This can be a heart attack.", "Call emergency services now."),
      ("头痛怎么办？", "轻度头痛多为紧张性。", "休息，补水；剧烈头痛请就医。"),
      ("Can I take antibiotics for a cold?", "Colds are viral.", "No, antibiotics do not help a cold."),
      ("Is ibuprofen safe on an empty stomach?", "NSAIDs irritate the stomach.", "Take it with food."),
      ("How much water per day?", "Needs vary with body size.", "About two litres for most adults."),
      ("What is a normal blood pressure?", "Normal is below 120/80.", "Below 120/80 mmHg."),
      ("Sudden weakness on one side of the face?", "Possible stroke.", "Call emergency services immediately.")]
LONG = ("Why do I feel tired?", "Many causes. " * 60, "See a doctor if it lasts.")  # cut at max_seq_len
HUGE_PROMPT = ("headache " * 300, "Too long.", "Too long.")  # the prompt alone fills max_seq_len: dropped


def record(question: str, think: str, answer: str) -> dict:
    """One row in the prepared-data schema (medrl/data writes these)."""
    return {"id": hashlib.sha256(question.encode()).hexdigest()[:16], "source": "test", "language": "en",
            "question": question, "think": think, "answer": answer, "output": f"<think>\n{think}\n</think>\n\n{answer}",
            "reference": answer, "options": None, "label": None, "specialty": None, "risk": "low",
            "category": None, "expected_behavior": None, "meta": {}}


def make_run(tmp_path: Path, model_dir: Path, train: list[tuple], dev: list[tuple], lora_dropout: float = 0.0,
             **sft) -> tuple[Config, RunDir]:
    cfg = Config.model_validate({
        "run": {"name": "sft", "root": str(tmp_path / "runs"), "seed": 7},
        "model": {"path": str(model_dir), "device": "cpu", "dtype": "float32", "system_prompt": SYSTEM,
                  "lora": {"r": 8, "alpha": 16, "dropout": lora_dropout}},
        "sft": {"gradient_accumulation_steps": 1, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
                "max_seq_len": 128, **sft}})
    run = RunDir.from_config(cfg)
    run.data.mkdir(parents=True)
    for name, rows in (("train", train), ("dev", dev)):
        (run.data / f"{name}.jsonl").write_text(
            "".join(json.dumps(record(*r), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return cfg, run


def completion_loss(model, tok, rows: list[tuple], max_len: int) -> float:
    """Mean next-token loss over the assistant tokens only, computed from the rendered text (independently of the
    trainer's tokenization and label building)."""
    total, count = 0.0, 0
    model.eval()
    for question, think, answer in rows:
        prompt = tok.apply_chat_template(messages_for(SYSTEM, question), tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(messages_for(SYSTEM, question, record(question, think, answer)["output"]),
                                       tokenize=False)
        n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
        ids = tok(full, add_special_tokens=False).input_ids[:max_len]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        targets = torch.tensor(ids[n_prompt:])
        total -= logp[n_prompt - 1: len(ids) - 1].gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return total / count


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """30 full-batch steps on 4 short examples (+1 cut, +1 dropped); dev = the 4 short examples."""
    tmp = tmp_path_factory.mktemp("sft")
    cfg, run = make_run(tmp, tiny_model_dir, QA[:4] + [LONG, HUGE_PROMPT], QA[:4], max_steps=30,
                        learning_rate=5e-3, per_device_train_batch_size=6, per_device_eval_batch_size=4,
                        logging_steps=5, eval_steps=15, save_steps=15)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    loss_before = completion_loss(base, tok, QA[:4], 128)
    trainer = train_sft(cfg, run)
    return cfg, run, trainer, tok, loss_before


def test_sft_overfits_small_set_and_reports(trained):
    cfg, run, trainer, tok, loss_before = trained
    loss_after = completion_loss(trainer.model, tok, QA[:4], 128)
    assert loss_after < loss_before - 0.5, (loss_before, loss_after)
    rows = read_metrics(run, "sft")
    head = rows[0]
    assert (head["train_examples"], head["train_truncated"], head["train_dropped"]) == (6, 2, 1)
    assert (head["dev_examples"], head["dev_truncated"], head["num_processes"], head["world_size"]) == (4, 0, 1, 1)
    train_losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 5, 10, 15, 20, 25, 30]
    assert train_losses[-1] < train_losses[0] - 0.5
    assert all(r["lr"] == pytest.approx(5e-3) and r["step_time_s"] > 0 for r in rows if "train_loss" in r)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    # the trainer's eval loss on dev is exactly the loss over assistant tokens: the prompt is masked out
    assert evals[-1]["eval_loss"] == pytest.approx(loss_after, abs=1e-4)
    assert (run.tb_dir("sft")).is_dir() and any(run.tb_dir("sft").iterdir())
    assert sorted(p.name for p in run.checkpoints("sft").glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-30"]


def test_labels_mask_system_and_user_tokens(trained):
    cfg, run, trainer, tok, _ = trained
    kept = QA[:4] + [LONG]  # HUGE_PROMPT was dropped: no completion token within max_seq_len
    ds = trainer.train_dataset
    assert len(ds) == len(kept)
    for i, (question, think, answer) in enumerate(kept):
        prompt = tok.apply_chat_template(messages_for(SYSTEM, question), tokenize=False, add_generation_prompt=True)
        assert prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>")
        n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        assert len(ids) == len(labels) <= 128
        assert labels[:n_prompt] == [-100] * n_prompt  # system, user and the assistant header
        assert labels[n_prompt:] == ids[n_prompt:]  # every assistant token is trained, <|im_end|> included
        assert tok.decode(ids[:n_prompt]) == prompt
        if (question, think, answer) != LONG:
            assert tok.decode(labels[n_prompt:]) == f"<think>\n{think}\n</think>\n\n{answer}<|im_end|>\n"
    long_ids = ds[len(kept) - 1]["input_ids"]
    assert len(long_ids) == 128 and tok.convert_tokens_to_ids("<|im_end|>") not in long_ids[-5:]


def test_saved_adapter_reproduces_trained_logits(trained):
    cfg, run, trainer, tok, _ = trained
    adapter = run.sft_adapter
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "medrl_config.yaml", "README.md"} <= {
        p.name for p in adapter.iterdir()}
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["base_model_name_or_path"] == str(Path(cfg.model.path).resolve())
    card = (adapter / "README.md").read_text()  # the model card, not PEFT's empty template
    assert card.startswith(f"---\nbase_model: \"{Path(cfg.model.path).resolve()}\"\nlibrary_name: peft\n")
    assert "Research use only, not for clinical decisions" in card and "- SFT: learning rate" in card
    ids = torch.tensor([tok(tok.apply_chat_template(messages_for(SYSTEM, QA[1][0]), tokenize=False,
                                                    add_generation_prompt=True)).input_ids])
    trainer.model.eval()
    with torch.no_grad():
        trained_logits = trainer.model(input_ids=ids).logits
        reloaded = load_policy(cfg.model, adapter=adapter)
        reloaded_logits = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(input_ids=ids).logits
    torch.testing.assert_close(reloaded_logits, trained_logits, rtol=0, atol=1e-5)
    assert (reloaded_logits - base_logits).abs().max() > 1e-2


def test_merge_round_trip(trained, tmp_path):
    cfg, run, trainer, tok, _ = trained
    out = merge_adapter(cfg, run, adapter=None, out=tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    assert "\nlibrary_name: transformers\n" in (out / "README.md").read_text()  # the card travels with the model
    ids = torch.tensor([tok(QA[2][0]).input_ids])
    with torch.no_grad():
        adapter_logits = load_policy(cfg.model, adapter=run.sft_adapter)(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter_logits, rtol=0, atol=1e-5)
    with pytest.raises(UsageError, match="no LoRA adapter"):
        merge_adapter(cfg, run, adapter=tmp_path, out=tmp_path / "m2")


def test_missing_data_or_stale_checkpoints_are_usage_errors(trained, tiny_model_dir, tmp_path):
    cfg, run, *_ = trained
    with pytest.raises(UsageError, match="earlier SFT run: pass --resume auto"):
        run_sft(cfg, run)
    with pytest.raises(UsageError, match="not a checkpoint directory"):
        run_sft(cfg, run, resume=str(tmp_path))
    cfg2, run2 = make_run(tmp_path, tiny_model_dir, QA, QA)
    (run2.data / "train.jsonl").unlink()
    with pytest.raises(UsageError, match=r"train\.jsonl not found: run `medrl prepare` first"):
        run_sft(cfg2, run2)
    (run2.data / "train.jsonl").write_text('{"question": "q", "output": ""}\n')
    with pytest.raises(UsageError, match=r"train\.jsonl:1: key 'output' must be a non-empty string"):
        run_sft(cfg2, run2)


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` (with a checkpoint), as a crash right after a save would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True


def test_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    # 6 rows, batch 2: 3 steps per epoch, so the resumed half starts mid-epoch; dropout and a decaying schedule on
    sft = dict(max_steps=8, learning_rate=5e-3, lr_scheduler_type="linear", per_device_train_batch_size=2,
               logging_steps=1, eval_steps=100, save_steps=100)
    straight_cfg, straight_run = make_run(tmp_path / "a", tiny_model_dir, QA[:6], QA[:2], lora_dropout=0.1, **sft)
    train_sft(straight_cfg, straight_run)
    cfg, run = make_run(tmp_path / "b", tiny_model_dir, QA[:6], QA[:2], lora_dropout=0.1, **sft)
    first = train_sft(cfg, run, callbacks=[StopAt(4)])
    assert first.state.global_step == 4 and (run.checkpoints("sft") / "checkpoint-4").is_dir()
    assert run_sft(cfg, run, resume="auto") == run.sft_adapter
    losses = {r["step"]: r["train_loss"] for r in read_metrics(run, "sft") if "train_loss" in r}
    straight_losses = {r["step"]: r["train_loss"] for r in read_metrics(straight_run, "sft") if "train_loss" in r}
    assert sorted(losses) == sorted(straight_losses) == list(range(1, 9))
    for step in range(1, 9):  # same batches in the same order, same weights at every step
        assert losses[step] == pytest.approx(straight_losses[step], abs=1e-5), step
    assert json.loads((run.checkpoints("sft") / "checkpoint-8" / "trainer_state.json").read_text())[
        "global_step"] == 8
    resumed_w = load_file(run.sft_adapter / "adapter_model.safetensors")
    straight_w = load_file(straight_run.sft_adapter / "adapter_model.safetensors")
    assert resumed_w.keys() == straight_w.keys()
    for name in straight_w:
        torch.testing.assert_close(resumed_w[name], straight_w[name], rtol=0, atol=1e-6)
    assert max(w.abs().max() for n, w in straight_w.items() if "lora_B" in n) > 0  # it did train


@pytest.mark.parametrize("name, stage, offload", [("zero2", 2, None), ("zero3", 3, None), ("zero3_offload", 3, "cpu")])
def test_deepspeed_configs_fill_every_auto_value(name, stage, offload, tiny_model_dir, tmp_path):
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # before the config: ZeRO-3 would hook loading
    ds = HfTrainerDeepSpeedConfig(str(DEEPSPEED / f"{name}.json"))
    try:
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=4,
                                 learning_rate=1e-4, max_grad_norm=1.0, bf16=True, use_cpu=True, report_to="none")
        ds.trainer_config_process(args)
        ds.trainer_config_finalize(args, model, num_training_steps=10)
        flat = json.dumps(ds.config)
        assert '"auto"' not in flat, flat
        zero = ds.config["zero_optimization"]
        assert zero["stage"] == stage and ds.config["bf16"]["enabled"] is True and ds.config["fp16"]["enabled"] is False
        assert (ds.config["train_batch_size"], ds.config["gradient_accumulation_steps"]) == (16, 4)
        assert zero.get("offload_optimizer", {}).get("device") == offload == zero.get("offload_param", {}).get("device")
        if offload:
            assert ds.config["optimizer"]["params"]["lr"] == 1e-4  # DeepSpeed's CPU Adam, filled from the sft section
    finally:
        unset_hf_deepspeed_config()  # the config registers itself globally for ZeRO-3 model loading


@pytest.fixture(scope="module")
def deepspeed_one_rank(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds1")
    cfg, run = make_run(tmp, tiny_model_dir, QA, QA[:2], max_steps=4, learning_rate=5e-3,
                        per_device_train_batch_size=4, logging_steps=1, eval_steps=4, save_steps=4,
                        deepspeed=str(DEEPSPEED / "zero2.json"), num_processes=1)
    assert run_sft(cfg, run) == run.sft_adapter
    return run


@pytest.mark.slow
def test_deepspeed_zero2_one_rank_on_cpu(deepspeed_one_rank):
    run = deepspeed_one_rank
    head = read_metrics(run, "sft")[0]
    assert (head["num_processes"], head["world_size"], head["global_batch"]) == (1, 1, 4)
    assert (run.checkpoints("sft") / "checkpoint-4" / "global_step4").is_dir()  # a DeepSpeed engine checkpoint
    steps = [r["step"] for r in read_metrics(run, "sft") if "train_loss" in r]
    assert steps == [1, 2, 3, 4]
    weights = load_file(run.sft_adapter / "adapter_model.safetensors")
    assert max(w.abs().max() for n, w in weights.items() if "lora_B" in n) > 0


@pytest.mark.slow
def test_deepspeed_zero2_two_ranks_identical_weights(deepspeed_one_rank, tiny_model_dir, tmp_path):
    """``sft.num_processes=2``: torchrun, gloo, ZeRO-2. Each rank takes half of the same global batch of 4, so the
    result equals the one-rank run; the ranks end with identical weights."""
    cfg, run = make_run(tmp_path, tiny_model_dir, QA, QA[:2], max_steps=4, learning_rate=5e-3,
                        per_device_train_batch_size=2, logging_steps=1, eval_steps=4, save_steps=4,
                        deepspeed=str(DEEPSPEED / "zero2.json"), num_processes=2)
    assert run_sft(cfg, run) == run.sft_adapter
    rows = read_metrics(run, "sft")
    assert (rows[0]["num_processes"], rows[0]["world_size"], rows[0]["global_batch"]) == (2, 2, 4)
    assert [r["replica_max_abs_diff"] for r in rows if "replica_max_abs_diff" in r] == [0.0]
    one = {r["step"]: r["train_loss"] for r in read_metrics(deepspeed_one_rank, "sft") if "train_loss" in r}
    two = {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}
    assert two == pytest.approx(one, abs=1e-5)
    w1 = load_file(deepspeed_one_rank.sft_adapter / "adapter_model.safetensors")
    w2 = load_file(run.sft_adapter / "adapter_model.safetensors")
    # Adam divides by sqrt(v): on an element whose gradient is ~0, the all-reduce's summation order (vs one rank's
    # batch mean) can move it by ~2e-5 in 4 steps (seen on CI); 1e-4 is still 0.5 % of the 4-step update bound 2e-2
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-4)
