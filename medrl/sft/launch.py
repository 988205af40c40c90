"""Multi-process SFT: ``medrl sft`` relaunches itself under ``torchrun`` on this machine and waits.

Used when ``sft.num_processes`` > 1 or ``sft.deepspeed`` is set (DeepSpeed always runs under a launcher, a single
rank being a world of one). Rendezvous stays on 127.0.0.1; each rank runs ``python -m medrl.sft.trainer``, which
reloads the resolved config that the parent wrote and calls ``train_sft`` (this module never imports the trainer).

The same works by hand (e.g. on a multi-GPU box, or to pass launcher options):
    torchrun --nproc_per_node 2 -m medrl.cli sft -c configs/qwen3_1p7b_24gb.yaml \
        sft.deepspeed=configs/deepspeed/zero2.json
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

from medrl.config import Config, save_config
from medrl.models.loading import pick_device
from medrl.runs import RunDir

log = logging.getLogger("medrl.sft")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(cfg: Config, run: RunDir, *, resume: str | None = None) -> None:
    """Run ``train_sft`` in ``cfg.sft.num_processes`` local ranks (torchrun) and wait; raises if any rank fails."""
    config_file = save_config(cfg, run.sft / "launch_config.yaml")  # secrets redacted; SFT needs none
    n = cfg.sft.num_processes
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "medrl.sft.trainer", "--config", str(config_file)]
    if resume is not None:
        cmd += ["--resume", resume]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    if pick_device(cfg.model.device) == "cpu" and sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on loopback, like the rendezvous
    log.info("launching %d SFT process(es): %s", n, " ".join(cmd))
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"SFT workers exited with code {rc} (rank errors above and in {run.log_file})")
