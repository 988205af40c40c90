"""The entry point of medrl's Ray jobs (``ray_jobs/<stage>.py``): a ``medrl`` command run by the job's driver and
joined to the job's cluster. No Ray import here: the command itself joins (``ray.init(address="auto")``).

Arguments are those of ``medrl <command>``; ``ray.address=auto`` is added unless an override sets ``ray.address``.
The job runs in a copy of the uploaded working directory, so a relative ``run.root`` is warned about (its outputs
vanish with the copy), and a job whose runtime_env carries a secret (the judge's API key, the judge store's URL) is
refused before any work: the cluster stores and shows every job's runtime_env. See docs/ray_jobs.md.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from medrl.cli import main
from medrl.cli_args import build_parser
from medrl.config import load_config, secret_env_names
from medrl.errors import UsageError

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for the entrypoint: the job's runtime_env and metadata as JSON."""


TRACKER_SECRETS = ("WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
"""Credentials of the ``run.report_to`` trackers, read by their libraries from the environment."""


def secrets_in_job(cfg) -> list[str]:
    """Names of secret environment variables (API keys, tracker credentials) that the submitted runtime_env
    carries."""
    job = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}")
    env_vars = (job.get("runtime_env") or {}).get("env_vars") or {}
    return sorted(set(env_vars) & {*secret_env_names(cfg), *TRACKER_SECRETS})


def stage_job(command: str, argv: list[str]) -> int:
    """Run ``medrl <command> argv`` as the job's driver; 2 (and one line on stderr) for a refused job."""
    script = f"ray_jobs/{command}.py"
    args = build_parser().parse_args([command, *argv])
    if not any(o.split("=", 1)[0].strip() == "ray.address" for o in args.overrides):
        argv = [*argv, "ray.address=auto"]
    try:
        cfg = load_config(args.config, args.overrides)
    except UsageError:
        cfg = None  # medrl's own error path below reports it
    if cfg is not None:
        leaked = secrets_in_job(cfg)
        if leaked:
            print(f"{script}: error: the job's runtime_env sets {', '.join(leaked)}: the cluster stores and shows "
                  "it; rotate the key and set it in the nodes' environment instead", file=sys.stderr)
            return 2
        if not Path(cfg.run.root).is_absolute():
            print(f"{script}: warning: run.root={cfg.run.root} is relative: outputs go into the job's copy of the "
                  "working directory", file=sys.stderr)
    return main([command, *argv])
