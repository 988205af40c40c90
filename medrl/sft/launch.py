"""Multi-process SFT: ``medrl sft`` relaunches itself under ``torchrun`` on this machine and waits.

Used when ``sft.num_processes`` > 1 or ``sft.deepspeed`` is set (DeepSpeed always runs under a launcher, a single
rank being a world of one). Rendezvous stays on 127.0.0.1; each rank runs ``python -m medrl.sft.launch``, which
reloads the resolved config that the parent wrote and calls ``train_sft``.

The same works by hand (e.g. on a multi-GPU box, or to pass launcher options):
    torchrun --nproc_per_node 2 -m medrl.cli sft -c configs/qwen3_1p7b_24gb.yaml \
        sft.deepspeed=configs/deepspeed/zero2.json
"""
from __future__ import annotations

import argparse
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
           "-m", "medrl.sft.launch", "--config", str(config_file)]
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


def main(argv: list[str] | None = None) -> int:
    """One rank: ``python -m medrl.sft.launch --config runs/<name>/sft/launch_config.yaml [--resume auto]``."""
    from medrl.config import load_config
    from medrl.errors import UsageError
    from medrl.runs import setup_logging
    from medrl.sft.trainer import train_sft

    parser = argparse.ArgumentParser(prog="medrl.sft.launch")
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config)
        run = RunDir.from_config(cfg)
        setup_logging(run if rank == 0 else None, level=logging.INFO if rank == 0 else logging.WARNING)
        train_sft(cfg, run, resume=args.resume)
    except UsageError as exc:
        print(f"medrl: error (rank {rank}): {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
