"""The whole pipeline as one Ray job: ``medrl pipeline`` (prepare -> sft -> ppo -> eval -> report, skipping stages
whose output exists) with PPO's actors and the judge pool on the job's cluster.

    ray job submit --address http://HEAD:8265 --entrypoint-num-gpus 1 --working-dir . \\
        --runtime-env ray_jobs/runtime_env.yaml -- \\
        python ray_jobs/pipeline.py --config configs/qwen3_1p7b_24gb.yaml run.root=/shared/runs [--force STAGE]

Arguments are those of ``medrl pipeline``; paths absolute, on storage the nodes share (``medrl.ray_job``,
docs/ray_jobs.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrl.ray_job import stage_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_job("pipeline", sys.argv[1:]))
