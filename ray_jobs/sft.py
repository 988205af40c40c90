"""The SFT stage as a Ray job: the same code path as ``medrl sft`` on the node that runs the job's driver.

    ray job submit --address http://HEAD:8265 --entrypoint-num-gpus 1 --working-dir . \\
        --runtime-env ray_jobs/runtime_env.yaml -- \\
        python ray_jobs/sft.py --config configs/qwen3_1p7b_24gb.yaml run.root=/shared/runs [--resume auto] [KEY=VALUE]

``--entrypoint-num-gpus`` puts the driver on a GPU node (SFT trains in the driver's process, or under ``torchrun``
there with ``sft.num_processes`` > 1). Arguments are those of ``medrl sft``; paths absolute, on shared storage
(``medrl.ray_job``, docs/ray_jobs.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrl.ray_job import stage_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_job("sft", sys.argv[1:]))
