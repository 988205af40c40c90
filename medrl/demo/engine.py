"""What the demo runs: one base model with the run's LoRA adapters switched per answer (peft multi-adapter), answers
streamed token by token, and the configured teacher judge (the reward plane's ``Scorer``: cache, rules, budget and
rate limits through a ``Ledger``) scoring them on demand.

Only one answer is generated at a time (a lock): the active adapter is model-wide state. Memory is one base model
plus the adapters, so Qwen3-1.7B with two adapters fits one 16 GB GPU, and the tiny model runs on CPU.
"""
from __future__ import annotations

import asyncio
import contextlib
import html
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from medrl.models.chat import Turns, render_prompt
from medrl.models.generation import eos_ids
from medrl.models.loading import load_causal_lm, load_tokenizer
from medrl.reward.config import RewardConfig
from medrl.reward.ledger import Ledger, local_gate
from medrl.reward.rubric import DIMENSIONS
from medrl.reward.text import THINK_CLOSE, THINK_OPEN
from medrl.reward.types import RewardInput, RewardResult

MODEL_NAMES = ("base", "sft", "rl")


class DemoModels:
    def __init__(self, model_cfg, adapters: dict[str, Path]):
        """``adapters``: {"sft": dir, "rl": dir} for those that exist; "base" is the model with adapters off."""
        from peft import PeftModel

        self.cfg = model_cfg
        self.tokenizer = load_tokenizer(model_cfg.path, model_cfg.cache_dir)
        model = load_causal_lm(model_cfg.path, dtype=model_cfg.dtype, device=model_cfg.device,
                               cache_dir=model_cfg.cache_dir)
        for k, (name, path) in enumerate(adapters.items()):
            if k == 0:
                model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
            else:
                model.load_adapter(str(path), adapter_name=name)
        self.model = model.eval()
        self.available = ["base", *adapters]
        self.eos = eos_ids(self.model.generation_config, self.tokenizer)
        self._lock = threading.Lock()

    def _adapter(self, name: str):
        if name not in self.available:
            raise ValueError(f"no {name} model in this run")
        if not hasattr(self.model, "disable_adapter"):
            return contextlib.nullcontext()
        if name == "base":
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    def stream(self, name: str, turns: Turns, max_new_tokens: int = 512, temperature: float = 0.0,
               seed: int = 0) -> Iterator[str]:
        """The response of model ``name`` (base, sft, rl) to a question or a conversation so far, after every decoded
        piece."""
        prompt = render_prompt(self.tokenizer, self.cfg.system_prompt, turns)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for text, _ in self.stream_ids(name, ids, max_new_tokens, temperature, seed):
            yield text

    def stream_ids(self, name: str, input_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                   seed: int = 0) -> Iterator[tuple[str, list[int] | None]]:
        """Model ``name`` continuing ``input_ids``: ``(text so far, None)`` after every decoded piece, then ``(text,
        the new token ids)`` once (up to and including the EOS that ended it, if one did)."""
        import torch
        from transformers import TextIteratorStreamer

        tok = self.tokenizer
        device = next(self.model.parameters()).device
        ids = torch.tensor([input_ids], device=device)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
        sample = temperature > 0
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                      do_sample=sample, temperature=temperature if sample else None, top_p=None, top_k=None,
                      streamer=streamer, eos_token_id=sorted(self.eos),
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else min(self.eos))
        stop = threading.Event()  # set when the page goes away mid-answer: generation ends at the next token
        kwargs["stopping_criteria"] = [lambda ids, scores, **_: torch.full((ids.shape[0],), stop.is_set(),
                                                                           dtype=torch.bool, device=ids.device)]
        with self._lock, self._adapter(name):
            if sample:
                torch.manual_seed(seed)
            errors: list[BaseException] = []
            out: list[list[int]] = []

            def work():
                try:
                    with torch.no_grad():
                        out.append(self.model.generate(**kwargs)[0, len(input_ids):].tolist())
                except BaseException as exc:  # surfaced below, after the streamer is released
                    errors.append(exc)
                    streamer.end()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            text = ""
            try:
                for piece in streamer:
                    text += piece
                    yield text, None
            finally:  # the adapter and the lock are released only once generation has stopped
                stop.set()
                thread.join()
            if errors:
                raise errors[0]
        yield text, out[0]


