"""Checks of the judge set-up before any Ray actor starts or any step runs (pure of Ray): the API key variable, the
judgement cache file, and one call to the endpoint, so a wrong key or model name stops the run at once with one
line instead of turning every judgement into a failure and training on rules only.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from medrl.errors import UsageError
from medrl.reward.config import JudgeConfig, RewardConfig
from medrl.reward.judge_errors import JudgeSetupError, connection_failure, fatal_judge_error
from medrl.reward.store.database import store_url

log = logging.getLogger("medrl.reward")

SQLITE_MAGIC = b"SQLite format 3\x00"


def judge_api_key(jc: JudgeConfig) -> str:
    key = os.environ.get(jc.api_key_env)
    if not key:
        raise UsageError(f"reward.judge.provider is 'openai' but the environment variable {jc.api_key_env} "
                         f"(reward.judge.api_key_env) is not set")
    return key


def check_cache_file(path: str | Path) -> None:
    """A judge cache that SQLite cannot use fails here with one line naming the file, what is wrong and what to
    do; the file is only read (opened read-only), never modified."""
    p = Path(path).expanduser()
    if not p.exists():
        return
    fix = (f"it was not modified: move it aside (mv {p} {p}.bad) to start an empty cache, or set "
           f"reward.cache.path to another file")
    if p.is_dir():
        raise UsageError(f"judge cache {p} is a directory, not an SQLite file; set reward.cache.path to a file")
    with open(p, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if not head:
        return  # an empty file is an empty database
    if head != SQLITE_MAGIC:
        raise UsageError(f"judge cache {p} is not an SQLite database (wrong header); {fix}")
    try:
        # immutable: no -wal/-shm files are created next to it; with a live writer (its -wal exists) read-only
        mode = "ro" if Path(f"{p}-wal").exists() else "ro&immutable=1"
        db = sqlite3.connect(f"{p.resolve().as_uri()}?mode={mode}", uri=True, timeout=30)
        try:
            columns = {row[1] for row in db.execute("PRAGMA table_info(judgements)")}
            if columns:
                missing = {"key", "judge", "rubric_version", "accuracy", "safety", "completeness", "clarity",
                           "reason"} - columns
                if missing:
                    raise UsageError(f"judge cache {p} has a 'judgements' table of another schema (no "
                                     f"{', '.join(sorted(missing))}); {fix}")
                db.execute("SELECT COUNT(*), MAX(LENGTH(reason)) FROM judgements").fetchone()  # reads every page
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"judge cache {p} is damaged ({exc}); {fix}") from None


def probe_judge(jc: JudgeConfig, api_key: str) -> None:
    """One tiny chat call (a few tokens, outside the budget ledger): a key, permission or model error, or an endpoint
    that cannot be reached at all (connection refused, DNS, TLS), raises JudgeSetupError; a transient error
    (timeout, 429, 5xx) is only a warning."""
    import openai

    client = openai.OpenAI(base_url=jc.base_url, api_key=api_key, timeout=jc.timeout_s, max_retries=jc.max_retries)
    body = {"model": jc.model, "messages": [{"role": "user", "content": "Reply with the json {\"ok\": 1}."}],
            "max_tokens": 8, "temperature": 0}
    try:
        client.post("/chat/completions", body=body, cast_to=dict)
    except openai.APIError as exc:
        reason = fatal_judge_error(exc, jc)
        unreachable = connection_failure(exc) if isinstance(exc, openai.APIConnectionError) else None
        if unreachable is not None:
            reason = f"the judge at {jc.base_url} cannot be reached: {unreachable}: check reward.judge.base_url"
        if reason is not None:
            raise JudgeSetupError(reason.replace(api_key, "***")) from None
        log.warning("judge check call failed (%s): starting anyway, failures will be counted per sample",
                    str(exc).replace(api_key, "***")[:200])
    finally:
        client.close()


def check_judge(reward: RewardConfig, call: bool = True) -> None:
    """Everything about the judge that can be checked before Ray starts. ``call=False`` (a cost estimate, which
    only reads the store): the store alone, no API key needed and no probe call."""
    jc = reward.judge
    if jc.provider != "openai":
        return
    key = judge_api_key(jc) if call else None
    if reward.cache.backend == "sqlite":
        check_cache_file(reward.cache.path)
    else:
        store_url(reward.cache)  # the variable holding the database URL is set
    if key is not None:
        probe_judge(jc, key)
