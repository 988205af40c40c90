"""Score a JSONL file on a Ray cluster: the same scoring as ``medrl judge``, submitted as a Ray job.

    ray job submit --working-dir . -- python ray_jobs/score.py --config configs/qwen3_1p7b_24gb.yaml \\
        --input /abs/path/samples.jsonl --out /abs/path/scored.jsonl [--address auto] [KEY=VALUE ...]

The job connects with ``ray.init(address="auto")`` (or ``--address``). Its working directory is a copy of the
upload, so give absolute paths for --input, --out, ``run.root`` and ``reward.cache.path``. The API key and, with
``reward.cache.backend=postgres``, the database URL are read from the head node's environment (the driver's:
``reward.judge.api_key_env``, ``reward.cache.url_env``) and handed to the actors as secrets; never pass them in the
job's runtime_env (docs/cluster.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrl.config import load_config, secret_env_names  # noqa: E402
from medrl.errors import UsageError  # noqa: E402
from medrl.reward.judge_cli import run_judge  # noqa: E402
from medrl.runs import RunDir, setup_logging  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="score a JSONL file with rule rewards and the teacher judge (Ray job)")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto, the job's cluster)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.ray.address = args.address
        run = RunDir.from_config(cfg).ensure()  # run_judge records the config it scores with
        setup_logging(run, secret_envs=secret_env_names(cfg))
        summary = run_judge(cfg, run, input_path=args.input, out_path=args.out, limit=args.limit, dry_run=False)
    except UsageError as exc:
        print(f"score.py: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
