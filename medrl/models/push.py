"""``medrl push``: upload an adapter directory (``sft/adapter``, ``ppo/adapter``) or a merged model (``medrl merge``)
with its model card to the Hugging Face Hub. The token is read from an environment variable by name, never
logged; without network (or with ``HF_HUB_OFFLINE=1``) it fails with one line."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from medrl.errors import UsageError

log = logging.getLogger("medrl.models")

SKIPPED = ["checkpoints/*", "*.tmp", ".medrl-*"]
"""Files of an adapter directory that are never uploaded."""


def check_pushable(directory: Path) -> str:
    """``adapter`` or ``model``: what the directory holds; a directory without weights or card is refused."""
    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    kind = ("adapter" if (directory / "adapter_config.json").is_file()
            else "model" if (directory / "config.json").is_file() else None)
    if kind is None:
        raise UsageError(f"{directory} holds neither a LoRA adapter (adapter_config.json) nor a model (config.json)")
    if not (directory / "README.md").is_file():
        raise UsageError(f"{directory} has no README.md model card: push an adapter written by `medrl sft` / "
                         "`medrl ppo` or a model written by `medrl merge`")
    return kind


def push(directory: Path, repo_id: str, *, private: bool, token_env: str) -> str:
    """Create ``repo_id`` (if needed) and upload ``directory``; returns the commit URL."""
    import httpx2
    from huggingface_hub import HfApi

    kind = check_pushable(Path(directory))
    token = os.environ.get(token_env) or None
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                                   ignore_patterns=SKIPPED, commit_message=f"medrl: upload {kind} with its model card")
    except (OSError, httpx2.HTTPError) as exc:
        reason = " ".join(str(exc).split())[:300]
        if token:
            reason = reason.replace(token, "***")
        raise UsageError(f"push of {directory} to the Hugging Face Hub ({repo_id}) failed: {type(exc).__name__}: "
                         f"{reason}") from None
    log.info("pushed %s %s to %s", kind, directory, repo_id)
    return str(commit.commit_url)
