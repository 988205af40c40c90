"""Turning a question (and optionally a target output) into Qwen3 chat messages and prompt text."""
from __future__ import annotations


def messages_for(system_prompt: str | None, question: str, output: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    msgs.append({"role": "user", "content": question})
    if output is not None:
        msgs.append({"role": "assistant", "content": output})
    return msgs


def render_prompt(tokenizer, system_prompt: str | None, question: str) -> str:
    """Prompt text ending with the assistant header; thinking stays on, so the model opens its own <think> block."""
    return tokenizer.apply_chat_template(messages_for(system_prompt, question), tokenize=False,
                                         add_generation_prompt=True)
