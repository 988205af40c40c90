"""How a judge call failed, as the judge (at run time) and the preflight (before Ray starts) both read it: errors no
call can survive (``JudgeSetupError``: a bad key, no permission, an unknown model) and the reason an endpoint cannot be
reached. Imports nothing of the store, so the HTTP client does not."""
from __future__ import annotations

import socket
import ssl

from medrl.errors import UsageError
from medrl.reward.config import JudgeConfig


class JudgeSetupError(UsageError):
    """The judge cannot work at all (bad key, no permission, unknown model): stop, never count it per sample."""


def fatal_judge_error(exc: Exception, jc: JudgeConfig) -> str | None:
    """A one-line reason when ``exc`` means no judgement can ever succeed (401/403, unknown model), else None
    (timeouts, 429, 5xx and malformed replies are ordinary per-sample failures)."""
    import openai  # lazily: ``medrl judge --help`` and usage errors stay fast

    if not isinstance(exc, openai.APIStatusError):
        return None
    status, message = exc.status_code, str(exc.message)[:160]
    if status == 401:
        return (f"the judge at {jc.base_url} refused the API key (HTTP 401: {message}): check "
                f"${jc.api_key_env}")
    if status == 403:
        return f"the judge at {jc.base_url} denied access (HTTP 403: {message}): the key lacks permission"
    model_words = ("model not exist", "model_not_found", "does not exist", "unknown model", "no such model")
    if status == 404 or (status == 400 and any(w in message.lower() for w in model_words)):
        return (f"the judge at {jc.base_url} does not know model {jc.model!r} (HTTP {status}: {message}): check "
                f"reward.judge.model and reward.judge.base_url")
    return None


def connection_failure(exc: BaseException) -> str | None:
    """What stopped a request from reaching the judge, from the exception's causes: ``connection refused``, ``DNS
    lookup failed (...)`` or ``TLS handshake failed (...)``; None for anything else (a timeout, an HTTP error). Read
    from the causes because openai's aiohttp transport reports every failed connect as a timeout."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return f"DNS lookup failed ({e.strerror or e})"
    tls = [e for e in chain if isinstance(e, ssl.SSLError)]
    if tls:  # the innermost one holds the reason
        return f"TLS handshake failed ({getattr(tls[-1], 'reason', None) or tls[-1]})"
    return None