def render_turns(turns: list[dict]) -> str:
    """HTML of the turns before the question (an example conversation's earlier turns); empty for none."""
    if not turns:
        return ""
    rows = "".join(f'<div class="medrl-turn" data-role="{html.escape(t["role"])}"><b>{html.escape(t["role"])}</b>: '
                   f'<span class="medrl-turn-text">{html.escape(t["content"])}</span></div>' for t in turns)
    return f'<div class="medrl-turns"><p><i>Conversation so far ({len(turns)} turns)</i></p>{rows}</div>'


def render_response(text: str, done: bool) -> str:
    """HTML of a (partial) response: the ``<think>`` block folded (open while the model is still thinking), then the
    final answer."""
    think, answer = None, text
    if THINK_OPEN in text or THINK_CLOSE in text:
        head, sep, tail = text.partition(THINK_CLOSE)
        think = head.split(THINK_OPEN, 1)[-1].strip()
        answer = tail.strip() if sep else ""
        thinking = not sep
    else:
        thinking = False
    parts = [f'<div class="medrl-response" data-done="{int(done)}">']
    if think is not None:
        label = "thinking…" if thinking and not done else f"reasoning ({len(think)} characters)"
        parts.append(f'<details class="medrl-think"{" open" if thinking and not done else ""}><summary>{label}'
                     f'</summary><div class="medrl-think-text">{html.escape(think)}</div></details>')
    if answer or done:
        shown = answer or ("[no final answer: the response stops inside &lt;think&gt;]" if think is not None else
                           "[empty response]")
        parts.append(f'<div class="medrl-answer">{html.escape(answer) if answer else shown}</div>')
    parts.append("</div>")
    return "".join(parts)


class DemoJudge:
    """The configured teacher judge for single answers; one ledger for the whole demo session, so the budget and
    rate limits of ``reward.judge`` hold across clicks, and the judge cache makes a repeated click free."""

    def __init__(self, cfg: RewardConfig):
        from medrl.reward.scoring import Scorer

        self.cfg = cfg
        jc = cfg.judge
        self.unavailable = ""
        key = None
        if jc.provider == "openai":
            key = os.environ.get(jc.api_key_env)
            if not key:
                self.unavailable = f"judge unavailable: the environment variable {jc.api_key_env} is not set"
        self.ledger = Ledger(jc.rpm, jc.tpm, jc.budget_usd)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="medrl-demo-judge")
        self._thread.start()
        self._scorer = None
        if not self.unavailable:
            async def make():
                return Scorer(cfg, local_gate(self.ledger, max(1, jc.concurrency // 4)), key)

            self._scorer = asyncio.run_coroutine_threadsafe(make(), self._loop).result()

    def score(self, items: list[RewardInput]) -> list[RewardResult]:
        if self._scorer is None:
            raise RuntimeError(self.unavailable)
        timeout = self.cfg.judge.timeout_s * (self.cfg.judge.max_retries + 1) * (self.cfg.judge.malformed_retries + 1)
        return self.run(self._scorer.score_batch(items), timeout + 30)

    def run(self, coro, timeout: float):
        """The result of ``coro`` run on the judge's event loop (where its client and an LLM patient live)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        if self._scorer is not None:
            asyncio.run_coroutine_threadsafe(self._scorer.close(), self._loop).result(30)
            self._scorer = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def render_scores(result: RewardResult, ledger_stats: dict) -> str:
    """HTML of one judged answer: the four rubric scores (0-10), teacher and reward, the status and reason, cost."""
    comp = result.components
    cells = "".join(f'<td data-dim="{d}">{round(10 * comp[f"judge.{d}"]) if f"judge.{d}" in comp else "–"}</td>'
                    for d in DIMENSIONS)
    teacher = "–" if result.teacher is None else f"{result.teacher:.3f}"
    budget = ledger_stats.get("budget_usd")
    spent = f"${ledger_stats.get('cost_usd', 0.0):.4f}" + ("" if budget is None else f" of ${budget:g}")
    reason = html.escape(result.reasons.get("judge", ""))
    flags = html.escape(", ".join(result.flags)) or "none"
    return (f'<div class="medrl-scores" data-status="{html.escape(result.judge_status)}">'
            f'<table><tr>{"".join(f"<th>{d}</th>" for d in DIMENSIONS)}<th>teacher</th><th>reward</th></tr>'
            f'<tr>{cells}<td data-dim="teacher">{teacher}</td><td data-dim="reward">{result.reward:.3f}</td></tr>'
            f'</table><p>{html.escape(result.judge)} · status <b>{html.escape(result.judge_status)}</b> · '
            f'cost ${result.cost_usd:.5f} · session spend {spent}</p><p>rule flags: {flags}</p>'
            f'<p class="medrl-reason">{reason}</p></div>')
