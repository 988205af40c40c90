"""Before any PPO actor starts: the policy's initial adapter, local paths made absolute for the actors, and the
Ray resources every actor of the run asks for (an actor Ray cannot place would wait forever without a word)."""
from __future__ import annotations

import logging
from pathlib import Path

import ray

from medrl.config import Config
from medrl.errors import UsageError
from medrl.runs import RunDir

log = logging.getLogger("medrl.ppo")


def check_run_inputs(cfg: Config, run: RunDir) -> None:
    """What PPO needs, checked before Ray starts (a missing file is one line in a second, not after the 9-11 s of a
    Ray start-up): the RL prompts, the judge (key, cache, one call) and the base model."""
    from medrl.models.loading import resolve_model_path
    from medrl.ppo.batch import load_prompts
    from medrl.reward.preflight import check_judge

    load_prompts(run.data / "rl_prompts.jsonl")
    check_judge(cfg.reward)
    if not (cfg.model.build_tiny_if_missing and not Path(cfg.model.path).exists()):
        resolve_model_path(cfg.model.path, cfg.model.cache_dir)


def resolve_init_adapter(cfg: Config, run: RunDir) -> str | None:
    value = cfg.ppo.init_adapter
    if value is None:
        return None
    if value == "sft":
        found = (run.sft_adapter / "adapter_config.json").is_file()
        log.info("policy init: %s", run.sft_adapter if found else f"fresh LoRA (no SFT adapter at {run.sft_adapter})")
        return str(run.sft_adapter) if found else None
    if not (Path(value) / "adapter_config.json").is_file():
        raise UsageError(f"ppo.init_adapter: {value} is not an adapter directory (no adapter_config.json)")
    return value


def absolute_paths(cfg: Config) -> Config:
    """Local paths made absolute, so actors find them whatever their working directory."""
    def absolute(value: str | None) -> str | None:
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    model = cfg.model.model_copy(update={"path": absolute(cfg.model.path)})
    init = cfg.ppo.init_adapter if cfg.ppo.init_adapter == "sft" else absolute(cfg.ppo.init_adapter)
    return cfg.model_copy(update={"model": model, "ppo": cfg.ppo.model_copy(update={"init_adapter": init})})


def check_actor_resources(cfg: Config) -> tuple[float, float]:
    """GPU shares of a learner rank and a rollout actor: 0 on CPU. Ray hides every GPU from an actor that asks for
    none, so on CUDA both must be > 0. The CPUs and GPUs that every actor of a run asks for must fit in the cluster:
    checked here, since an actor Ray cannot place waits forever without a word."""
    lc, rc, jc = cfg.ppo.learner, cfg.ppo.rollout, cfg.reward.judge
    cluster = ray.cluster_resources()
    need_cpus = lc.ranks * lc.num_cpus + rc.num_actors * rc.num_cpus + jc.num_actors * jc.actor_num_cpus
    if need_cpus > cluster.get("CPU", 0.0) + 1e-9:
        raise UsageError(f"PPO asks for {need_cpus:g} CPUs (ppo.learner.ranks x num_cpus + ppo.rollout.num_actors x "
                         f"num_cpus + reward.judge.num_actors x actor_num_cpus) but the Ray cluster has "
                         f"{cluster.get('CPU', 0.0):g}; lower those shares or raise ray.num_cpus")
    available = cluster.get("GPU", 0.0)
    device = cfg.model.device if cfg.model.device != "auto" else ("cuda" if available else "cpu")
    if device == "cpu":
        return 0.0, 0.0
    if lc.num_gpus <= 0 or rc.num_gpus <= 0:
        raise UsageError("model.device is cuda: ppo.learner.num_gpus and ppo.rollout.num_gpus must be > 0")
    need = lc.ranks * lc.num_gpus + rc.num_actors * rc.num_gpus
    if need > available + 1e-9:
        raise UsageError(f"PPO asks for {need:g} GPUs (ppo.learner.ranks x num_gpus + ppo.rollout.num_actors x "
                         f"num_gpus) but the Ray cluster has {available:g}")
    return lc.num_gpus, rc.num_gpus
