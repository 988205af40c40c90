"""Config of the ``ppo`` stage (owned by medrl.ppo), TRL/OpenRLHF-style: one documented field per knob.

Defaults suit Qwen3-1.7B + LoRA on one 16-24 GB GPU. One PPO *step* = sample ``prompts_per_step`` prompts, draw
``samples_per_prompt`` responses for each, score them, then run ``ppo_epochs`` passes of minibatch updates.
"""
from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from medrl.config_base import StrictModel
from medrl.models.engine_config import EngineName, VLLMSettings


EstimatorName = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"]
"""The advantage estimators ``medrl.ppo.algos`` registers (it refuses to import when the two differ)."""
PolicyLossName = Literal["ppo", "gspo"]
"""The policy losses ``medrl.ppo.objective`` registers (it refuses to import when the two differ)."""


def check_registry(registry: dict, names: object, key: str) -> None:
    """Raise when a registry of ``medrl.ppo`` and the config's choices for ``key`` differ: the config (torch-free,
    shown by ``--help``) lists the names, the registry holds the code, and neither may name what the other lacks."""
    wanted, have = set(get_args(names)), set(registry)
    if wanted != have:
        raise RuntimeError(f"{key}: the config offers {sorted(wanted)} but the registry has {sorted(have)} "
                           f"(add the name to both)")


class GenerationSettings(StrictModel):
    """Sampling of rollouts (the learner scores the same tokens at the same temperature)."""

    max_new_tokens: int = Field(768, ge=1)
    """Response budget (``<think>`` + answer); a response cut here still gets its reward (rules see an unclosed
    ``<think>``, the judge an unfinished answer)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; log-probs of policy, old policy and reference are all taken at this temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling. Keep 1.0 for exact on-policy log-probs (< 1 makes the sampler differ from the scored
    distribution, as in every HF/vLLM-based PPO)."""


class KLSettings(StrictModel):
    """Per-token KL penalty against the reference policy (the base model with the adapter disabled)."""

    mode: Literal["adaptive", "fixed"] = "adaptive"
    """``adaptive``: Ziegler et al. (2019) proportional controller driving the KL towards ``target``; ``fixed``:
    constant ``init_coef``."""
    init_coef: float = Field(0.01, ge=0)
    """Initial (or fixed) coefficient beta of the KL term. In the reward (``placement=reward``) the penalty
    ``-beta * KL_t`` is added to every response token and advantages sum it over the rest of the response, so its
    weight grows with length: keep beta small for long chains of thought. 0 turns the KL off and skips the reference
    forward entirely (no ``kl`` metric then; the adaptive controller cannot move a zero coefficient)."""
    placement: Literal["reward", "loss"] = "reward"
    """``reward``: the per-token penalty is part of the reward (PPO/InstructGPT, OpenRLHF's default). ``loss``: the
    advantages see the score alone and ``beta * KL_t`` of the live policy is added to the loss, aggregated as the
    policy loss (the GRPO paper's form; use ``estimator=k3``: OpenRLHF ``--use_kl_loss``, veRL ``use_kl_loss``,
    TRL GRPO's ``beta``)."""
    target: float = Field(0.1, gt=0)
    """Target of the adaptive controller: mean per-token KL (nats) of the batch."""
    horizon: int = Field(10000, ge=1)
    """Adaptive controller horizon in samples: the coefficient moves by at most ``20% * samples/horizon`` a step."""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (Schulman, 'Approximating KL divergence'): k1 = log p - log q (unbiased, can be
    negative), k2 = (log p - log q)^2 / 2, k3 = exp(log q - log p) - 1 - (log q - log p) (unbiased, >= 0)."""


class RolloutSettings(StrictModel):
    """Ray rollout actors: each holds the base model + the policy's LoRA and samples with its engine."""

    engine: EngineName = "hf"
    """``hf``: transformers ``generate`` + a scoring pass for the log-probs (no extra dependency, best for tiny
    models on CPU). ``vllm``: a vLLM engine per actor, each published adapter version loaded as its own LoRA, the
    log-probs from the engine (``pip install medrl[vllm]``; the rollout engine to use on a GPU)."""
    vllm: VLLMSettings = VLLMSettings()
    """Engine settings when ``engine`` is ``vllm``."""
    num_actors: int = Field(1, ge=1)
    """Rollout actors sampling in parallel (each holds its own copy of the base model)."""
    batch_size: int = Field(4, ge=1)
    """Prompts per rollout micro-batch (one ``generate`` call, x ``samples_per_prompt`` sequences). Each finished
    micro-batch is sent to the reward pool at once, while the next one is generating."""
    num_cpus: float = Field(1.0, gt=0)
    """Ray CPUs reserved per rollout actor."""
    num_gpus: float = Field(0.5, ge=0)
    """GPU share per rollout actor when the model runs on CUDA (ignored on CPU). The default 0.5 + the learner's 0.5
    puts both on one card: each holds its own copy of the frozen base weights."""
    max_restarts: int = Field(3, ge=0)
    """A rollout actor that dies is restarted (and its unfinished micro-batches redone) up to this many times."""


class LearnerSettings(StrictModel):
    """The learner ranks: Ray actors running Accelerate (optionally with a DeepSpeed plugin) over gloo/NCCL."""

    ranks: int = Field(1, ge=1)
    """Data-parallel learner ranks (one per GPU); they all-reduce gradients and stay identical."""
    deepspeed: str | None = None
    """None (plain PyTorch, DDP when ranks > 1) or a DeepSpeed JSON, e.g. ``configs/deepspeed/zero2.json``; its
    batch, clipping and accumulation values are set from this section."""
    num_cpus: float = Field(1.0, gt=0)
    """Ray CPUs reserved per learner rank."""
    num_gpus: float = Field(0.5, ge=0)
    """GPU share per learner rank when the model runs on CUDA (ignored on CPU); use 1 per rank with ranks > 1
    (NCCL needs one GPU per rank)."""


class RolloutCorrectionSettings(StrictModel):
    """Importance-sampling correction of the rollout/learner mismatch: the engine samples with its own kernels, so
    its probability of a sampled token differs from the learner's at the very same weights. The ratio is
    ``rho = pi_learner(theta_b) / pi_engine(theta_b)`` (the learner's behaviour log-prob over the engine's log-prob of
    each sampled token), multiplied into the per-token policy loss (with the decoupled weight under
    ``async_rollout``). The weight-sync abort (``logprob_gap_abort``) still stops a run whose engine lacks the
    adapter: the correction is for numeric mismatch, not for missing weights."""

    mode: Literal["none", "tis", "mis"] | None = None
    """``none``: no correction (the ratio is still measured: ``rollout_kl``, ``rollout_is_mean`` / ``_max``).
    ``tis``: truncated IS, each weight ``min(rho, cap)`` (veRL ``rollout_is``, TRL ``*_truncate``). ``mis``: masked
    IS, weight ``rho`` inside ``[low, high]``, tokens (or sequences) outside it leave the loss (veRL's rejection
    sampling, TRL ``*_mask``). None: per engine, ``tis`` for ``vllm`` (bf16 kernels other than the learner's) and
    ``none`` for ``hf`` (the engine scores with the learner's own code: rho is 1 to ~1e-6 in fp32)."""
    level: Literal["token", "sequence"] = "token"
    """``token``: one ratio per token. ``sequence``: one per response, the geometric mean of its token ratios
    ``exp(mean_t log rho_t)``, on all its tokens (GSPO-style; the product of veRL/TRL's sequence level explodes or
    vanishes with length)."""
    cap: float = Field(2.0, gt=0)
    """``tis``: truncation of the weight from above (veRL ``rollout_is_threshold`` 2.0, TRL
    ``vllm_importance_sampling_cap``)."""
    low: float = Field(0.5, gt=0, lt=1)
    """``mis``: ratios below this leave the loss (IcePop's lower bound)."""
    high: float = Field(2.0, gt=1)
    """``mis``: ratios above this leave the loss."""


