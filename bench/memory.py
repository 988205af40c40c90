"""Checks ``medrl.ppo.memory`` against reality on CPU: estimated vs measured peak memory of the learner's work.

Each variant runs in a fresh interpreter: a Qwen3-shaped model with random weights, LoRA from ``model.lora`` with
dropout disabled (as the learner does), ``PolicyWithValue`` + ``policy_loss`` + AdamW exactly as
``medrl.ppo.learner`` uses them. Measured: peak RSS during one train step (or one no-grad scoring pass) minus the
RSS before it, with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave RSS at
once, as CUDA's "allocated" counter would. The estimate is the same arithmetic ``medrl estimate-memory`` uses, on
the CPU branch (no CUDA context, no allocator reserve, K/V not repeated because the batch is unpadded).

    .venv/bin/python bench/memory.py             # ~1 min on 2 cores
    .venv/bin/python bench/memory.py --qwen3-1p7b  # adds the real Qwen3-1.7B shape (micro-batch 1, ~3 min, ~4.5 GiB)
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrl.ppo.memory import QWEN3_1P7B, MemorySettings, ModelShape, estimate  # noqa: E402

MiB = 2 ** 20
MEDIUM = ModelShape(hidden=512, layers=6, heads=8, kv_heads=4, head_dim=64, intermediate=1536, vocab=32000, tied=True)
"""Small but not tiny: every term of the estimate is several MiB and the logits are ~40% of the step."""


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(spec: dict) -> dict:
    """One variant, in this process: build, then measure the peak of one step. Returns MiB figures."""
    import torch
    from peft import get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from trl.trainer.utils import disable_dropout_in_model

    from medrl.config import LoraSettings
    from medrl.models.loading import lora_config
    from medrl.ppo.objective import aggregate_loss, policy_loss
    from medrl.ppo.modeling import PolicyWithValue

    shape = ModelShape(**spec["shape"])
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         head_dim=shape.head_dim, intermediate_size=shape.intermediate,
                         tie_word_embeddings=shape.tied)
    t0 = time.perf_counter()
    rss0 = _status("VmRSS")
    torch.set_default_dtype(getattr(torch, spec["dtype"]))  # build in the target dtype (no fp32 detour)
    base = Qwen3ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    weights_mib = (_status("VmRSS") - rss0) / MiB
    policy = get_peft_model(base, lora_config(LoraSettings()))
    disable_dropout_in_model(policy)
    if spec["checkpointing"]:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PolicyWithValue(policy).train()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    b, P, R = spec["micro_batch"], spec["prompt"], spec["response"]
    ids = torch.randint(0, shape.vocab, (b, P + R))
    args = (ids, torch.ones_like(ids), torch.full((b,), P), ids[:, P:])
    build_s = time.perf_counter() - t0

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    t0 = time.perf_counter()
    if spec["mode"] == "score":
        with torch.no_grad():
            model(*args, temperature=0.7, with_values=False)
    else:
        out = model(*args, temperature=0.7, with_values=False, with_entropy=spec["entropy"])
        ones = torch.ones(b, R)
        token_loss, _ = policy_loss("ppo", out["logprobs"], out["logprobs"].detach(), ones, ones, clip_low=0.2,
                                    clip_high=0.2)
        loss = aggregate_loss(token_loss, ones, "token-mean", n_tokens=b * R, n_seqs=b, norm_len=R)
        del out
        loss.backward()
        optimizer.step()
    return {"measured_mib": (_status("VmHWM") - before) / MiB, "weights_mib": weights_mib,
            "step_s": time.perf_counter() - t0, "build_s": build_s}


def expected(spec: dict) -> dict:
    shape = ModelShape(**spec["shape"])
    s = MemorySettings(weight_bytes=4 if spec["dtype"] == "float32" else 2, micro_batch=spec["micro_batch"],
                       prompt_tokens=spec["prompt"], response_tokens=spec["response"],
                       gradient_checkpointing=spec["checkpointing"], entropy=spec["entropy"], repeat_kv=False,
                       cuda=False)
    parts = estimate(shape, s)
    if spec["mode"] == "score":
        step = parts["scoring_pass"]
    else:  # the step's peak (LoRA grads are alive from the backward on; Adam states appear after the peak)
        step = parts["train_step"] + parts["lora_grads"]
    return {"estimated_mib": step / MiB, "weights_est_mib": parts["base_weights"] / MiB}


def variants(full: bool) -> list[dict]:
    medium = {"shape": asdict(MEDIUM), "micro_batch": 2, "prompt": 128, "response": 256}
    out = []
    for dtype in ("float32", "bfloat16"):
        for ckpt in (True, False):
            out.append({**medium, "dtype": dtype, "checkpointing": ckpt, "entropy": True, "mode": "train"})
        out.append({**medium, "dtype": dtype, "checkpointing": True, "entropy": False, "mode": "score"})
    if full:
        qwen = {"shape": asdict(QWEN3_1P7B), "micro_batch": 1, "prompt": 64, "response": 128, "dtype": "bfloat16"}
        out += [{**qwen, "checkpointing": True, "entropy": True, "mode": "train"},
                {**qwen, "checkpointing": False, "entropy": True, "mode": "train"}]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qwen3-1p7b", action="store_true", help="also measure the real Qwen3-1.7B shape")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one variant in a fresh interpreter
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"{'shape':<11}{'dtype':<10}{'ckpt':<6}{'pass':<7}{'estimated':>11}{'measured':>10}{'est/meas':>10}"
          f"{'weights est/meas':>20}{'step s':>8}")
    for spec in variants(args.qwen3_1p7b):
        proc = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"variant {spec} failed:\n{proc.stderr[-3000:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        est = expected(spec)
        name = "qwen3-1.7b" if spec["shape"]["vocab"] == QWEN3_1P7B.vocab else "medium"
        print(f"{name:<11}{spec['dtype']:<10}{'on' if spec['checkpointing'] else 'off':<6}{spec['mode']:<7}"
              f"{est['estimated_mib']:>9.0f}Mi{got['measured_mib']:>8.0f}Mi"
              f"{est['estimated_mib'] / got['measured_mib']:>10.2f}"
              f"{est['weights_est_mib']:>11.0f}/{got['weights_mib']:<8.0f}{got['step_s']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
