"""One typed config tree, loaded from YAML with dotted overrides.

Every section is a pydantic model that forbids unknown keys, so a typo fails with one line naming the key, the
file and the expected type. Each stage owns its section class in its own package (``medrl/<stage>/config.py``);
this module only composes them and owns loading, overriding, saving and secret redaction.
"""
from __future__ import annotations

import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from medrl.config_base import StrictModel

from medrl.errors import ConfigError


class RunConfig(StrictModel):
    name: str = "default"
    """Run name; outputs go to ``<root>/<name>/``."""
    root: str = "runs"
    """Directory holding all runs (relative paths are relative to the working directory)."""
    seed: int = 42
    """Seed of every random draw of a stage (data order, LoRA init, sampling); the same seed repeats a run."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = ["tensorboard"]
    """Trackers that get every stage's metrics besides ``metrics.jsonl`` (always written): ``tensorboard``
    (``tb/<stage>/``), ``wandb`` (Weights & Biases; ``WANDB_MODE=offline`` logs without an account), ``mlflow``
    (``$MLFLOW_TRACKING_URI``, default ``<run>/mlflow.db``). SFT, PPO, reward and eval of one run log into one W&B /
    MLflow run. ``[]``: metrics.jsonl only. wandb and mlflow need ``pip install '.[track]'``."""


class LoraSettings(StrictModel):
    """LoRA adapter shape shared by SFT and RL (the RL policy starts from the SFT adapter)."""

    r: int = 16
    """LoRA rank: the inner dimension of each adapter matrix pair (trainable parameters grow linearly with it)."""
    alpha: int = 32
    """LoRA scaling numerator: the adapter update is multiplied by ``alpha / r``."""
    dropout: float = 0.05
    """Dropout applied to the adapter input during training (0 disables it)."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Default: every attention and MLP projection of Qwen3."""


class ModelConfig(StrictModel):
    path: str = "Qwen/Qwen3-1.7B"
    """Local model directory, or a hub id already fetched with ``medrl download-model`` (training never downloads)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bfloat16 on GPU, float32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs: ``auto`` picks CUDA when a GPU is visible, else CPU."""
    cache_dir: str | None = None
    """Where ``download-model`` puts snapshots; default ``$MODELSCOPE_CACHE`` or ``~/.cache/modelscope``."""
    system_prompt: str = (
        "You are a careful medical assistant. Think step by step inside <think></think>, then give a clear, safe "
        "answer. Recommend emergency care when symptoms suggest an emergency."
    )
    """System prompt used for SFT, rollouts and eval alike."""
    lora: LoraSettings = LoraSettings()
    """Shape of the LoRA adapter trained by SFT and RL."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass instead of keeping them: less memory, ~30% more compute."""
    build_tiny_if_missing: bool = False
    """If ``path`` does not exist, build the tiny random Qwen3 there first (CPU demo / tests only)."""


class RayConfig(StrictModel):
    address: str | None = None
    """None: start a private local Ray runtime in this process; otherwise a cluster address (or ``auto``)."""
    num_cpus: float | None = Field(None, gt=0)
    """CPUs for the local runtime (None: all)."""
    include_dashboard: bool = False
    """Start the Ray dashboard with a private local runtime (ignored when joining a cluster)."""


# Stage sections are imported after the base classes they build on.
from medrl.consult.config import ConsultConfig  # noqa: E402
from medrl.data.config import DataConfig  # noqa: E402
from medrl.evaluation.config import EvalConfig  # noqa: E402
from medrl.ppo.config import PPOConfig  # noqa: E402
from medrl.reward.config import RewardConfig  # noqa: E402
from medrl.sft.config import SFTConfig  # noqa: E402


