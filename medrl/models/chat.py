"""Turning a question or a conversation (and optionally a target output) into Qwen3 chat messages and prompt text:
the one rendering every stage uses (SFT, RL rollouts, eval, the demo)."""
from __future__ import annotations

from collections.abc import Sequence

Turns = str | Sequence[dict]
"""A conversation before the answer: ``[{role, content}, ...]`` ending with a user turn, or one question (one user
turn)."""


def conversation(item: dict, text: str) -> list[dict]:
    """The turns a model answers for a record or an RL prompt row: its ``messages`` with the last user turn worded as
    ``text`` (the question, an RL row's prompt, or the eval's MCQ wording of it), or ``text`` alone as one user
    turn."""
    earlier = (item.get("messages") or [])[:-1]
    return [*({"role": t["role"], "content": t["content"]} for t in earlier), {"role": "user", "content": text}]


def messages_for(system_prompt: str | None, turns: Turns, output: str | None = None) -> list[dict]:
    """Chat messages: our system prompt first unless the conversation opens with its own system turn, the turns,
    then ``output`` as the assistant's answer when given."""
    turns = [{"role": "user", "content": turns}] if isinstance(turns, str) else [dict(t) for t in turns]
    own_system = bool(turns) and turns[0]["role"] == "system"
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt and not own_system else []
    msgs += turns
    if output is not None:
        msgs.append({"role": "assistant", "content": output})
    return msgs


def render_prompt(tokenizer, system_prompt: str | None, turns: Turns) -> str:
    """Prompt text ending with the assistant header; thinking stays on, so the model opens its own <think> block.
    Earlier assistant turns are rendered by the chat template (Qwen3 drops their think blocks)."""
    return tokenizer.apply_chat_template(messages_for(system_prompt, turns), tokenize=False,
                                         add_generation_prompt=True)
