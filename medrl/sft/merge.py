"""``medrl merge``: fold a LoRA adapter into the base weights and save a plain model directory (+ tokenizer) that
``AutoModelForCausalLM.from_pretrained`` loads without peft (for vLLM, export, or sharing)."""
from __future__ import annotations

import logging
from pathlib import Path

from medrl.config import Config
from medrl.errors import UsageError
from medrl.models.loading import load_policy, load_tokenizer
from medrl.runs import RunDir

log = logging.getLogger("medrl.sft")


def merge_adapter(cfg: Config, run: RunDir, *, adapter: Path | None, out: Path) -> Path:
    """Merge ``adapter`` (default: the run's RL adapter if it exists, else its SFT adapter) into ``cfg.model.path``
    in ``cfg.model.dtype`` on ``cfg.model.device`` and write the result to ``out``."""
    if adapter is None:
        adapter = run.ppo_adapter if run.ppo_adapter.exists() else run.sft_adapter
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(f"no LoRA adapter in {adapter} (no adapter_config.json): run `medrl sft` first or pass "
                         f"--adapter DIR")
    out = Path(out)
    if out.resolve() == adapter.resolve():
        raise UsageError(f"--out {out} is the adapter directory; choose a new directory")
    model = load_policy(cfg.model, adapter=adapter)
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    # the adapter directory carries the tokenizer it was trained with; fall back to the base model's
    if (adapter / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    else:
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.cache_dir)
    tokenizer.save_pretrained(out)
    card = adapter / "README.md"
    if card.is_file():  # the adapter's model card, now describing a full model
        (out / "README.md").write_text(card.read_text(encoding="utf-8").replace(
            "library_name: peft", "library_name: transformers", 1), encoding="utf-8")
    log.info("merged %s into %s -> %s", adapter, cfg.model.path, out)
    return out
