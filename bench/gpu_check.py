"""The GPU check: medrl's pure core (no Ray, no vLLM, no trl) on a Qwen3-1.7B-shaped model with random bf16 weights.

One table: HF ``generate`` tokens/s for 128 x 1,024 tokens (the baseline the vLLM engine replaces); one learner step
(policy + value head, LoRA, gradient checkpointing, the config's micro-batch and lengths) of each GPU config with its
peak memory against ``medrl estimate-memory``, the process capped with ``torch.cuda.set_per_process_memory_fraction``
at the card (16 / 24 GiB) minus what the vLLM engine holds meanwhile; the bf16 gap between the log-probs HF
``generate`` reports and the learner's recompute; an SFT step's peak memory likewise. Target: every config fits its
card, estimate within 15 % of the measured peak.

The device machine has torch / transformers / peft / tokenizers but not pydantic, so the numbers taken from the
configs travel in ``bench/gpu_plan.json``, written here by ``--write-plan`` (``bench/gpu_check.sh`` refreshes it
wherever medrl's config loads). ``--small`` runs the same code on CPU-sized shapes (a check of the script itself).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medrl.ppo.memory import GiB, QWEN3_1P7B, ModelShape, estimate  # noqa: E402

PLAN = ROOT / "bench" / "gpu_plan.json"
CONFIGS = {"16gb": (16, ROOT / "configs" / "qwen3_1p7b_16gb.yaml"), "24gb": (24, ROOT / "configs" / "qwen3_1p7b_24gb.yaml")}
SMALL = ModelShape(hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=4096, tied=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def write_plan() -> dict:
    """Config numbers + estimates for each GPU config (needs medrl's config loader: pydantic)."""
    from medrl.config import load_config
    from medrl.ppo.memory import settings_from_config

    plan = {}
    for name, (card, path) in CONFIGS.items():
        cfg = load_config(path)
        s = replace(settings_from_config(cfg), value_head=True)  # the check trains policy + value head
        sft = cfg.sft
        plan[name] = {"card_gib": card, "config_digest": digest(path), "settings": asdict(s),
                      "lora": cfg.model.lora.model_dump(), "sft": {"batch": sft.per_device_train_batch_size,
                                                                   "seq_len": sft.max_seq_len}}
    PLAN.write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")
    return plan


def learner_settings(s: dict):
    from medrl.ppo.memory import MemorySettings

    return MemorySettings(**{**s, "lora_targets": tuple(s["lora_targets"])})


def learner_estimate(shape: ModelShape, settings: dict) -> tuple[dict, int]:
    """(estimate parts, bytes the rollout engine holds while the learner steps: asleep if it sleeps)."""
    parts = estimate(shape, learner_settings(settings))
    return parts, parts.get("rollouts_asleep", parts.get("rollouts", 0))


def build_model(shape: ModelShape, device: str, dtype):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                         intermediate_size=shape.intermediate, tie_word_embeddings=shape.tied,
                         max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = None  # random weights: sample the full length
    return model.eval()


def with_lora(model, lora: dict, checkpointing: bool):
    from peft import LoraConfig, TaskType, get_peft_model

    policy = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora["r"], lora_alpha=lora["alpha"],
                                              lora_dropout=0.0, target_modules=list(lora["target_modules"])))
    if checkpointing:
        policy.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    return policy


