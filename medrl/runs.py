"""The run directory: the one place in code that owns output paths, logs and metrics.

    runs/<name>/
      config.<stage>.yaml  the resolved config (secrets redacted) each stage that trains or evaluates ran with
                           (prepare, sft, ppo, eval, judge); commands that only read never write here
      config.yaml          a copy of the newest of them (the run's current config, read by ``demo`` and ``report``)
      logs/medrl.log       full log, tracebacks of unexpected errors included
      metrics.jsonl        one JSON object per logged step: {"stage", "step", "time", ...metrics}
      tb/<stage>/          TensorBoard events (run.report_to: tensorboard)
      trackers.json        W&B / MLflow run ids, so every stage logs into the same run (run.report_to: wandb, mlflow)
      wandb/, mlflow.db, mlartifacts/   W&B's local files (unless $WANDB_DIR), MLflow's default local store
      data/                prepared data (train/dev/test/gold/redteam/rl_prompts .jsonl, rejects.jsonl, DATA_CARD.md)
      sft/                 SFT adapter + tokenizer; sft/checkpoints/
      ppo/                 RL adapter (+ value head); ppo/checkpoints/
      reward/              teacher_judgements.jsonl (judgements used by this run, from the shared judge cache)
      eval/                generations and scores (.jsonl), eval summary
      report/              report.html, report.md, plots
      review/              clinician review package (items.jsonl, review.csv/.xlsx/.html), labels.jsonl
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medrl.config import Config, save_config
from medrl.errors import UsageError
from medrl.jsonl import read_jsonl
from medrl.trackers import TABLE_MAX_ROWS, open_sinks

STAGES = ("prepare", "sft", "ppo", "eval", "report")
RECORDED_STAGES = ("prepare", "sft", "ppo", "eval", "judge")
"""Stages that record the config they ran with; the first four build on each other, in this order."""
MATTERING_KEYS = ("model.path", "model.system_prompt", "model.lora", "data")
"""Config keys (and sections) whose change between stages makes a later stage build on mismatched work."""

log = logging.getLogger("medrl.runs")


@dataclass(frozen=True)
class RunDir:
    root: Path
    report_to: tuple[str, ...] = ("tensorboard",)
    """Trackers the stages' ``MetricsLogger`` writes to besides metrics.jsonl (``run.report_to``)."""

    @classmethod
    def from_config(cls, cfg: Config) -> "RunDir":
        return cls(Path(cfg.run.root) / cfg.run.name, tuple(cfg.run.report_to))

    # ---- paths (directories are created on demand by ``ensure``)
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def log_file(self) -> Path:
        return self.logs / "medrl.log"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def tb_dir(self, stage: str) -> Path:
        return self.root / "tb" / stage

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def sft(self) -> Path:
        return self.root / "sft"

    @property
    def ppo(self) -> Path:
        return self.root / "ppo"

    @property
    def reward(self) -> Path:
        return self.root / "reward"

    @property
    def teacher_judgements(self) -> Path:
        """Judgements of the teacher used by this run, exported from the shared cache by ``medrl judge``."""
        return self.reward / "teacher_judgements.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def review(self) -> Path:
        """The clinician review package (``medrl review export``) and the imported labels."""
        return self.root / "review"

    # ---- the main output of each stage; ``medrl pipeline`` skips a stage whose output exists
    @property
    def data_card(self) -> Path:
        return self.data / "DATA_CARD.md"

    @property
    def sft_adapter(self) -> Path:
        return self.sft / "adapter"

    @property
    def ppo_adapter(self) -> Path:
        return self.ppo / "adapter"

    @property
    def ppo_samples(self) -> Path:
        """Every scored PPO rollout sample (step, prompt id, response, reward, components), one JSON per line."""
        return self.ppo / "samples.jsonl"

    @property
    def eval_summary(self) -> Path:
        return self.eval / "summary.json"

    @property
    def report_html(self) -> Path:
        return self.report / "report.html"

    def stage_output(self, stage: str) -> Path:
        return {"prepare": self.data_card, "sft": self.sft_adapter, "ppo": self.ppo_adapter,
                "eval": self.eval_summary, "report": self.report_html}[stage]

    def checkpoints(self, stage: str) -> Path:
        return self.root / stage / "checkpoints"

    def ensure(self) -> "RunDir":
        """Create the run directory and its logs folder; one line naming the path (run.root) when that fails."""
        try:
            for d in (self.root, self.logs):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            blocking = next((p for p in self.root.parents if p.exists() and not p.is_dir()), None)
            why = f"{blocking} is a file, not a directory" if blocking else (exc.strerror or str(exc))
            raise UsageError(f"cannot create the run directory {self.root} (run.root / run.name): {why}") from None
        return self

    def stage_config_path(self, stage: str) -> Path:
        """The config ``stage`` last ran with."""
        return self.root / f"config.{stage}.yaml"

    def save_config(self, cfg: Config) -> Path:
        self.ensure()
        return save_config(cfg, self.config_path)

    def record_stage(self, cfg: Config, stage: str) -> list[str]:
        """Record the config ``stage`` runs with (``config.<stage>.yaml`` and ``config.yaml``, secrets redacted)
        and warn, in one line, when it differs from an earlier stage's record in a key of ``MATTERING_KEYS``.
        Returns the differing keys, each as ``key (stage, ...)``."""
        if stage not in RECORDED_STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        now = cfg.to_dict(redact=True)
        earlier = RECORDED_STAGES[:RECORDED_STAGES.index(stage)] if stage != "judge" else ()
        differs: dict[str, list[str]] = {}  # key -> the earlier stages it differs from
        for before in earlier:
            path = self.stage_config_path(before)
            if path.is_file():
                then = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                for key in config_changes(then, now, MATTERING_KEYS):
                    differs.setdefault(key, []).append(before)
        drift = [f"{key} ({', '.join(stages)})" for key, stages in sorted(differs.items())]
        if drift:
            log.warning("%s runs with a config that differs from what earlier stages ran with, in: %s (records: "
                        "%s)", stage, "; ".join(drift), self.root / "config.<stage>.yaml")
        save_config(cfg, self.stage_config_path(stage))
        self.save_config(cfg)
        return drift


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: tree}


