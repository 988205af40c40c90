"""Peak memory and step time of LoRA SFT for a config's ``sft`` block (worst case: every example fills max_seq_len).

    python bench/sft_memory.py -c configs/qwen3_1p7b_16gb.yaml            # on the GPU workstation
    python bench/sft_memory.py -c configs/local_tiny.yaml --steps 4       # CPU smoke run with the tiny model

When the config's model is not on this machine (or with ``--random-qwen3-1p7b``), a randomly initialised model with
Qwen3-1.7B's exact shapes is built in a temporary directory with the tiny tokenizer: memory and speed are those of
the real model. Prints one line per figure; runs in a temporary run directory.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch

from medrl.config import load_config
from medrl.errors import UsageError
from medrl.models.loading import resolve_model_path
from medrl.runs import RunDir, read_metrics
from medrl.sft.trainer import train_sft


def build_random_qwen3_1p7b(out: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from medrl.models.tiny import build_tokenizer

    config = Qwen3Config(vocab_size=151936, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, intermediate_size=6144, max_position_embeddings=40960,
                         tie_word_embeddings=True, rope_theta=1000000.0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps (the first is excluded from timing)")
    parser.add_argument("--random-qwen3-1p7b", action="store_true", help="use a random Qwen3-1.7B-shaped model")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medrl_sft_bench_"))
    cfg = load_config(args.config, args.overrides)
    try:
        resolve_model_path(cfg.model.path, cfg.model.cache_dir)
        random_model = args.random_qwen3_1p7b
    except UsageError:
        random_model = True
    if random_model:
        cfg.model.path = str(build_random_qwen3_1p7b(tmp / "qwen3-1p7b-random"))
    s = cfg.sft
    examples_per_step = s.per_device_train_batch_size * s.gradient_accumulation_steps
    cfg.run.root, cfg.run.name = str(tmp), "bench"
    s.max_steps, s.save_steps, s.logging_steps = args.steps, 10**6, 1
    run = RunDir.from_config(cfg)
    run.data.mkdir(parents=True)
    row = {"question": "What should I do about a persistent cough?", "output": "<think>\n" + "cough " * s.max_seq_len
           + "\n</think>\n\nSee a doctor."}
    (run.data / "train.jsonl").write_text((json.dumps(row) + "\n") * (examples_per_step * args.steps))
    (run.data / "dev.jsonl").write_text("")  # no eval: the figures are for training steps
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_sft(cfg, run)
    rows = [r for r in read_metrics(run, "sft") if "step_time_s" in r and r["step"] > 1]
    step_time = sum(r["step_time_s"] for r in rows) / max(len(rows), 1)
    tokens = examples_per_step * s.max_seq_len
    print(f"model: {'random Qwen3-1.7B shape' if random_model else cfg.model.path}  "
          f"batch {s.per_device_train_batch_size} x accumulation {s.gradient_accumulation_steps} x "
          f"{s.max_seq_len} tokens, gradient checkpointing {cfg.model.gradient_checkpointing}, "
          f"LoRA r{cfg.model.lora.r}")
    print(f"step time: {step_time:.3f} s per optimizer step ({tokens / step_time:,.0f} tokens/s)")
    if torch.cuda.is_available():
        print(f"peak GPU memory: allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
              f"reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB ({torch.cuda.get_device_name()})")
    else:
        print(f"peak CPU RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