def peak(fn, device: str) -> tuple[float, float, float]:
    """(seconds, peak allocated GiB, peak reserved GiB) of ``fn()``."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB
    return time.perf_counter() - t0, float("nan"), float("nan")


def learner_step(policy, s: dict, device: str) -> None:
    import torch

    from medrl.ppo.objective import policy_loss, value_loss
    from medrl.ppo.modeling import PolicyWithValue, make_value_head

    model = PolicyWithValue(policy, make_value_head(policy)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    b, P, R = s["micro_batch"], s["prompt_tokens"], s["response_tokens"]
    vocab = policy.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (b, P + R), device=device)
    mask = torch.ones(b, R, device=device)
    out = model(ids, torch.ones_like(ids), torch.full((b,), P, device=device), ids[:, P:], temperature=1.0,
                with_values=True, with_entropy=s["entropy"])
    loss, _ = policy_loss(out["logprobs"], out["logprobs"].detach(), mask, mask, 0.2, mask)
    vloss, _ = value_loss(out["values"], out["values"].detach(), mask, mask, 0.2)
    (loss + 0.1 * vloss).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sft_step(policy, batch: int, seq_len: int, device: str) -> None:
    import torch

    policy.train()
    vocab = policy.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), device=device)
    policy(input_ids=ids, labels=ids).loss.backward()
    policy.zero_grad(set_to_none=True)


def generate_and_gap(model, device: str, prompts: int, samples: int, tokens: int) -> tuple[float, int, float, float]:
    """HF ``generate`` of prompts x samples x tokens: (seconds, tokens, max and mean abs gap between the log-probs
    the sampler keeps, ``SampledLogprobs`` as the HF rollout engine does, and ``PolicyWithValue``'s recompute of the
    same tokens)."""
    import torch
    from transformers import LogitsProcessorList

    from medrl.models.generation import SampledLogprobs
    from medrl.ppo.modeling import PolicyWithValue

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (prompts, 32), device=device)
    sampler = SampledLogprobs(1.0)
    t0 = time.perf_counter()
    with torch.no_grad():
        seqs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                              top_k=None, max_new_tokens=tokens, min_new_tokens=tokens, num_return_sequences=samples,
                              logits_processor=LogitsProcessorList([sampler]), pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    resp = seqs[:, ids.shape[1]:]
    reported = torch.tensor(sampler.finish(seqs), device=device)
    rows = slice(0, min(16, seqs.shape[0]))  # recompute a slice (memory: [rows, tokens, vocab] fp32 logits)

    class _Peft(torch.nn.Module):  # PolicyWithValue reads policy.get_base_model()
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def get_base_model(self):
            return self.lm

    with torch.no_grad():
        lp = PolicyWithValue(_Peft(model))(seqs[rows], torch.ones_like(seqs[rows]),
                                           torch.full((seqs[rows].shape[0],), ids.shape[1], device=device),
                                           resp[rows], temperature=1.0, with_values=False)["logprobs"]
    diff = (lp.float() - reported[rows]).abs()
    return seconds, resp.numel(), float(diff.max()), float(diff.mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-plan", action="store_true", help="write bench/gpu_plan.json from the configs")
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes (checks the script, not a card)")
    args = parser.parse_args()
    if args.write_plan:
        write_plan()
        print(f"wrote {PLAN}")
        return 0
    import torch

    plan = json.loads(PLAN.read_text(encoding="utf-8"))
    for name, (_, path) in CONFIGS.items():
        if path.is_file() and digest(path) != plan[name]["config_digest"]:
            print(f"warning: {path.name} changed since {PLAN.name} was written (run --write-plan)")
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    dtype = torch.bfloat16
    shape = SMALL if args.small else QWEN3_1P7B
    scale = (lambda n: max(8, n // 16)) if args.small else (lambda n: n)
    rows = []
    t0 = time.perf_counter()
    model = build_model(shape, device, dtype)
    rows.append(("build random Qwen3 (bf16)" if not args.small else "build small Qwen3 (bf16)",
                 f"{time.perf_counter() - t0:.1f} s", ""))
    g_s, n_tok, gap_max, gap_mean = generate_and_gap(model, device, scale(16), 8, scale(1024))
    rows.append((f"HF generate {scale(16) * 8} x {scale(1024)} tokens", f"{n_tok / g_s:,.0f} tokens/s",
                 f"{g_s:.1f} s"))
    rows.append(("bf16 log-prob gap, generate vs learner", f"max {gap_max:.3f}", f"mean {gap_mean:.4f}"))
    total = torch.cuda.get_device_properties(0).total_memory / GiB if device == "cuda" else None
    for name, entry in plan.items():
        s = dict(entry["settings"])
        if args.small:
            s.update(micro_batch=1, prompt_tokens=scale(s["prompt_tokens"]), response_tokens=scale(s["response_tokens"]))
        parts, engine = learner_estimate(shape, s)
        cap = entry["card_gib"] - engine / GiB
        if total is not None:
            torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0))
        policy = with_lora(model, entry["lora"], s["gradient_checkpointing"])
        est = (parts["learner_peak"] - parts["cuda_context"]) / GiB
        try:
            sec, alloc, reserved = peak(lambda: learner_step(policy, s, device), device)
            verdict = f"{reserved:.2f} GiB reserved / est {est:.2f} ({(est / reserved - 1) * 100:+.0f} %)" \
                if reserved == reserved else f"est {est:.2f} GiB (no CUDA: not measured)"
        except torch.OutOfMemoryError:
            sec, verdict = float("nan"), f"OUT OF MEMORY under the {cap:.1f} GiB cap (est {est:.2f})"
        rows.append((f"learner step {name}: mb {s['micro_batch']} x {s['prompt_tokens']}+{s['response_tokens']}",
                     verdict, f"cap {cap:.1f} GiB, {sec:.1f} s"))
        sb, sl = (1, scale(entry["sft"]["seq_len"])) if args.small else (entry["sft"]["batch"], entry["sft"]["seq_len"])
        sft_parts = estimate(shape, replace(learner_settings(s), micro_batch=sb, prompt_tokens=0, response_tokens=sl,
                                            value_head=False, entropy=False, behaviour_snapshots=False))
        sft_est = (sft_parts["learner_peak"] - sft_parts["cuda_context"]) / GiB
        if total is not None:
            torch.cuda.set_per_process_memory_fraction(min(entry["card_gib"] / total, 1.0))  # SFT has the card
        try:
            sec, alloc, reserved = peak(lambda: sft_step(policy, sb, sl, device), device)
            verdict = f"{reserved:.2f} GiB reserved / est {sft_est:.2f}" if reserved == reserved else \
                f"est {sft_est:.2f} GiB (no CUDA: not measured)"
        except torch.OutOfMemoryError:
            sec, verdict = float("nan"), f"OUT OF MEMORY under {entry['card_gib']} GiB (est {sft_est:.2f})"
        rows.append((f"SFT step {name}: {sb} x {sl} tokens", verdict, f"{sec:.1f} s"))
        model = policy.unload()  # the base again, for the next config
        model.eval()
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (--small: shapes scaled down, memory not measured)"
    print(f"\nmedrl GPU check on {where}; torch {torch.__version__}")
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:<44} {r[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
