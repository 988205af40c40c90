"""The eval stage as a Ray job: the same code path as ``medrl eval``, its judge pool on the job's cluster.

    ray job submit --address http://HEAD:8265 --entrypoint-num-gpus 1 --working-dir . \\
        --runtime-env ray_jobs/runtime_env.yaml -- \\
        python ray_jobs/eval.py --config configs/qwen3_1p7b_24gb.yaml run.root=/shared/runs [--models sft,rl] [KEY=VALUE]

Generation runs in the driver's process (``--entrypoint-num-gpus`` gives it a GPU); the judge actors spread over
the cluster. Arguments are those of ``medrl eval``; paths absolute (``medrl.ray_job``, docs/ray_jobs.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrl.ray_job import stage_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_job("eval", sys.argv[1:]))
