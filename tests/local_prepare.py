"""``run_prepare`` with configs/local_tiny.yaml and overrides, run from the repository (the config's sample paths are
relative to it), without building a model."""
from __future__ import annotations

import os
from pathlib import Path

from medrl.config import load_config
from medrl.prepare.stage import run_prepare
from medrl.runs import RunDir

REPO = Path(__file__).resolve().parents[1]


def prepare_local_tiny(root: Path, *overrides: str, sources=None, strict=False):
    """(config, run dir, prepare summary) of a prepare run under ``root`` (``run.root``)."""
    cfg = load_config(REPO / "configs" / "local_tiny.yaml",
                      [f"run.root={root}", f"model.path={root}/no-model", "model.build_tiny_if_missing=false",
                       *overrides])
    run = RunDir.from_config(cfg)
    old = os.getcwd()
    os.chdir(REPO)
    try:
        return cfg, run, run_prepare(cfg, run, sources=sources, strict=strict)
    finally:
        os.chdir(old)
