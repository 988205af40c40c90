"""The whole pipeline as one Ray job: ``medrl pipeline`` (prepare -> sft -> ppo -> eval -> report, skipping stages
whose output exists) with PPO's actors and the judge pool on the job's cluster.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env ray_jobs/runtime_env.yaml -- \\
        python ray_jobs/pipeline.py --config configs/qwen3_1p7b_2x24gb.yaml run.root=/shared/runs [--force STAGE]

No ``--entrypoint-num-gpus``: a GPU the driver reserves stays reserved through PPO, whose actors need their own.
Submit it to a cluster whose head has the GPUs (one machine); otherwise submit the stages as separate jobs
(docs/ray_jobs.md). Arguments are those of ``medrl pipeline``; paths absolute, on storage the nodes share.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrl.ray_job import stage_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_job("pipeline", sys.argv[1:]))
