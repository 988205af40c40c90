"""Starting and stopping Ray the same way for every stage."""
from __future__ import annotations

import os
import subprocess
import sys

from medrl.config import RayConfig

# Keep Ray on loopback and quiet on a single machine (see ../shared/STACK.md).
_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}
QUIET_ACTOR_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
"""Actors do not print transformers' FutureWarnings and "Loading weights" bars once each (a user's own settings of
these variables win)."""


def init_ray(cfg: RayConfig, runtime_env: dict | None = None):
    """Connect to ``cfg.address`` or start a private local runtime (``address="local"`` never attaches to another
    cluster running on the same machine), watched by ``medrl.ray_reaper`` so that it never outlives this process
    (a driver killed by SIGKILL included). Returns whether this call started Ray (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    for k, v in _RAY_ENV.items():
        os.environ.setdefault(k, v)
    quiet = {k: os.environ.get(k, v) for k, v in QUIET_ACTOR_ENV.items()}
    runtime_env = {**(runtime_env or {})}
    runtime_env["env_vars"] = {**quiet, **runtime_env.get("env_vars", {})}
    if cfg.address:
        ray.init(address=cfg.address, runtime_env=runtime_env, log_to_driver=True)
    else:
        subprocess.Popen([sys.executable, "-m", "medrl.ray_reaper", str(os.getpid())], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
                 runtime_env=runtime_env, log_to_driver=True, _node_ip_address="127.0.0.1")
    return True