def config_changes(before: dict, after: dict, keys: tuple[str, ...]) -> list[str]:
    """Dotted leaf keys under any of ``keys`` whose values differ between two config trees."""
    def under(tree: dict) -> dict[str, Any]:
        flat = _flat(tree, "")
        return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in keys)}

    a, b = under(before), under(after)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


# --------------------------------------------------------------------------- logging
class SecretFilter(logging.Filter):
    """Masks the values of secret environment variables (API keys) in every log record."""

    def __init__(self, env_names: list[str]):
        super().__init__()
        self.secrets = [os.environ[n] for n in env_names if os.environ.get(n)]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            msg = record.getMessage()
            for s in self.secrets:
                msg = msg.replace(s, "***")
            record.msg, record.args = msg, None
        return True


def setup_logging(run: RunDir | None, secret_envs: list[str] | None = None, level: int = logging.INFO) -> None:
    """Console (INFO) + ``logs/medrl.log`` (DEBUG) for the ``medrl`` logger; secrets masked in both."""
    logger = logging.getLogger("medrl")
    logger.setLevel(logging.DEBUG)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    secret_filter = SecretFilter(secret_envs or [])
    console = logging.StreamHandler()
    console.setLevel(level)
    console.setFormatter(fmt)
    console.addFilter(secret_filter)
    logger.addHandler(console)
    if run is not None:
        run.ensure()
        fh = logging.FileHandler(run.log_file, encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(fmt)
        fh.addFilter(secret_filter)
        logger.addHandler(fh)
    logger.propagate = False


# --------------------------------------------------------------------------- metrics
class MetricsLogger:
    """Appends ``{"stage", "step", "time", **metrics}`` to ``metrics.jsonl`` and sends the scalars, sample tables
    and hparams to the run's trackers (``run.report_to``: TensorBoard, W&B, MLflow; see ``medrl.trackers``).
    ``trackers=False``: metrics.jsonl only."""

    def __init__(self, run: RunDir, stage: str, trackers: bool = True):
        run.ensure()
        self.stage = stage
        self.path = run.metrics_path
        self._sinks = open_sinks(run.report_to, run.root, stage, run.tb_dir(stage)) if trackers else []

    def rewind(self, step: int) -> int:
        """A resume from the checkpoint of ``step``: rows this stage logged after it (steps the interrupted run did
        past its last checkpoint) are removed from metrics.jsonl, and TensorBoard hides its events after it, so the
        run shows one history. Returns the rows removed."""
        removed = rewind_jsonl(self.path, step, self.stage)
        for sink in self._sinks:
            sink.rewind(step)
        return removed

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"stage": self.stage, "step": int(step), "time": round(time.time(), 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        scalars = {f"{self.stage}/{k}": v for k, v in row.items() if k not in ("stage", "step", "time")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for sink in self._sinks:
            sink.scalars(int(step), scalars)

    def log_table(self, name: str, step: int, columns: list[str], rows: list[list[Any]]) -> None:
        """A table of this step (PPO: its samples) to the trackers, its first ``TABLE_MAX_ROWS`` rows."""
        for sink in self._sinks:
            sink.table(f"{self.stage}/{name}", int(step), columns, rows[:TABLE_MAX_ROWS])

    def log_hparams(self, config: dict[str, Any]) -> None:
        """The stage's resolved config (secrets redacted) as the trackers' hparams / config / params."""
        for sink in self._sinks:
            sink.hparams(config)

    def close(self) -> None:
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rewind_jsonl(path: Path, step: int, stage: str | None = None) -> int:
    """Remove the rows with ``"step" > step`` (of ``stage`` only, when given) from a JSONL file, atomically; other
    rows keep their order. Returns how many were removed."""
    if not path.exists():
        return 0
    kept, removed = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # a line cut by a kill: it belongs to no finished step
            removed += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step and (
                stage is None or row.get("stage") == stage):
            removed += 1
        elif row is not None:
            kept.append(line if line.endswith("\n") else line + "\n")
    if removed:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return removed


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            pass
    return v


def read_metrics(run: RunDir, stage: str | None = None) -> list[dict]:
    if not run.metrics_path.exists():
        return []
    rows = [json.loads(line) for line in run.metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if stage is None or r.get("stage") == stage]


def load_eval_rows(run: RunDir) -> list[dict]:
    """Every eval row of the run (``eval/<model>.<set>.jsonl``), pairwise files left out."""
    rows = []
    for path in sorted(run.eval.glob("*.*.jsonl")) if run.eval.is_dir() else []:
        if not path.name.startswith("pairwise."):
            rows += read_jsonl(path)
    return rows


def load_ppo_samples(run: RunDir) -> tuple[list[dict], dict[str, dict]]:
    """PPO samples and the RL prompts they answer (``data/rl_prompts.jsonl``, by id)."""
    if not run.ppo_samples.is_file():
        return [], {}
    prompts_path = run.data / "rl_prompts.jsonl"
    prompts = {r["id"]: r for r in read_jsonl(prompts_path)} if prompts_path.is_file() else {}
    return read_jsonl(run.ppo_samples), prompts
