"""Tiny-model kit: a seeded, randomly initialised Qwen3 with a byte-level BPE tokenizer trained on our own text.

The result is an ordinary model directory (``save_pretrained``) that ``AutoModelForCausalLM`` / ``AutoTokenizer``
reload offline; everything downstream treats it exactly like Qwen/Qwen3-1.7B.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # added tokens, not "special": decoding keeps them (as in Qwen3)


TINY_CARD = """---
license: apache-2.0
library_name: transformers
tags: [medrl, tiny, random-weights, test-only]
---
# Tiny random Qwen3 (medrl test model)

Randomly initialised weights ({spec}) and a BPE tokenizer trained on medrl's own text: it knows nothing. Built by
`medrl tiny-model` for tests and CPU plumbing runs; figures from it measure the pipeline, never medicine.
"""
"""README.md of a tiny model directory: its license (the medrl project's) for the cards of adapters trained on it,
and what it is."""


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 2000
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    head_dim: int = 64  # vLLM's CPU attention kernels reject head_dim 16 (hidden/heads); 64 is accepted
    max_position_embeddings: int = 4096
    seed: int = 0


def chat_template() -> str:
    return resources.files("medrl.models").joinpath("chat_template.jinja").read_text(encoding="utf-8")


def corpus_lines(extra_files: list[Path] = ()) -> list[str]:
    text = resources.files("medrl.assets").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for f in extra_files:
        lines.extend(ln for ln in Path(f).read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip())
    return lines


def build_tokenizer(vocab_size: int = 2000, extra_files: list[Path] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(list(extra_files)), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.add_tokens(THINK_TOKENS)
    fast.chat_template = chat_template()
    return fast


def build_tiny_model(out_dir: str | Path, spec: TinySpec = TinySpec(), extra_corpus: list[Path] = ()) -> Path:
    """Build, save and return ``out_dir`` holding a tiny Qwen3ForCausalLM + tokenizer + generation config."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size, extra_corpus)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
    )
    torch.manual_seed(spec.seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=True, temperature=0.7, top_p=0.95
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(TINY_CARD.format(spec=spec), encoding="utf-8")
    return out
