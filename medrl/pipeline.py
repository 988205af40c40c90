"""``medrl pipeline``: prepare -> sft -> ppo -> eval -> report, skipping stages whose output already exists.

A stage that runs (missing output or ``--force``) makes every later stage run too, since their inputs changed."""
from __future__ import annotations

import importlib
import logging
import shutil
import time

from medrl.config import Config
from medrl.errors import UsageError
from medrl.runs import STAGES, RunDir

log = logging.getLogger("medrl.pipeline")

# stage -> (module, function, keyword arguments)
_ENTRY = {
    "prepare": ("medrl.prepare.stage", "run_prepare", {"sources": None, "strict": False}),
    "sft": ("medrl.sft.trainer", "run_sft", {"resume": "auto"}),
    "ppo": ("medrl.ppo.driver", "run_ppo", {"resume": "auto"}),
    "eval": ("medrl.evaluation.evaluate", "run_eval", {"models": None, "sets": None}),
}


def run_pipeline(cfg: Config, run: RunDir, force: list[str] = ()) -> dict[str, str]:
    force = set(force)
    unknown = force - set(STAGES) - {"all"}
    if unknown:
        raise UsageError(f"--force: unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}, all")
    outcome: dict[str, str] = {}
    upstream_ran = False  # once a stage runs, every later stage is stale and runs too
    for stage in STAGES:
        output = run.stage_output(stage)
        rerun = upstream_ran or stage in force or "all" in force
        if output.exists() and not rerun:
            log.info("[%s] skipped: %s exists (use --force %s to re-run)", stage, output, stage)
            outcome[stage] = "skipped"
            continue
        t0 = time.time()
        if rerun and stage in ("sft", "ppo"):
            shutil.rmtree(run.checkpoints(stage), ignore_errors=True)  # start over: resuming would reuse stale work
        upstream_ran = True
        log.info("[%s] running", stage)
        if stage == "report":
            from medrl.report.build import build_report

            build_report(run)
        else:
            module, fn, kwargs = _ENTRY[stage]
            getattr(importlib.import_module(module), fn)(cfg, run, **kwargs)
        outcome[stage] = f"done in {time.time() - t0:.1f}s"
        log.info("[%s] %s", stage, outcome[stage])
    log.info("pipeline finished: %s", ", ".join(f"{k} {v}" for k, v in outcome.items()))
    return outcome
