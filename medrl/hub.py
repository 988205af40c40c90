"""ModelScope, where models and data sets come from: the local cache directory, the endpoint, and whether it
answers (a download fails within seconds, naming the local alternative, instead of retrying for ~22 s). Used by
``medrl.models.loading`` (models) and ``medrl.data.sources`` (data set files)."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

MODELSCOPE_DEFAULT_ENDPOINT = "https://www.modelscope.cn"


def modelscope_cache_dir(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope")


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
