"""The PPO stage as a Ray job: the same code path as ``medrl ppo``, joined to the job's cluster.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env ray_jobs/runtime_env.yaml -- \\
        python ray_jobs/ppo.py --config configs/qwen3_1p7b_24gb.yaml run.root=/shared/runs [--resume auto] [KEY=VALUE]

Arguments are those of ``medrl ppo``. Give ``run.root`` (and model / adapter / cache paths) as absolute paths on
storage the nodes share. The judge's API key is read from the nodes' environment by name
(``reward.judge.api_key_env``); a job whose runtime_env carries it is refused (``medrl.ray_job``, docs/ray_jobs.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrl.ray_job import stage_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_job("ppo", sys.argv[1:]))
