"""Resolve, download and load models. Training never touches a hub: hub ids must already be in the local cache."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from medrl.errors import UsageError

log = logging.getLogger("medrl.models")

MODELSCOPE_DEFAULT_ENDPOINT = "https://www.modelscope.cn"


def modelscope_cache_dir(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope")


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


def modelscope_endpoint() -> str:
    """``$MODELSCOPE_DOMAIN`` (with a scheme) or the public ModelScope endpoint."""
    endpoint = os.environ.get("MODELSCOPE_DOMAIN", MODELSCOPE_DEFAULT_ENDPOINT)
    return endpoint if endpoint.startswith("http") else "https://" + endpoint


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


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
