"""The PPO stage as a Ray job: the same code path as ``medrl ppo``, joined to the job's cluster.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env ray_jobs/runtime_env.yaml -- \\
        python ray_jobs/ppo.py --config configs/qwen3_1p7b_24gb.yaml run.root=/shared/runs [--resume auto] [KEY=VALUE]

Arguments are those of ``medrl ppo``; ``ray.address=auto`` is added unless an override sets ``ray.address``, so the
driver joins the cluster that runs the job (``ray.init(address="auto")``). The job runs in a copy of the uploaded
working directory: give ``run.root`` (and model / adapter / cache paths) as absolute paths on storage the nodes
share, or the outputs vanish with the copy. The judge's API key is read from the nodes' environment by name
(``reward.judge.api_key_env``); a job whose runtime_env carries it is refused, since the cluster stores and shows
every job's runtime_env. See docs/ray_jobs.md.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrl.cli import build_parser, main, secret_env_names  # noqa: E402
from medrl.config import load_config  # noqa: E402
from medrl.errors import UsageError  # noqa: E402

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for the entrypoint: the job's runtime_env and metadata as JSON."""


def secrets_in_job(cfg) -> list[str]:
    """Names of secret environment variables (API keys) that the submitted runtime_env carries."""
    job = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}")
    env_vars = (job.get("runtime_env") or {}).get("env_vars") or {}
    return sorted(set(env_vars) & set(secret_env_names(cfg)))


def job_main(argv: list[str]) -> int:
    args = build_parser().parse_args(["ppo", *argv])
    if not any(o.split("=", 1)[0].strip() == "ray.address" for o in args.overrides):
        argv = [*argv, "ray.address=auto"]
    try:
        cfg = load_config(args.config, args.overrides)
    except UsageError:
        cfg = None  # medrl's own error path below reports it
    if cfg is not None:
        leaked = secrets_in_job(cfg)
        if leaked:
            print(f"ray_jobs/ppo.py: error: the job's runtime_env sets {', '.join(leaked)}: the cluster stores and "
                  "shows it; rotate the key and set it in the nodes' environment instead", file=sys.stderr)
            return 2
        if not Path(cfg.run.root).is_absolute():
            print(f"ray_jobs/ppo.py: warning: run.root={cfg.run.root} is relative: outputs go into the job's copy "
                  "of the working directory", file=sys.stderr)
    return main(["ppo", *argv])


if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1:]))
