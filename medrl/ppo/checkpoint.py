"""PPO checkpoint directories: written atomically (``step_N.tmp`` then rename), the newest K kept, partial ones
skipped on resume. A checkpoint is complete when its final name exists and ``trainer_state.json`` is inside it
(written last, before the rename).

    ppo/checkpoints/step_000004/
      adapter/                 LoRA (peft format)      value_head.pt       (gae only)
      optimizer.pt | deepspeed/  scheduler.pt           rng_rank{r}.pt      (one per learner rank)
      behaviour_weights.pt     (async_rollout: the weights the next step samples with)
      trainer_state.json       step, data position, KL controller, adapter version, config digest
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from medrl.errors import UsageError

log = logging.getLogger("medrl.ppo")

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d{6,})$")


def tmp_dir(root: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (a leftover from a crash is removed)."""
    path = root / f"step_{step:06d}.tmp"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def commit(tmp: Path, state: dict, keep_last: int) -> Path:
    """Write the trainer state into ``tmp``, rename it to its final name, and prune old checkpoints."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(final.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_resume(root: Path, resume: str | None) -> Path | None:
    """``None``: start fresh (refused when ``root`` holds complete checkpoints of an earlier run); ``auto``: the
    newest complete checkpoint (None when there is none); else a path to a complete checkpoint directory."""
    if resume is None:
        if complete_checkpoints(root):
            raise UsageError(f"{root} holds checkpoints of an earlier run: continue it with --resume auto, or remove "
                             f"them / choose another run.name")
        return None
    if resume == "auto":
        partial = [p.name for p in root.iterdir() if p.is_dir() and p not in complete_checkpoints(root)] \
            if root.is_dir() else []
        if partial:
            log.warning("skipping incomplete checkpoint(s) in %s: %s", root, ", ".join(sorted(partial)))
        done = complete_checkpoints(root)
        if not done:
            log.info("no PPO checkpoint to resume from: starting at step 0")
        return done[-1] if done else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"--resume {resume}: not a complete PPO checkpoint (no {STATE_FILE})")
    return path


def read_state(path: Path, learner_ranks: int, config_digest: str) -> dict:
    """The trainer state of a checkpoint; refused when written with another number of learner ranks (each saved
    its own optimizer partition and RNG), a warning when under another config."""
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    if state["learner_ranks"] != learner_ranks:
        raise UsageError(f"{path}: saved with {state['learner_ranks']} learner rank(s), config has "
                         f"{learner_ranks} (ppo.learner.ranks)")
    if state["config_digest"] != config_digest:
        log.warning("resuming %s written under a different config (digest %s, now %s)", path,
                    state["config_digest"], config_digest)
    return state


def install_final(tmp: Path, dest: Path) -> Path:
    """Move the adapter a learner saved into ``tmp`` (``adapter/`` + ``value_head.pt``) to ``dest`` as one
    directory, replacing an older one; ``tmp`` is removed."""
    if (tmp / "value_head.pt").is_file():
        (tmp / "value_head.pt").rename(tmp / "adapter" / "value_head.pt")
    if dest.exists():
        shutil.rmtree(dest)
    (tmp / "adapter").rename(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest
