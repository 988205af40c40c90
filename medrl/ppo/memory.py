"""Expected peak memory of the PPO learner (and of rollout actors sharing its GPU): pure arithmetic.

Everything is counted in bytes per *learner rank* for one micro-batch of ``b = ppo.micro_batch_size`` samples of
``S = P + R`` tokens (``P`` prompt tokens, ``R = generation.max_new_tokens``). Notation: ``p`` bytes per weight
(2 for bf16), ``h`` hidden, ``q = heads * head_dim``, ``k = kv_heads * head_dim``, ``I`` intermediate, ``V`` vocab,
``L`` layers, ``r`` LoRA rank, ``T = b * S`` tokens, ``N = b * R`` response rows, ``W`` learner ranks.

Persistent
  weights     params * p (ZeRO-3: / W, plus a gathered working set of the embedding and two layers in p)
  trainable   LoRA params * (4 weight + 4 grad + 8 Adam m, v) in fp32 (peft keeps adapters in fp32); under
              DeepSpeed with a 2-byte dtype a 4-byte fp32 master copy more; ZeRO-1 shards Adam (+ master) over W,
              ZeRO-2 also grads, ZeRO-3 also the weights; optimizer offload moves Adam + master to the CPU.
              The value head (gae) is ``(h + 1)`` such parameters.
  snapshots   with ``async_rollout``: 3 more fp32 copies of the LoRA weights (the two kept versions and the
              live copy held while one is swapped in)
Activations saved per token and decoder layer (``A_layer``; what autograd keeps for the backward of a Qwen3 layer
with LoRA on ``target_modules``, dropout off as in the learner, SDPA flash/memory-efficient kernel):
  4h + 4h         fp32 copies kept by the two RMSNorms       4q + 4k + 4(2 + heads + kv_heads)   q/k norms
  4 * in          the fp32 input copy of each LoRA module (peft casts inputs to the adapter dtype; when the base is
                  fp32 there is no cast and q/k/v, gate/up share one saved input, o reuses the attention output)
  4r              each LoRA A output
  p(2q + 2k')     attention q, k, v, output (k' = q when K/V heads are repeated: transformers does so for padded
                  batches on CUDA) + 4 * heads (log-sum-exp)
  3pI             SiLU input, SiLU output, up projection
Per micro-batch (the learner runs ``PolicyWithValue``: only response positions reach the LM head)
  without checkpointing  L * A_layer * T
  with checkpointing     L * p * h * T (layer inputs) + A_layer * T (one layer recomputed in the backward)
  + 4h * T (final norm) + (p + 4 if gae) * h * N (gathered response hidden states)
  logits: an fp32 ``[N, V]`` buffer is 4NV bytes. Forward peak: 2 of them (the fp32 logits saved by logsumexp and
  the temperature-scaled copy); backward peak: 4 (saved logits + logsumexp/gather gradients). The no-grad scoring
  pass (old/ref log-probs) peaks at 2. The entropy (no grad, one row at a time) adds 3 * 4RV in the forward.
Train-step peak = saved activations + max(forward logits, backward logits, recomputed layer + its gradients
(taken as 1 A_layer * T more)). Learner peak = CUDA context + persistent + max(train step, scoring pass) *
(1 + allocator reserve).

A rollout actor on the same GPU (``0 < rollout.num_gpus`` and learner + rollout shares <= 1) is another process:
CUDA context + weights + fp32 LoRA + max(generation: KV cache ``2 * L * k * p`` per token of ``batch_size *
samples_per_prompt`` sequences of S tokens plus the larger of one layer's repeated K/V and the prefill MLP
(``3pI`` per prompt token), plus the sampler's two fp32 ``[sequences, V]`` buffers: it keeps the log-probs as it
samples, no scoring pass). With ``rollout.engine: vllm`` it is a vLLM engine instead
(``vllm_engine_bytes``: its KV cache is ``rollout.vllm.kv_cache_gib``); with sleep mode (sync rollouts) the GPU
peak is the larger of learner peak + sleeping engines and learner at rest (persistent memory) + awake engines.

``bench/memory.py`` checks these formulas against measured peaks of a real LoRA forward/backward on CPU.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from medrl.errors import UsageError

GiB = 2 ** 30
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
"""CUDA context + cuBLAS/cuDNN workspaces of one process (~0.3-0.6 GiB with lazy module loading)."""
ALLOCATOR_RESERVE = 0.10
"""PyTorch's caching allocator reserves more than it hands out (fragmentation): 10% of the transient peak."""
PROMPT_OVERHEAD_TOKENS = 64
"""Chat-template and system-prompt tokens added to ``data.max_question_tokens`` when no prompt cap is configured."""
HEADROOM = 0.10
"""A config fits a card when its estimate leaves at least this fraction of the card free."""
CARDS_GIB = (16, 24, 40, 80)

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf_config(cls, c: dict) -> "ModelShape":
        heads = c["num_attention_heads"]
        return cls(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
                   kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, intermediate=c["intermediate_size"],
                   vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of a decoder layer."""
        h, q, k, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, k), "v_proj": (h, k), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        norms = 2 * self.hidden + 2 * self.head_dim  # input/post-attention RMSNorm, q_norm, k_norm
        return sum(a * b for a, b in self.module_dims().values()) + norms

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        return self.layers * sum(r * (a + b) for name, (a, b) in self.module_dims().items() if name in targets)


QWEN3_1P7B = ModelShape(hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=6144,
                        vocab=151936, tied=True)
"""Qwen/Qwen3-1.7B, from its config.json."""


@dataclass(frozen=True)
class MemorySettings:
    """Everything besides the model shape that the estimate depends on (see ``settings_from_config``)."""

    weight_bytes: int = 2
    micro_batch: int = 4
    prompt_tokens: int = 512
    response_tokens: int = 512
    lora_r: int = 16
    lora_targets: tuple[str, ...] = LORA_MODULES
    gradient_checkpointing: bool = True
    value_head: bool = False
    entropy: bool = True
    zero_stage: int = 0
    ranks: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    repeat_kv: bool = True
    """K/V heads repeated to the query heads before SDPA (transformers does so for padded batches on CUDA)."""
    cuda: bool = True
    """False: host memory on CPU (no CUDA context, no allocator reserve)."""
    behaviour_snapshots: bool = False
    """``ppo.async_rollout``: the learner keeps weight snapshots of the versions rollouts sample with."""
    colocated_rollouts: int = 0
    """Rollout actors sharing this GPU."""
    rollout_sequences: int = 16
    """Sequences one rollout ``generate`` call holds (rollout.batch_size * samples_per_prompt)."""
    rollout_engine: str = "hf"
    """``ppo.rollout.engine``; ``vllm`` counts a vLLM engine per colocated actor (``vllm_engine_bytes``)."""
    engine_kv_cache_bytes: int | None = None
    """``ppo.rollout.vllm.kv_cache_gib``; None: the KV cache one rollout call needs (vLLM then takes
    ``gpu_memory_utilization`` of the card: set ``kv_cache_gib`` for a share that does not depend on the card)."""
    engine_max_num_seqs: int = 128
    engine_max_lora_rank: int = 16
    engine_sleeps: bool = False
    """vLLM sleep mode between rollouts (sync rollouts on a GPU): the engine holds only its CUDA context while the
    learner trains, and the learner has released its allocator cache while the engine samples."""


# --------------------------------------------------------------------------- the arithmetic
def layer_activation_bytes(shape: ModelShape, s: MemorySettings) -> int:
    """``A_layer``: bytes autograd saves per token in one decoder layer (module docstring)."""
    p, h, q, k, i, r = s.weight_bytes, shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate, s.lora_r
    dims = shape.module_dims()
    targets = [m for m in LORA_MODULES if m in s.lora_targets]
    norms = 4 * h + 4 * h + 4 * q + 4 * k + 4 * (2 + shape.heads + shape.kv_heads)
    if p == 4:  # no dtype cast: modules reading the same tensor share it; o_proj reads the saved attention output
        groups = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",)]
        lora_inputs = sum(4 * dims[g[0]][0] for g in groups if any(m in targets for m in g))
    else:
        lora_inputs = sum(4 * dims[m][0] for m in targets)
    lora_a = 4 * r * len(targets)
    attention = p * (2 * q + 2 * (q if s.repeat_kv else k)) + 4 * shape.heads
    mlp = 3 * p * i
    return norms + lora_inputs + lora_a + attention + mlp


def _trainable_bytes(n: int, s: MemorySettings) -> dict[str, int]:
    """fp32 weight / grad / Adam (+ master) bytes of ``n`` trainable parameters on one rank."""
    w = s.ranks
    master = 4 * n if s.zero_stage > 0 and s.weight_bytes < 4 else 0
    opt = 0 if s.offload_optimizer else (8 * n + master) // (w if s.zero_stage >= 1 else 1)
    return {"weights": 4 * n // (w if s.zero_stage >= 3 else 1),
            "grads": 4 * n // (w if s.zero_stage >= 2 else 1), "optimizer": opt}


def estimate(shape: ModelShape, s: MemorySettings) -> dict[str, int]:
    """Components and peak (bytes) of one learner rank's GPU (module docstring)."""
    p, h, V = s.weight_bytes, shape.hidden, shape.vocab
    S = s.prompt_tokens + s.response_tokens
    T, N = s.micro_batch * S, s.micro_batch * s.response_tokens
    out: dict[str, int] = {"cuda_context": CUDA_CONTEXT_BYTES if s.cuda else 0}

    base = shape.params() * p
    if s.zero_stage >= 3:
        gathered = (shape.vocab * h + 2 * shape.layer_params()) * p
        base = gathered + (0 if s.offload_params else base // s.ranks)
    out["base_weights"] = base
    lora_params = shape.lora_params(s.lora_r, s.lora_targets)
    lora = _trainable_bytes(lora_params + (h + 1 if s.value_head else 0), s)
    out.update({f"lora_{k}": v for k, v in lora.items()})
    if s.behaviour_snapshots:
        out["snapshots"] = 3 * 4 * lora_params
    persistent = sum(out.values())

    a_layer = layer_activation_bytes(shape, s)
    kept_per_layer = p * h if s.gradient_checkpointing else a_layer
    out["activations"] = shape.layers * kept_per_layer * T + 4 * h * T + (p + (4 if s.value_head else 0)) * h * N
    out["recompute"] = 2 * a_layer * T if s.gradient_checkpointing else a_layer * T
    buf = 4 * N * V
    entropy = 3 * 4 * s.response_tokens * V if s.entropy else 0
    out["logits_forward"] = max(2 * buf, buf + entropy)
    out["logits_backward"] = 4 * buf
    out["train_step"] = out["activations"] + max(out["logits_forward"], out["logits_backward"], out["recompute"])
    out["scoring_pass"] = scoring = T * (p * h + 3 * p * shape.intermediate) + 2 * buf
    transient = max(out["train_step"], scoring)
    out["allocator_reserve"] = int(ALLOCATOR_RESERVE * transient) if s.cuda else 0
    out["learner_peak"] = persistent + transient + out["allocator_reserve"]

    if s.colocated_rollouts and s.rollout_engine == "vllm":
        awake = vllm_engine_bytes(shape, s)
        out["rollout_actor"] = awake
        out["rollouts"] = awake * s.colocated_rollouts
        if s.engine_sleeps:  # the two phases: learner peak + sleeping engines, or learner at rest + awake engines
            out["rollouts_asleep"] = CUDA_CONTEXT_BYTES * s.colocated_rollouts
            out["gpu_peak"] = max(out["learner_peak"] + out["rollouts_asleep"], persistent + out["rollouts"])
        else:
            out["gpu_peak"] = out["learner_peak"] + out["rollouts"]
        return out
    if s.colocated_rollouts:
        kv = 2 * shape.layers * shape.kv_dim * p * s.rollout_sequences * S
        repeat = 2 * s.rollout_sequences * S * shape.q_dim * p
        prefill = s.rollout_sequences * s.prompt_tokens * 3 * p * shape.intermediate
        sampler = 2 * 4 * s.rollout_sequences * V  # generate's fp32 scores and SampledLogprobs' log-softmax
        one = (CUDA_CONTEXT_BYTES + shape.params() * p + 4 * shape.lora_params(s.lora_r, s.lora_targets)
               + kv + max(repeat, prefill) + sampler)
        out["rollout_actor"] = one
        out["rollouts"] = one * s.colocated_rollouts
    out["gpu_peak"] = out["learner_peak"] + out.get("rollouts", 0)
    return out


VLLM_BATCHED_TOKENS = 8192
"""Tokens of vLLM's profiling forward (its default ``max_num_batched_tokens`` for offline use): its activation peak
is reserved as the engine's workspace."""


def vllm_engine_bytes(shape: ModelShape, s: MemorySettings) -> int:
    """One awake vLLM engine: CUDA context + weights + its LoRA slot (``max_lora_rank`` on every projection, model
    dtype) + KV cache (``engine_kv_cache_bytes``, else one rollout call's ``2 L k p`` per token) + workspace (one
    layer's activations over ``VLLM_BATCHED_TOKENS`` tokens + fp32 logits and log-probs of ``max_num_seqs`` rows)."""
    p = s.weight_bytes
    S = s.prompt_tokens + s.response_tokens
    lora = shape.layers * sum(s.engine_max_lora_rank * (i + o) for i, o in shape.module_dims().values()) * p
    kv = s.engine_kv_cache_bytes
    if kv is None:
        kv = 2 * shape.layers * shape.kv_dim * p * s.rollout_sequences * S
    tokens = VLLM_BATCHED_TOKENS
    workspace = tokens * (4 * shape.hidden + shape.q_dim + 2 * shape.kv_dim + 3 * shape.intermediate) * p \
        + 2 * 4 * s.engine_max_num_seqs * shape.vocab
    return CUDA_CONTEXT_BYTES + shape.params() * p + lora + kv + workspace


# --------------------------------------------------------------------------- from a medrl config
BUILTIN_SHAPES = {"qwen3-1.7b": QWEN3_1P7B}
"""Shapes used when the model is not on this machine, by the last part of ``model.path`` (lower case)."""


def model_shape(model_cfg) -> tuple[ModelShape, str]:
    """The shape from the model directory's config.json, else from ``BUILTIN_SHAPES``, else (a tiny model a stage
    would build, ``model.build_tiny_if_missing``) from ``TinySpec``: an estimate never builds or downloads."""
    from medrl.models.loading import resolve_model_path

    if model_cfg.build_tiny_if_missing and not Path(model_cfg.path).expanduser().exists():
        from medrl.models.tiny import THINK_TOKENS, TinySpec

        t = TinySpec()
        shape = ModelShape(hidden=t.hidden_size, layers=t.num_hidden_layers, heads=t.num_attention_heads,
                           kv_heads=t.num_key_value_heads, head_dim=t.head_dim, intermediate=t.intermediate_size,
                           vocab=t.vocab_size + len(THINK_TOKENS), tied=True)
        return shape, f"tiny model shape ({model_cfg.path} not built yet)"
    try:
        path = resolve_model_path(model_cfg.path, model_cfg.cache_dir) / "config.json"
    except UsageError:
        builtin = BUILTIN_SHAPES.get(Path(model_cfg.path).name.lower())
        if builtin is None or Path(model_cfg.path).expanduser().is_dir():
            raise
        return builtin, f"built-in {Path(model_cfg.path).name} shape (model not downloaded)"
    try:
        return ModelShape.from_hf_config(json.loads(path.read_text(encoding="utf-8"))), str(path)
    except (json.JSONDecodeError, KeyError) as exc:
        raise UsageError(f"{path}: not a usable model config ({type(exc).__name__}: {exc})") from None


def _deepspeed(ppo) -> tuple[int, bool, bool]:
    """(ZeRO stage, optimizer offload, parameter offload) of ``ppo.learner.deepspeed``."""
    name = ppo.learner.deepspeed
    if not name:
        return 0, False, False
    path = Path(name)
    if not path.is_file():
        raise UsageError(f"ppo.learner.deepspeed: file not found: {name}")
    try:
        zero = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization", {})
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    offload = lambda key: (zero.get(key) or {}).get("device") in ("cpu", "nvme")  # noqa: E731
    return int(zero.get("stage", 0)), offload("offload_optimizer"), offload("offload_param")


def settings_from_config(cfg) -> MemorySettings:
    """What the estimate needs from a medrl config. The longest prompt is ``ppo.max_prompt_tokens`` when the PPO
    section has it, else ``data.max_question_tokens`` + ``PROMPT_OVERHEAD_TOKENS``."""
    ppo, model = cfg.ppo, cfg.model
    on_gpu = model.device == "cuda" or (model.device == "auto" and (ppo.learner.num_gpus > 0))
    dtype = model.dtype if model.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    stage, off_opt, off_param = _deepspeed(ppo)
    prompt = getattr(ppo, "max_prompt_tokens", None) or cfg.data.max_question_tokens + PROMPT_OVERHEAD_TOKENS
    rollout = ppo.rollout
    v = rollout.vllm
    shared = 0 < rollout.num_gpus < 1 and 0 < ppo.learner.num_gpus < 1
    colocated = min(rollout.num_actors, int((1 - ppo.learner.num_gpus) / rollout.num_gpus + 1e-9)) if shared else 0
    return MemorySettings(
        weight_bytes=4 if dtype == "float32" else 2, micro_batch=ppo.micro_batch_size, prompt_tokens=prompt,
        response_tokens=ppo.generation.max_new_tokens, lora_r=model.lora.r,
        lora_targets=tuple(model.lora.target_modules),
        gradient_checkpointing=model.gradient_checkpointing, value_head=ppo.uses_critic,
        entropy=ppo.log_entropy, zero_stage=stage, ranks=ppo.learner.ranks, offload_optimizer=off_opt,
        offload_params=off_param, cuda=on_gpu, behaviour_snapshots=ppo.async_rollout, colocated_rollouts=colocated,
        rollout_sequences=rollout.batch_size * ppo.samples_per_prompt, rollout_engine=rollout.engine,
        engine_kv_cache_bytes=int(v.kv_cache_gib * GiB) if v.kv_cache_gib else None,
        engine_max_num_seqs=v.max_num_seqs, engine_max_lora_rank=v.max_lora_rank,
        engine_sleeps=v.sleep and not ppo.async_rollout and on_gpu)


ROWS = [("cuda_context", "CUDA context"), ("base_weights", "base weights"), ("lora_weights", "LoRA (+value head)"),
        ("lora_grads", "LoRA grads"), ("lora_optimizer", "Adam states"), ("snapshots", "async weight snapshots"),
        ("activations", "saved activations"),
        ("recompute", "recomputed layer + grads"), ("logits_forward", "logits, forward"),
        ("logits_backward", "logits, backward"), ("allocator_reserve", "allocator reserve"),
        ("learner_peak", "LEARNER PEAK"), ("rollouts", "rollout actors on this GPU"),
        ("rollouts_asleep", "  asleep while learning"), ("gpu_peak", "GPU PEAK")]


def run_estimate_memory(cfg) -> dict:
    """``medrl estimate-memory``: print the table and return it (GiB values, settings, fit per card size)."""
    shape, source = model_shape(cfg.model)
    s = settings_from_config(cfg)
    parts = estimate(shape, s)
    alt = estimate(shape, replace(s, gradient_checkpointing=not s.gradient_checkpointing))
    on, off = (parts, alt) if s.gradient_checkpointing else (alt, parts)
    gib = {k: round(v / GiB, 3) for k, v in parts.items()}
    fits = {str(c): parts["gpu_peak"] <= (1 - HEADROOM) * c * GiB for c in CARDS_GIB}
    result = {"model": source, "shape": asdict(shape), "settings": asdict(s), "gib": gib,
              "peak_gib": gib["gpu_peak"], "peak_checkpointing_on_gib": round(on["gpu_peak"] / GiB, 3),
              "peak_checkpointing_off_gib": round(off["gpu_peak"] / GiB, 3),
              "fits_with_headroom": fits}
    print(f"Expected peak {'GPU' if s.cuda else 'host'} memory per learner rank — {source}")
    print(f"  micro-batch {s.micro_batch} x ({s.prompt_tokens} prompt + {s.response_tokens} response) tokens, "
          f"{'bf16/fp16' if s.weight_bytes == 2 else 'fp32'} weights, LoRA r={s.lora_r}, "
          f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, ZeRO-{s.zero_stage} x {s.ranks} rank(s)")
    for key, label in ROWS:
        if key in parts:
            print(f"  {label:<28}{parts[key] / GiB:9.2f} GiB")
    if s.cuda and s.rollout_engine == "vllm" and not s.colocated_rollouts:  # the engine has a GPU of its own
        result["rollout_gpu_gib"] = round(vllm_engine_bytes(shape, s) / GiB, 3)
        print(f"  {'rollout engine, own GPU':<28}{result['rollout_gpu_gib']:9.2f} GiB")
    print(f"  peak with checkpointing on / off: {on['gpu_peak'] / GiB:.2f} / {off['gpu_peak'] / GiB:.2f} GiB")
    print("  fits with >= %d%% headroom: %s" % (100 * HEADROOM, ", ".join(
        f"{c} GiB {'yes' if fits[str(c)] else 'NO'}" for c in CARDS_GIB)))
    return result
