"""Resolve, download and load models. Training never touches a hub: hub ids must already be in the local cache."""
from __future__ import annotations

import logging
from pathlib import Path

from medrl.data.clean import estimate_tokens_by_bytes
from medrl.errors import UsageError
from medrl.hub import hub_reachable, modelscope_cache_dir, modelscope_endpoint

log = logging.getLogger("medrl.models")

def _cached_snapshot(model_id: str, cache_dir: str | None) -> Path | None:
    root = modelscope_cache_dir(cache_dir)
    for candidate in (root / "models" / model_id, root / model_id, root / "hub" / model_id,
                      root / "models" / model_id.replace(".", "___"), root / model_id.replace(".", "___")):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def resolve_model_path(path: str, cache_dir: str | None = None) -> Path:
    """A local directory as is; a hub id (``Qwen/Qwen3-1.7B``) only if it was downloaded before."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UsageError(f"model directory {p} has no config.json")
        return p
    cached = _cached_snapshot(path, cache_dir)
    if cached is not None:
        return cached
    raise UsageError(
        f"model '{path}' is neither a local directory nor in the ModelScope cache ({modelscope_cache_dir(cache_dir)}); "
        f"run `medrl download-model {path}` or set model.path to a local model directory"
    )


def download_model(model_id: str, cache_dir: str | None = None, revision: str | None = None) -> Path:
    """Fetch a model snapshot through ModelScope into ``cache_dir`` (default ``$MODELSCOPE_CACHE``).

    Fails within seconds, naming the local-directory alternative, when the hub cannot be reached (instead of
    ModelScope's own ~22 s retry loop)."""
    cached = _cached_snapshot(model_id, cache_dir)
    if cached is not None:
        log.info("model %s already in cache: %s", model_id, cached)
        return cached
    endpoint = modelscope_endpoint()
    if not hub_reachable(endpoint):
        raise UsageError(
            f"cannot reach the model hub at {endpoint} to download '{model_id}'; copy the model directory onto this "
            f"machine and set model.path to it (e.g. `medrl ppo model.path=/models/Qwen3-1.7B`)"
        )
    from modelscope import snapshot_download

    target = modelscope_cache_dir(cache_dir)
    target.mkdir(parents=True, exist_ok=True)
    return Path(snapshot_download(model_id, cache_dir=str(target), revision=revision))


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str = "auto", device: str = "cpu"):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(path: str, cache_dir: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_model_path(path, cache_dir)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "auto", device: str = "auto", cache_dir: str | None = None):
    """Load a causal LM from a local/cached directory onto ``device`` with the configured dtype."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        str(resolve_model_path(path, cache_dir)), dtype=pick_dtype(dtype, dev)
    )
    return model.to(dev)


def lora_config(settings, inference_mode: bool = False):
    """peft ``LoraConfig`` for a causal LM from ``cfg.model.lora``."""
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=settings.r, lora_alpha=settings.alpha,
                      lora_dropout=settings.dropout, target_modules=list(settings.target_modules),
                      inference_mode=inference_mode)


def load_policy(model_cfg, adapter: str | Path | None = None, trainable: bool = False, device: str | None = None):
    """Base model + LoRA adapter as a ``PeftModel``: ``adapter`` loaded from a directory, or a fresh adapter from
    ``model_cfg.lora`` when ``trainable`` and none is given. With no adapter and not trainable: the plain base model.
    The reference policy of RL is this same model under ``with model.disable_adapter():``."""
    from peft import PeftModel, get_peft_model

    base = load_causal_lm(model_cfg.path, dtype=model_cfg.dtype, device=device or model_cfg.device,
                          cache_dir=model_cfg.cache_dir)
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise UsageError(f"adapter directory {adapter} has no adapter_config.json")
        return PeftModel.from_pretrained(base, str(adapter), is_trainable=trainable)
    if trainable:
        return get_peft_model(base, lora_config(model_cfg.lora))
    return base


class TokenCounter:
    """Token counts with the tokenizer of ``model.path`` (``medrl prepare`` counts every record's); if it cannot be
    loaded, a documented estimate (``medrl.data.clean.estimate_tokens_by_bytes``)."""

    def __init__(self, model_path: str | None, cache_dir: str | None = None):
        self._encode = None
        if model_path:
            try:
                resolve_model_path(model_path, cache_dir)  # fails fast, before importing transformers
                tok = load_tokenizer(model_path, cache_dir)
                backend = getattr(tok, "backend_tokenizer", None)
                if backend is not None:  # the Rust tokenizer directly; encode_batch_fast skips character offsets
                    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
                    self._encode = lambda texts: [len(e.ids) for e in encode(texts, add_special_tokens=False)]
                else:
                    self._encode = lambda texts: [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
                self.method = f"tokenizer of {model_path}"
            except Exception as exc:  # any loading failure (missing dir, bad files): fall back, but say so
                self.method = (f"estimate (non-ASCII chars / 1.5 + ASCII chars / 4): tokenizer of {model_path} "
                               f"could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
        else:
            self.method = "estimate (non-ASCII chars / 1.5 + ASCII chars / 4)"
        if self._encode is None:
            log.warning("token counts: %s", self.method)

    @property
    def exact(self) -> bool:
        return self._encode is not None

    def count(self, texts: list[str]) -> list[int]:
        if self._encode is not None:
            return self._encode(texts)
        return [estimate_tokens_by_bytes(t) for t in texts]
