"""Where a stage's metrics go besides ``metrics.jsonl``: the trackers of ``run.report_to``.

``tensorboard``: one event directory per stage (``tb/<stage>/``): scalars, a text table of samples, hparams.
``wandb`` / ``mlflow``: one run per run directory. Every stage (SFT, PPO, its reward pool, eval, ``medrl judge``)
logs into it, each under its own prefix and step axis (``ppo/reward_mean`` against ``ppo/step``): the W&B run id and
the MLflow run id are kept in ``<run>/trackers.json``, so a later process resumes the same run, and the stages of one
process share one session. W&B follows its own environment (``WANDB_MODE=offline``, ``WANDB_DIR``,
``WANDB_PROJECT``; default project ``medrl``, files under ``<run>/``); MLflow logs to ``$MLFLOW_TRACKING_URI``
(default: the SQLite file ``<run>/mlflow.db``, artifacts in ``<run>/mlartifacts``; MLflow 3 refuses its old
``./mlruns`` file store), experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``medrl``.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from medrl.errors import UsageError

TRACKERS = ("tensorboard", "wandb", "mlflow")
TABLE_MAX_ROWS = 32
"""Rows of a logged sample table (the first ones of the step); every sample stays in ``ppo/samples.jsonl``."""
TABLE_MAX_CHARS = 2000
"""A table cell is cut to this many characters."""


def flatten(tree: dict, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"ppo": {"lr": 1e-5}}`` -> ``{"ppo.lr": 1e-5}``; lists and None become text (trackers take scalars)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + sep, sep))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, ensure_ascii=False)
    return out


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text[:TABLE_MAX_CHARS]


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """The rows as a Markdown table (TensorBoard renders text summaries as Markdown); pipes and newlines escaped."""
    def esc(value: Any) -> str:
        return _cell(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- run-wide sessions (W&B, MLflow)
class _Shared:
    """One W&B / MLflow session per (tracker, run directory) in this process, counted by its users."""

    lock = threading.Lock()
    sessions: dict[tuple[str, Path], list] = {}  # key -> [session, users]

    @classmethod
    def acquire(cls, kind: str, root: Path, opener):
        with cls.lock:
            entry = cls.sessions.get((kind, root))
            if entry is None:
                entry = cls.sessions[(kind, root)] = [opener(root), 0]
            entry[1] += 1
            return entry[0]

    @classmethod
    def release(cls, kind: str, root: Path, closer) -> None:
        with cls.lock:
            entry = cls.sessions[(kind, root)]
            entry[1] -= 1
            if entry[1] == 0:
                del cls.sessions[(kind, root)]
                closer(entry[0])


def _ids_path(root: Path) -> Path:
    return root / "trackers.json"


def _read_ids(root: Path) -> dict:
    path = _ids_path(root)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_ids(root: Path, **ids: str) -> None:
    data = {**_read_ids(root), **ids}
    tmp = _ids_path(root).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(_ids_path(root))


def _need(module: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"run.report_to has {tracker} but {module} is not installed: pip install 'medrl[track]' "
                         f"(or remove {tracker} from run.report_to)") from None


def _open_wandb(root: Path):
    wandb = _need("wandb", "wandb")
    run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "medrl", name=root.name,
                     id=_read_ids(root).get("wandb_run_id"), resume="allow",
                     dir=os.environ.get("WANDB_DIR") or str(root), reinit="create_new",
                     settings=wandb.Settings(console="off"))
    _write_ids(root, wandb_run_id=run.id)
    return run


def _open_mlflow(root: Path):
    _need("mlflow", "mlflow")
    from mlflow.tracking import MlflowClient

    custom = os.environ.get("MLFLOW_TRACKING_URI")
    uri = custom or f"sqlite:///{root.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    store = hashlib.sha256(uri.encode()).hexdigest()[:16]  # which store the id belongs to (a URI may hold a password)
    ids = _read_ids(root)
    run_id = ids.get("mlflow_run_id") if ids.get("mlflow_store") == store else None
    if run_id is None:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "medrl"
        experiment = client.get_experiment_by_name(name)
        artifacts = None if custom else str(root.resolve() / "mlartifacts")
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name, artifacts)
        run_id = client.create_run(experiment_id, run_name=root.name).info.run_id
        _write_ids(root, mlflow_run_id=run_id, mlflow_store=store)
    else:
        client.update_run(run_id, status="RUNNING")
    return client, run_id


def _close_mlflow(session) -> None:
    client, run_id = session
    client.set_terminated(run_id)


# --------------------------------------------------------------------------- sinks (one per stage logger)
class TensorBoardSink:
    def __init__(self, tb_dir: Path):
        self.tb_dir = tb_dir
        self._hparams: dict[str, Any] | None = None
        self._last: dict[str, float] = {}
        self._writer = self._open()

    def _open(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.tb_dir), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self._writer.add_scalar(tag, v, step)
        self._last.update(values)

    def table(self, tag: str, step: int, columns: list[str], rows: list[list[Any]]) -> None:
        self._writer.add_text(tag, markdown_table(columns, rows), step)

    def hparams(self, config: dict) -> None:
        self._hparams = flatten(config)  # written at close, with the final value of every scalar as its metrics

    def rewind(self, step: int) -> None:
        self._writer.close()
        self._writer = self._open(purge_step=step + 1)

    def close(self) -> None:
        if self._hparams is not None:
            from torch.utils.tensorboard.summary import hparams

            for summary in hparams(self._hparams, dict(self._last)):
                self._writer.file_writer.add_summary(summary)
        self._writer.flush()
        self._writer.close()


class WandbSink:
    def __init__(self, root: Path, stage: str):
        self.root, self.stage = root, stage
        self._run = _Shared.acquire("wandb", root, _open_wandb)
        self._run.define_metric(f"{stage}/step")
        self._run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._run.log({f"{self.stage}/step": step, **values})

    def table(self, tag: str, step: int, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        data = [[_cell(v) if not isinstance(v, (int, float)) else v for v in row] for row in rows]
        self._run.log({f"{self.stage}/step": step, tag: wandb.Table(columns=columns, data=data)})

    def hparams(self, config: dict) -> None:
        self._run.config.update(config, allow_val_change=True)  # a later stage's values replace earlier ones

    def rewind(self, step: int) -> None:
        """W&B keeps what was logged; the steps after ``step`` are logged again with their new values."""

    def close(self) -> None:
        _Shared.release("wandb", self.root, lambda run: run.finish())


class MlflowSink:
    def __init__(self, root: Path, stage: str):
        self.root, self.stage = root, stage
        self._client, self._run_id = _Shared.acquire("mlflow", root, _open_mlflow)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(_mlflow_key(k), float(v), now, step)
                                                      for k, v in values.items()])

    def table(self, tag: str, step: int, columns: list[str], rows: list[list[Any]]) -> None:
        records = [{c: _cell(v) if not isinstance(v, (int, float)) else v for c, v in zip(columns, row)}
                   for row in rows]
        self._client.log_text(self._run_id, json.dumps(records, ensure_ascii=False, indent=1),
                              f"{tag}/step_{step:06d}.json")

    def hparams(self, config: dict) -> None:
        """Params are write-once in MLflow: the first stage's values stay, a later stage adds the keys it is first
        to set; every stage's whole config is an artifact ``config/<stage>.json``."""
        from mlflow.entities import Param

        known = self._client.get_run(self._run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in flatten(config).items() if k not in known]
        self._client.log_batch(self._run_id, params=new)
        self._client.log_text(self._run_id, json.dumps(config, indent=1, ensure_ascii=False),
                              f"config/{self.stage}.json")

    def rewind(self, step: int) -> None:
        """MLflow keeps every value: the steps after ``step`` get a second value each, the later one current."""

    def close(self) -> None:
        _Shared.release("mlflow", self.root, _close_mlflow)


def _mlflow_key(tag: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / space``; anything else (a set named in Chinese) becomes ``_``."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-./ ") else "_" for c in tag)


def open_sinks(report_to: tuple[str, ...] | list[str], root: Path, stage: str, tb_dir: Path) -> list:
    """The sinks of one stage logger, in ``report_to`` order."""
    sinks: list = []
    make = {"tensorboard": lambda: TensorBoardSink(tb_dir), "wandb": lambda: WandbSink(root, stage),
            "mlflow": lambda: MlflowSink(root, stage)}
    try:
        for name in report_to:
            sinks.append(make[name]())
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks
