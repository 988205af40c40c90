"""``medrl estimate-memory``: the arithmetic against hand-computed numbers, its monotonicity, and the shipped GPU
configs fitting their cards with headroom. (Estimate vs measured peaks: ``bench/memory.py``.)"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from medrl.cli import main
from medrl.config import load_config
from medrl.errors import UsageError
from medrl.ppo.memory import (CUDA_CONTEXT_BYTES, GiB, HEADROOM, QWEN3_1P7B, VLLM_BATCHED_TOKENS, MemorySettings,
                              ModelShape, estimate, layer_activation_bytes, model_shape, run_estimate_memory,
                              settings_from_config)
from conftest import CONFIGS

SMALL = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000, tied=True)
SMALL_SETTINGS = MemorySettings(weight_bytes=2, micro_batch=2, prompt_tokens=8, response_tokens=4, lora_r=4,
                                gradient_checkpointing=True, entropy=False, cuda=False)


def test_parameter_counts_by_hand():
    # embedding 1000*64; per layer q 64*64 + k 64*32 + v 64*32 + o 64*64 + 3 * 64*128 + norms 2*64 + 2*16
    assert SMALL.layer_params() == 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 160 == 37024
    assert SMALL.params() == 64000 + 2 * 37024 + 64 == 138112
    assert replace(SMALL, tied=False).params() == 138112 + 64000
    # r * (in + out) per module: q 128, k 96, v 96, o 128, gate/up/down 192 each -> 4 * 1024 per layer
    assert SMALL.lora_params(4, SMALL_SETTINGS.lora_targets) == 2 * 4 * 1024
    assert SMALL.lora_params(4, ("q_proj", "v_proj")) == 2 * 4 * (128 + 96)
    # Qwen3-1.7B: ~1.72 B parameters, 17.4 M LoRA parameters at r=16 on all projections
    assert QWEN3_1P7B.params() == 1_720_574_976
    assert QWEN3_1P7B.lora_params(16, SMALL_SETTINGS.lora_targets) == 28 * 622_592


def test_layer_activations_by_hand():
    norms = 4 * 64 + 4 * 64 + 4 * 64 + 4 * 32 + 4 * (2 + 4 + 2)  # two RMSNorms, q_norm, k_norm, rsqrt
    lora_a = 4 * 4 * 7
    # bf16: an fp32 input copy per LoRA module (6 read 64 features, down_proj 128); K/V repeated to 4 heads
    bf16 = norms + 4 * (6 * 64 + 128) + lora_a + 2 * (2 * 64 + 2 * 64) + 4 * 4 + 3 * 2 * 128
    assert bf16 == 4384
    assert layer_activation_bytes(SMALL, SMALL_SETTINGS) == bf16
    assert layer_activation_bytes(SMALL, replace(SMALL_SETTINGS, repeat_kv=False)) == bf16 - 2 * 2 * (64 - 32)
    # fp32: no casts, q/k/v and gate/up share one saved input, o_proj reuses the attention output
    fp32 = norms + 4 * (64 + 64 + 128) + lora_a + 4 * (2 * 64 + 2 * 32) + 4 * 4 + 3 * 4 * 128
    assert layer_activation_bytes(SMALL, replace(SMALL_SETTINGS, weight_bytes=4, repeat_kv=False)) == fp32
    # only q/v adapted: two input copies, two A outputs
    qv = norms + 4 * (64 + 64) + 4 * 4 * 2 + 2 * (2 * 64 + 2 * 64) + 4 * 4 + 3 * 2 * 128
    assert layer_activation_bytes(SMALL, replace(SMALL_SETTINGS, lora_targets=("q_proj", "v_proj"))) == qv


def test_estimate_by_hand():
    parts = estimate(SMALL, SMALL_SETTINGS)
    tokens, rows = 2 * (8 + 4), 2 * 4
    assert parts["cuda_context"] == 0 and parts["allocator_reserve"] == 0
    assert parts["base_weights"] == 138112 * 2
    assert (parts["lora_weights"], parts["lora_grads"], parts["lora_optimizer"]) == (4 * 8192, 4 * 8192, 8 * 8192)
    # checkpointing keeps each layer's bf16 input; + final-norm fp32 copy; + gathered response hidden states
    assert parts["activations"] == 2 * 2 * 64 * tokens + 4 * 64 * tokens + 2 * 64 * rows == 13312
    assert parts["recompute"] == 2 * 4384 * tokens
    assert parts["logits_forward"] == 2 * 4 * rows * 1000
    assert parts["logits_backward"] == 4 * 4 * rows * 1000
    assert parts["train_step"] == 13312 + 2 * 4384 * tokens
    assert parts["scoring_pass"] == tokens * (2 * 64 + 3 * 2 * 128) + 2 * 4 * rows * 1000
    assert parts["learner_peak"] == parts["gpu_peak"] == 138112 * 2 + 16 * 8192 + parts["train_step"]
    gae = estimate(SMALL, replace(SMALL_SETTINGS, value_head=True))
    assert gae["lora_weights"] - parts["lora_weights"] == 4 * 65  # Linear(64, 1)
    assert gae["activations"] - parts["activations"] == 4 * 64 * rows  # its fp32 input
    # async_rollout: two kept versions + the live copy during a swap, fp32
    lagged = estimate(SMALL, replace(SMALL_SETTINGS, behaviour_snapshots=True))
    assert lagged["snapshots"] == 3 * 4 * 8192 and lagged["learner_peak"] - parts["learner_peak"] == 3 * 4 * 8192


def test_checkpointing_zero_and_batch_are_monotone():
    s = MemorySettings(zero_stage=0, ranks=2)
    with_ckpt, without = estimate(QWEN3_1P7B, s), estimate(QWEN3_1P7B, replace(s, gradient_checkpointing=False))
    assert with_ckpt["activations"] * 10 < without["activations"]
    assert with_ckpt["learner_peak"] < without["learner_peak"]
    zero2 = estimate(QWEN3_1P7B, replace(s, zero_stage=2))
    zero3 = estimate(QWEN3_1P7B, replace(s, zero_stage=3))
    assert zero2["base_weights"] == with_ckpt["base_weights"] > zero3["base_weights"]
    assert zero2["lora_grads"] * 2 == with_ckpt["lora_grads"] and zero3["lora_weights"] * 2 == zero2["lora_weights"]
    assert estimate(QWEN3_1P7B, replace(s, zero_stage=3, offload_params=True))["base_weights"] < zero3["base_weights"]
    assert estimate(QWEN3_1P7B, replace(s, offload_optimizer=True))["lora_optimizer"] == 0
    small, big = estimate(QWEN3_1P7B, replace(s, micro_batch=1)), estimate(QWEN3_1P7B, replace(s, micro_batch=8))
    assert small["learner_peak"] < with_ckpt["learner_peak"] < big["learner_peak"]
    shared = estimate(QWEN3_1P7B, replace(s, colocated_rollouts=1))
    assert shared["gpu_peak"] - shared["learner_peak"] > QWEN3_1P7B.params() * 2  # a second copy of the weights


def test_vllm_engine_share_by_hand_and_sleep_mode():
    s = MemorySettings(micro_batch=2, prompt_tokens=512, response_tokens=1024, colocated_rollouts=1,
                       rollout_engine="vllm", engine_kv_cache_bytes=4 * GiB, engine_max_num_seqs=64,
                       engine_max_lora_rank=16)
    awake = estimate(QWEN3_1P7B, s)
    h, q, k, i, V = 2048, 2048, 1024, 6144, 151936
    lora_slot = 28 * 16 * ((h + q) + 2 * (h + k) + (q + h) + 2 * (h + i) + (i + h)) * 2
    workspace = VLLM_BATCHED_TOKENS * (4 * h + q + 2 * k + 3 * i) * 2 + 2 * 4 * 64 * V
    engine = CUDA_CONTEXT_BYTES + QWEN3_1P7B.params() * 2 + lora_slot + 4 * GiB + workspace
    assert awake["rollout_actor"] == awake["rollouts"] == engine
    assert awake["gpu_peak"] == awake["learner_peak"] + engine
    # sleep mode: the engine keeps only its CUDA context while the learner steps
    slept = estimate(QWEN3_1P7B, replace(s, engine_sleeps=True))
    persistent = sum(awake[key] for key in ("cuda_context", "base_weights", "lora_weights", "lora_grads",
                                            "lora_optimizer"))
    assert slept["gpu_peak"] == max(awake["learner_peak"] + CUDA_CONTEXT_BYTES, persistent + engine)
    assert slept["gpu_peak"] < awake["gpu_peak"]
    # without an explicit KV-cache size: the cache one rollout call needs (16 sequences of 1536 tokens)
    auto = estimate(QWEN3_1P7B, replace(s, engine_kv_cache_bytes=None))
    assert auto["rollout_actor"] - engine == 2 * 28 * k * 2 * 16 * 1536 - 4 * GiB


@pytest.mark.parametrize("name,card_gib", [("qwen3_1p7b_16gb.yaml", 16), ("qwen3_1p7b_24gb.yaml", 24)])
def test_gpu_configs_fit_their_card_with_headroom(name, card_gib, capsys):
    cfg = load_config(CONFIGS / name)
    result = run_estimate_memory(cfg)
    assert result["settings"]["cuda"] and result["settings"]["weight_bytes"] == 2
    assert result["settings"]["rollout_engine"] == "vllm" and result["settings"]["engine_sleeps"]
    assert result["gib"]["rollouts_asleep"] < result["gib"]["rollouts"]
    assert result["peak_gib"] <= (1 - HEADROOM) * card_gib, result["gib"]
    assert result["fits_with_headroom"][str(card_gib)]
    assert result["peak_checkpointing_off_gib"] > result["peak_checkpointing_on_gib"]
    out = capsys.readouterr().out
    assert "GPU PEAK" in out and f"{card_gib} GiB yes" in out


def test_shape_from_model_dir_and_deepspeed_json(tiny_model_dir, tmp_path):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.device=cpu",
                             f"ppo.learner.deepspeed={CONFIGS / 'deepspeed' / 'zero3.json'}", "ppo.learner.ranks=2"])
    shape, source = model_shape(cfg.model)
    raw = json.loads((tiny_model_dir / "config.json").read_text())
    assert source.endswith("config.json") and shape == ModelShape.from_hf_config(raw)
    assert (shape.hidden, shape.layers, shape.kv_heads, shape.vocab) == (64, 2, 2, raw["vocab_size"])
    s = settings_from_config(cfg)
    assert (s.zero_stage, s.ranks, s.cuda, s.weight_bytes) == (3, 2, False, 4)
    offload = settings_from_config(load_config(None, [
        f"ppo.learner.deepspeed={CONFIGS / 'deepspeed' / 'zero3_offload.json'}"]))
    assert offload.offload_optimizer and offload.offload_params
    with pytest.raises(UsageError, match="ppo.learner.deepspeed: file not found"):
        settings_from_config(load_config(None, [f"ppo.learner.deepspeed={tmp_path / 'nope.json'}"]))
    empty = tmp_path / "model"
    empty.mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        model_shape(load_config(None, [f"model.path={empty}"]).model)
    with pytest.raises(UsageError, match="download-model"):
        model_shape(load_config(None, ["model.path=Qwen/Qwen3-4B"]).model)


def test_cli_prints_the_table(tmp_path, capsys):
    assert main(["estimate-memory", "--config", str(CONFIGS / "qwen3_1p7b_24gb.yaml"), f"run.root={tmp_path}",
                 "ppo.micro_batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 2 x" in out and "LEARNER PEAK" in out and "logits, backward" in out