class Config(StrictModel):
    run: RunConfig = RunConfig()
    """Run name, output root, seed and metric trackers."""
    model: ModelConfig = ModelConfig()
    """The base model, its dtype and device, the system prompt and the LoRA shape."""
    ray: RayConfig = RayConfig()
    """Where Ray runs: a private local runtime or a cluster."""
    data: DataConfig = DataConfig()
    """``medrl prepare``: sources, cleaning, splits, gold / red-team / RL prompt sets."""
    sft: SFTConfig = SFTConfig()
    """``medrl sft``: LoRA supervised fine-tuning."""
    reward: RewardConfig = RewardConfig()
    """The reward: rule weights, the teacher judge, the verifier and the judgement store."""
    ppo: PPOConfig = PPOConfig()
    """``medrl ppo``: the RL algorithm, rollout actors and learner ranks."""
    eval: EvalConfig = EvalConfig()
    """``medrl eval`` and ``medrl report``: sets, models, decoding and pairwise judging."""
    consult: ConsultConfig = ConsultConfig()
    """Multi-turn consultation RL and eval with a simulated patient (docs/consultation.md)."""

    @model_validator(mode="after")
    def _consult_fits(self) -> "Config":
        c = self.consult
        if c.cases_per_step or c.eval_limit and c.cases:
            if not c.cases:
                raise ValueError("consult.cases_per_step > 0 needs consult.cases (case files)")
            if c.patient.provider == "openai" and self.reward.judge.provider != "openai":
                raise ValueError("consult.patient.provider openai uses the judge's endpoint: it needs "
                                 "reward.judge.provider openai")
        if c.cases_per_step:
            if self.ppo.estimator not in ("grpo", "dr_grpo", "rloo"):
                raise ValueError("consult.cases_per_step > 0 needs a group ppo.estimator (grpo, dr_grpo, rloo): GAE and "
                                 "REINFORCE++ returns do not pass over the patient's turns")
        return self

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        return redact_secrets(data) if redact else data

    def to_yaml(self, redact: bool = True) -> str:
        return yaml.safe_dump(self.to_dict(redact), sort_keys=False, allow_unicode=True)

    def digest(self) -> str:
        """Short stable hash of the resolved config (used in DATA_CARD and checkpoints)."""
        blob = json.dumps(self.to_dict(redact=True), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- secrets
_SECRET_KEY = re.compile(r"(api_key|apikey|secret|password|token)$", re.IGNORECASE)


def redact_secrets(obj: Any) -> Any:
    """Replace values of secret-looking keys (``api_key``, ``*_token``...) with ``***``. ``*_env`` names are kept:
    they hold the *name* of an environment variable, never the secret itself."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and _SECRET_KEY.search(k) and v not in (None, ""):
                out[k] = "***"
            else:
                out[k] = redact_secrets(v)
        return out
    if isinstance(obj, list):
        return [redact_secrets(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- loading
def secret_env_names(cfg: Config) -> list[str]:
    """The environment variables whose values are secrets under ``cfg`` (the judge's API key, the judge store's
    URL with its password): masked in logs, refused in a Ray job's runtime_env."""
    names = {"DEEPSEEK_API_KEY", "OPENAI_API_KEY"}
    judge = getattr(cfg.reward, "judge", None)
    env = getattr(judge, "api_key_env", None)
    if env:
        names.add(env)
    cache = getattr(cfg.reward, "cache", None)
    if getattr(cache, "backend", None) == "postgres":
        names.add(cache.url_env)  # the database URL carries a password
    return sorted(names)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _field_at(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, Any]:
    """Walk ``loc`` through nested models; return (parent model, annotation of the last key)."""
    parent: type[BaseModel] | None = model
    annotation: Any = model
    for part in loc:
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            # unwrap Optional[Model] / containers of models
            models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
            if not models or not isinstance(part, str):
                continue
            annotation = models[0]
        parent = annotation
        field = annotation.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return parent, None
        annotation = field.annotation
    return parent, annotation


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long",
                 "multiple_of"}


def _format_error(err: dict, source: str) -> str:
    loc = tuple(p for p in err["loc"])
    key = ".".join(str(p) for p in loc)
    parent, annotation = _field_at(Config, loc)
    if err["type"] == "extra_forbidden":
        known = ", ".join(parent.model_fields) if parent is not None else ""
        where = ".".join(str(p) for p in loc[:-1]) or "top level"
        return f"{source}: unknown key '{key}' (known keys in {where}: {known})"
    if err["type"] == "missing":
        return f"{source}: missing required key '{key}'"
    if isinstance(err.get("input"), dict):  # a cross-field check of a whole section (model validator)
        return f"{source}: {key or 'config'}: {err['msg'].removeprefix('Value error, ')}"
    got = err.get("input")
    if err["type"] == "value_error":  # a field check's own message (it may concern a secret: never echo the input)
        return f"{source}: key '{key}': {err['msg'].removeprefix('Value error, ')}"
    if err["type"] == "finite_number":
        return f"{source}: key '{key}' must be a finite number, got {got!r}"
    if err["type"] in _RANGE_ERRORS:
        return f"{source}: key '{key}' is out of range: got {got!r} ({err['msg']})"
    expected = _type_name(annotation) if annotation is not None else "a valid value"
    return f"{source}: key '{key}' expects {expected}, got {type(got).__name__} {got!r} ({err['msg']})"


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{'.'.join(parts[: i + 1])}' is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``ppo.kl.target=0.1`` -> (``ppo.kl.target``, 0.1). Values are parsed as YAML scalars/lists."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override '{_shown(text)}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _shown(override: str) -> str:
    """An override as error messages show it: the value of a secret-looking key (or of a ``*_env`` key, where a
    key pasted by mistake would otherwise be echoed) is masked."""
    key, sep, value = override.partition("=")
    last = key.strip().rsplit(".", 1)[-1]
    if sep and value and (_SECRET_KEY.search(last) or last.endswith("_env")):
        return f"{key}=***"
    return override


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _read_yaml(p: Path, source: str) -> Any:
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{source}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at line {line}): save the "
                          "file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}:{line} is not valid YAML ({getattr(exc, 'problem', exc)})") from None


def validate_tree(tree: dict, source: str, overrides: list[tuple[str, str]] = ()) -> Config:
    """Validate the whole tree once. An error is reported against the override that set the key it concerns (the
    last one), else against ``source``."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        for key, text in reversed(overrides):
            # a check over the whole tree (no location) is blamed on an override of a key its message names
            if (key == loc or key.startswith(loc + ".") or loc.startswith(key + ".")) if loc else key in err["msg"]:
                source = f"override '{_shown(text)}'"
                break
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or defaults when ``path`` is None), apply all dotted overrides, then validate the tree
    once (so overrides that are only valid together, such as a judge model and its price, can be given)."""
    tree: dict = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(path)
        if p.is_dir():
            raise ConfigError(f"config file {path} is a directory")
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = _read_yaml(p, source)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    applied = []
    for text in overrides:
        key, value = parse_override(text)
        # a section an earlier override replaced by a value (``run=5 run.root=x``) is that override's fault
        blamed = next((t for k, t in reversed(applied) if key.startswith(k + ".")), text)
        _set_dotted(tree, key, value, f"override '{_shown(blamed)}'")
        applied.append((key, text))
    return validate_tree(tree, source, applied)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config with secrets redacted."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(cfg.to_yaml(redact=True), encoding="utf-8")
    return p