class CheckpointSettings(StrictModel):
    every: int = Field(50, ge=1)
    """Write a resumable checkpoint every N steps (and after the last step)."""
    keep_last: int = Field(2, ge=1)
    """Keep only the newest K complete checkpoints."""


class PPOConfig(StrictModel):
    # ---- algorithm
    estimator: EstimatorName = "grpo"
    """Advantage estimator. ``gae``: PPO with the value head and GAE. Critic-free: ``grpo`` (reward normalised
    within each prompt's group), ``dr_grpo`` (group mean subtracted, no std division), ``rloo`` (leave-one-out group
    baseline), ``reinforce_pp`` (REINFORCE++: batch-whitened returns). ``grpo`` is the default: no value head to
    train, best for sparse judge rewards. Groups whose scores are all equal get exactly 0 (grpo, dr_grpo, rloo)."""
    steps: int = Field(100, ge=1)
    """PPO steps (rollout + update rounds)."""
    prompts_per_step: int = Field(16, ge=1)
    """Prompts drawn from rl_prompts.jsonl per step (a step trains on prompts x ``samples_per_prompt`` samples)."""
    samples_per_prompt: int = Field(4, ge=1)
    """Group size n: responses sampled per prompt (>= 2 for grpo / rloo)."""
    generation: GenerationSettings = GenerationSettings()
    """How rollouts are sampled (length, temperature, nucleus)."""
    kl: KLSettings = KLSettings()
    """The KL penalty against the reference policy."""

    # ---- returns and advantages
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount over response tokens."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten GAE advantages over the batch (grpo/rloo are already normalised per group; reinforce_pp always
    whitens)."""

    filter_zero_spread_groups: bool = False
    """Drop the groups whose rewards are all equal from the update (DAPO's dynamic-sampling filter, without the
    resampling): they carry no signal for group estimators, yet dilute the token mean. Counted either way
    (``zero_spread_groups``, ``zero_spread_frac``); a step left with nothing to learn skips its update."""
    mask_truncated: bool = False
    """Exclude responses cut at ``generation.max_new_tokens`` from every loss (DAPO's overlong filtering, TRL's
    ``mask_truncated_completions``): an unfinished answer is not penalised for being unfinished. They still count
    in their group's baseline and the reward metrics (``truncated_masked`` counts them)."""

    # ---- losses and optimisation
    policy_loss: PolicyLossName = "ppo"
    """Policy loss (registry ``medrl.ppo.objective.POLICY_LOSSES``). ``ppo``: clipped surrogate on each token's ratio.
    ``gspo``: the same on one ratio per response, the geometric mean of its token ratios (GSPO; clips of ~3e-4)."""
    clip: float = Field(0.2, gt=0)
    """PPO ratio clip epsilon (both sides unless ``clip_low`` / ``clip_high`` say otherwise)."""
    clip_low: float | None = Field(None, gt=0, lt=1)
    """Lower clip: ratios below ``1 - clip_low`` stop pushing (None: ``clip``)."""
    clip_high: float | None = Field(None, gt=0)
    """Upper clip: ratios above ``1 + clip_high`` stop pushing (None: ``clip``). DAPO's clip-higher: 0.28 with
    ``clip_low`` 0.2 lets rare tokens of good answers grow, against entropy collapse."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual clip c (Ye et al. 2020): the loss of a token with a negative advantage is capped at ``-A * c``, so a
    token the policy has made far likelier cannot give an unbounded loss (OpenRLHF ``--dual_clip``, veRL
    ``clip_ratio_c``; typical 3). None: off."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] | None = None
    """How per-token losses become one number (veRL's names). ``token-mean``: over all tokens of the minibatch, all
    learner ranks together (PPO, DAPO). ``seq-mean-token-mean``: each response's token mean, averaged over responses
    (the GRPO paper; TRL's ``loss_type=grpo``). ``seq-mean-token-sum-norm``: token sums over responses x
    ``loss_norm_len`` (Dr. GRPO, TRL's ``dr_grpo``: no length bias). None: ``seq-mean-token-mean`` for ``gspo``
    (its ratio is per response; the peers' GSPO default), ``token-mean`` for ``ppo``."""
    loss_norm_len: int | None = Field(None, ge=1)
    """The constant length of ``seq-mean-token-sum-norm`` (None: ``generation.max_new_tokens``)."""
    value_clip: float | None = Field(0.2, gt=0)
    """Clip of value predictions around the old values (None: unclipped value loss)."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss in the joint loss (gae only)."""
    value_head: Literal["shared", "detached"] = "shared"
    """``shared``: the value head reads the policy's last hidden state and its loss also trains the LoRA trunk
    (one forward for both; TRL's classic PPO). ``detached``: the head reads a detached hidden state, so the value
    loss never moves the policy (a linear probe on the policy's features)."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each step's batch."""
    minibatch_size: int = Field(16, ge=1)
    """Samples per optimizer step (all learner ranks together). At least the step's batch with ``ppo_epochs: 1``
    (one optimizer step per batch) and no critic: with ``async_rollout`` the learner then skips the forward pass for
    the proximal log-probs (the training forward's serve)."""
    micro_batch_size: int = Field(1, ge=1)
    """Samples per forward/backward on one rank (gradient accumulation inside a minibatch). Its LM-head logits in
    fp32 (``micro x response tokens x vocab x 4`` bytes, ~0.45 GiB per 768 tokens of Qwen3) dominate the learner's
    activation memory."""
    lr: float = Field(2e-5, gt=0)
    """Learning rate of the LoRA weights."""
    value_lr: float = Field(1e-4, gt=0)
    """Learning rate of the value head."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay of the LoRA weights."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping (global L2 norm) of each optimizer step."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    """Learning-rate schedule over the optimizer steps of the run (after ``warmup_steps``)."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up."""
    log_entropy: bool = True
    """Log the mean token entropy of the policy (one extra pass over the logits, no gradient)."""

    # ---- distributed parts
    async_rollout: bool = False
    """Generate the next step's samples while this step is judged and learned (one-step off-policy, like
    OpenRLHF's async training and veRL's one-step-off-policy): rollout actors never wait for the learner, so a step
    takes about max(generate, score + learn) instead of their sum. Step n+1 samples with the weights before step
    n's update. The update is decoupled PPO: the ratio is clipped around the live weights (the proximal policy)
    and each token is weighted by pi_live / pi_behaviour (``behaviour_weight_cap``); the learner keeps the previous
    LoRA to compute pi_behaviour, so the rollout/learner log-prob check stays exact. Needs ZeRO <= 2."""
    behaviour_weight_cap: float = Field(2.0, gt=0)
    """Truncation of the per-token importance weight pi_live / pi_behaviour of lagged samples (truncated IS: a
    token the policy has since made much likelier cannot dominate the gradient). Weights are 1 without
    ``async_rollout``."""
    rollout: RolloutSettings = RolloutSettings()
    """The rollout actors: engine, count, batch and resources."""
    learner: LearnerSettings = LearnerSettings()
    """The learner ranks: count, DeepSpeed and resources."""

    # ---- init, checks, checkpoints
    init_adapter: str | None = "sft"
    """``sft``: start from the run's SFT adapter when it exists (a fresh LoRA otherwise); a path: that adapter
    directory; None: a fresh LoRA from ``model.lora``."""
    logprob_gap_tolerance: float = Field(1e-3, gt=0)
    """Every step the rollout engine's log-probs of its sampled tokens are compared with the learner's recompute
    under the adapter version that sampled them; a max abs gap above this is logged as a warning (fp32 on CPU:
    ~1e-6 with either engine; bf16 kernels differ more)."""
    rollout_correction: RolloutCorrectionSettings = RolloutCorrectionSettings()
    """Importance-sampling correction of the engine/learner mismatch (``mode`` none | tis | mis, ``level`` token |
    sequence); its default depends on the engine: none for hf, tis for vllm (docs/ppo.md)."""
    logprob_gap_abort: float | None = Field(None, gt=0)
    """Mean abs per-token gap above which the run stops with an error naming the adapter version: the engine did
    not sample with the weights it was told to (an adapter that never reached it). None: 1e-3 when the model runs
    in float32, 0.05 in bfloat16/float16."""
    unscored_warn_frac: float = Field(0.1, ge=0, le=1)
    """A step whose share of samples left unscored (judgement failed, ``reward.judge.on_failure: drop``; metric
    ``judge_unscored_frac``) exceeds this logs a warning: they leave their group's baseline and the loss."""
    checkpoint: CheckpointSettings = CheckpointSettings()
    """How often resumable checkpoints are written and how many are kept."""
    log_samples: bool = True
    """Append every scored sample (step, prompt id, response, reward, components) to ``ppo/samples.jsonl``."""

    @field_validator("samples_per_prompt")
    @classmethod
    def _group_size(cls, v: int, info: ValidationInfo) -> int:
        estimator = info.data.get("estimator")
        if estimator in ("grpo", "dr_grpo", "rloo") and v < 2:
            raise ValueError(f"must be >= 2 for estimator {estimator!r} (the group baseline needs 2 samples)")
        return v

    @field_validator("clip_high")
    @classmethod
    def _clip_range(cls, v: float | None, info: ValidationInfo) -> float | None:
        low = info.data.get("clip_low")
        if v is not None and low is not None and v < low:
            raise ValueError(f"clip_high={v} below clip_low={low} (clip-higher means clip_high >= clip_low)")
        return v

    @field_validator("rollout")
    @classmethod
    def _vllm_needs_full_nucleus(cls, v: RolloutSettings, info: ValidationInfo) -> RolloutSettings:
        gen = info.data.get("generation")
        if v.engine == "vllm" and gen is not None and gen.top_p < 1:
            raise ValueError(f"engine vllm needs generation.top_p=1 (got {gen.top_p}): vLLM reports log-probs "
                             f"renormalised over the nucleus, so every step's rollout vs learner log-prob check "
                             f"would see a gap of -log(nucleus mass) and stop the run")
        return v

    @property
    def uses_critic(self) -> bool:
        """Whether the estimator needs a value head (``gae``: the learner trains one and scores values)."""
        return self.estimator == "gae"

    @model_validator(mode="after")
    def _per_algorithm_defaults(self) -> "PPOConfig":
        """Fill the defaults that depend on other fields (``loss_agg_mode`` on the policy loss, the rollout
        correction on the engine), so the resolved config is what the digest and the logs show."""
        if self.loss_agg_mode is None:
            self.loss_agg_mode = "seq-mean-token-mean" if self.policy_loss == "gspo" else "token-mean"
        if self.rollout_correction.mode is None:
            self.rollout_correction.mode = "tis" if self.rollout.engine == "vllm" else "none"
        return self

    @field_validator("learner")
    @classmethod
    def _ranks_divide_batches(cls, v: LearnerSettings, info: ValidationInfo) -> LearnerSettings:
        batch = info.data.get("prompts_per_step", 1) * info.data.get("samples_per_prompt", 1)
        if batch % v.ranks:
            raise ValueError(f"ranks={v.ranks} must divide prompts_per_step x samples_per_prompt = {batch}")
        if info.data.get("minibatch_size", v.ranks) % v.ranks:
            raise ValueError(f"ranks={v.ranks} must divide minibatch_size = {info.data['minibatch_size']}")
        return v
