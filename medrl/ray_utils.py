"""Starting and stopping Ray the same way for every stage."""
from __future__ import annotations

import gc
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


GC_YOUNG_THRESHOLD = 10_000
"""Allocations between young-generation collections in a medrl driver and in judge actors (Python's default: 700).
A judged item allocates a few hundred short-lived objects, freed by reference counting; at the default the collector
ran every few items, and its full collections walked the whole heap (torch's, Ray's, jieba's and opencc's objects):
about 0.2 ms of CPU per judged item in a judge actor (0.03 ms with this threshold and a frozen heap), and in the
driver a ~100 ms stall every few thousand rewards (``bench/scoring.py``'s cached pass: 10k instead of 22k items/s
when one fell into it)."""


def quiet_collector(freeze: bool = True) -> None:
    """Young-generation collections every ``GC_YOUNG_THRESHOLD`` allocations; with ``freeze``, what this process
    holds now (modules, tokenizers' and segmenters' tables: alive until it exits) is left out of every later
    collection (``gc.freeze``). Objects created later are collected as usual."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    if freeze:
        gc.freeze()


def init_ray(cfg: RayConfig, runtime_env: dict | None = None):
    """Connect to ``cfg.address`` or start a private local runtime (``address="local"`` never attaches to another
    cluster running on the same machine), watched by ``medrl.ray_reaper`` so that it never outlives this process
    (a driver killed by SIGKILL included). Returns whether this call started Ray (the caller then shuts it down).
    The driver's collector is quieted (``quiet_collector``) once Ray and the stage's imports are loaded."""
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
    quiet_collector()
    return True
