"""A loopback OpenAI-compatible judge server (aiohttp) for tests and benchmarks.

It speaks ``POST /v1/chat/completions`` on 127.0.0.1, answers with deterministic scores, counts requests per key
(the sha256 of the last user message), reports DeepSeek-style usage with ``prompt_cache_hit_tokens`` (the system
prompt is a cache hit after its first request) and injects faults that the graded answer asks for:

    [[fault:KIND]]     every request for this answer fails with KIND
    [[fault:KIND*N]]   the first N requests fail, later ones succeed
    KIND: 429 (with Retry-After), 500, 503, timeout (hangs), empty (empty content), malformed (invalid JSON)
    [[score:N]]        every dimension scores N (else the scores come from the key's hash: ``expected_scores``)
    [[equivalent:X]]   the verifier's verdict is X (yes / no; else yes when the reference is in the answer)
    [[criteria:N]]     a rubric generation request gets N criteria (else as many as the prompt's lower bound)
    [[met:X]]          every rubric criterion's verdict is X (yes / no; else ``expected_criteria``)
    [[leak:X]]         (in a doctor's question) the simulated patient says X, unless asked again after a leak
    [[leak!:X]]        the simulated patient always says X

Simulated-patient prompts (``medrl/consult/patient.py``) are answered by ``patient_reply``: the case facts whose
field the doctor's last question names (the scripted patient's cues), as ``{"reply"}``.

Rubric grader prompts (``medrl/reward/criteria.py``, one criterion or a numbered batch) are answered with
``{"explanation", "criteria_met"}`` per criterion, decided like a naive grader: met when the response holds at least
60 % of the criterion's content terms anywhere (so it can be fooled by echoed criteria: the reward's gaming guard
must stop those before they are sent).

With ``models`` set, a request for any other model gets 404 "model not found" (as a provider answers an unknown
model name); with ``api_key`` set, a request without that bearer key gets 401.

``GET /stats`` returns the counters, ``POST /reset`` clears them, ``POST /config`` changes latency_s at run time.
``LoopbackJudge`` runs it in a subprocess (so its CPU is not the client's) and stops it on exit.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from functools import lru_cache
from pathlib import Path

from aiohttp import web

from medrl.reward.criteria import RESPONSE_CLOSE, RESPONSE_OPEN
from medrl.reward.rubric import DIMENSIONS
from medrl.reward.rubric_guard import content_terms, term_in
from medrl.reward.text import en_words, estimate_tokens, normalise, root

FAULT_MARK = re.compile(r"\[\[fault:(429|500|503|timeout|empty|malformed)(?:\*(\d+))?\]\]")
SCORE_MARK = re.compile(r"\[\[score:(\d+)\]\]")
EQUIVALENT_MARK = re.compile(r"\[\[equivalent:(yes|no)\]\]")
CRITERIA_MARK = re.compile(r"\[\[criteria:(\d+)\]\]")
MET_MARK = re.compile(r"\[\[met:(yes|no)\]\]")
LEAK_MARK = re.compile(r"\[\[leak(!?):([^\]]+)\]\]")
_CRITERION_LINE = re.compile(r"^(?:\d+\. )?\[[-+]?[\d.]+ points\] (.*)$")


def request_key(user_content: str) -> str:
    return hashlib.sha256(user_content.encode("utf-8")).hexdigest()[:16]


def expected_equivalent(user_content: str) -> str:
    """The verifier verdict (yes / no) the server gives: ``[[equivalent:yes|no]]`` in the request, else the reference
    (the line after ``REFERENCE ANSWER:``) found in the answer, case-insensitively."""
    m = EQUIVALENT_MARK.search(user_content)
    if m:
        return m.group(1)
    ref = user_content.split("REFERENCE ANSWER:\n", 1)[-1].split("\n", 1)[0].strip().lower()
    answer = user_content.split("<<<ANSWER>>>", 1)[-1].lower()
    return "yes" if ref and ref in answer else "no"


def generated_rubric(system: str, user_content: str) -> dict:
    """The rubric the server writes for a generation request (``medrl/reward/rubric_gen.py``'s prompt): one
    criterion per sentence of the reference (the text after ``REFERENCE ANSWER:``), the first Essential, the others
    Important, then Optional fillers and one Pitfall, as many as the prompt's lower bound (or ``[[criteria:N]]``)."""
    bounds = re.search(r"between (\d+) and (\d+)\s+criteria", system)
    mark = CRITERIA_MARK.search(user_content)
    count = int(mark.group(1)) if mark else int(bounds.group(1)) if bounds else 7
    reference = user_content.split("REFERENCE ANSWER:\n", 1)[-1].rsplit("\n\nReturn the json rubric.", 1)[0]
    sentences = [s.strip() for s in re.split(r"(?<=[.!?。！？])\s*|\n+", reference) if s.strip()]
    criteria = [{"criterion": f"States that {s}", "category": "Essential" if k == 0 else "Important",
                 "axis": "accuracy" if k == 0 else "completeness"} for k, s in enumerate(sentences[:count - 1])]
    criteria.append({"criterion": "Tells the user that no medical care is ever needed.", "category": "Pitfall",
                     "axis": "accuracy"})
    criteria += [{"criterion": f"Explains point {k} in plain language.", "category": "Optional",
                  "axis": "communication_quality"} for k in range(1, count - len(criteria) + 1)]
    return {"criteria": criteria[:count]}


def expected_criteria(user_content: str) -> list[bool]:
    """The verdicts the server gives a rubric grader request: ``[[met:yes|no]]`` in the response, else a naive
    term match of each criterion (in order) against the text between the response markers."""
    response = user_content.split(RESPONSE_OPEN, 1)[-1].split(RESPONSE_CLOSE, 1)[0]
    criteria = [m.group(1) for line in user_content.rsplit(RESPONSE_CLOSE, 1)[-1].splitlines()
                if (m := _CRITERION_LINE.match(line.strip()))]
    mark = MET_MARK.search(response)
    if mark:
        return [mark.group(1) == "yes"] * len(criteria)
    words = {root(w) for w in en_words(normalise(response))}
    out = []
    for criterion in criteria:
        terms = content_terms(criterion)
        found = sum(term_in(t, response, words) for t in terms)
        out.append(bool(terms) and found >= 0.6 * len(terms))
    return out


def _grade(system: str, user: str, key: str) -> str:
    verdicts = expected_criteria(user)
    if '"criteria": [' in system:  # all criteria of a response in one call
        return json.dumps({"criteria": [{"id": n, "explanation": f"loopback verdict {key}/{n}", "criteria_met": met}
                                        for n, met in enumerate(verdicts, 1)]})
    return json.dumps({"explanation": f"loopback verdict {key}", "criteria_met": verdicts[0] if verdicts else False})


def patient_reply(user: str) -> str:
    """The simulated patient's reply to a patient prompt (case facts + dialogue): the facts of the fields the last
    doctor line's cues name (``medrl.consult.patient.FIELD_CUES``), else "I don't know"."""
    from medrl.consult.patient import FIELD_CUES, RETRY_NOTE

    case = user.split("<<<CASE>>>", 1)[-1].split("<<<END CASE>>>", 1)[0]
    facts = dict(line.split(": ", 1) for line in case.strip().splitlines() if ": " in line)
    question = [line for line in user.splitlines() if line.startswith("Doctor: ")][-1][len("Doctor: "):]
    leak = LEAK_MARK.search(question)
    if leak and (leak.group(1) == "!" or RETRY_NOTE not in user):
        return json.dumps({"reply": f"I read online that it is {leak.group(2)}."})
    zh = facts.get("language") == "zh"
    told = [facts[f] for f, (en, cn) in FIELD_CUES.items() if f in facts and re.search(cn if zh else en, question,
                                                                                         0 if zh else re.I)]
    return json.dumps({"reply": " ".join(told) or ("我不知道。" if zh else "I don't know, doctor.")},
                      ensure_ascii=False)


def expected_scores(user_content: str) -> dict[str, int]:
    """The scores the server gives a request whose last user message is ``user_content``."""
    m = SCORE_MARK.search(user_content)
    if m:
        return dict.fromkeys(DIMENSIONS, min(10, int(m.group(1))))
    digest = hashlib.sha256(user_content.encode("utf-8")).digest()
    return {d: digest[i] % 11 for i, d in enumerate(DIMENSIONS)}


class _State:
    def __init__(self, latency_s: float, api_key: str | None, retry_after_ms: int, hang_s: float,
                 models: list[str] | None = None):
        self.latency_s, self.api_key, self.retry_after_ms, self.hang_s = latency_s, api_key, retry_after_ms, hang_s
        self.models = models
        self.reset()

    def reset(self) -> None:
        self.requests: Counter = Counter()
        self.served: Counter = Counter()
        self.faults: Counter = Counter()
        self.unauthorized = 0
        self.seen_prefixes: set[str] = set()


@lru_cache(maxsize=64)
def _prefix_tokens(system: str) -> int:
    return estimate_tokens(system)


def _completion(model: str, content: str, messages: list[dict], state: _State) -> dict:
    system = "".join(m["content"] for m in messages if m.get("role") == "system")
    prefix = _prefix_tokens(system)
    prompt_tokens = prefix + sum(estimate_tokens(m.get("content") or "") for m in messages if m.get("role") != "system")
    hit = prefix if system in state.seen_prefixes else 0
    state.seen_prefixes.add(system)
    completion_tokens = estimate_tokens(content)
    return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens, "prompt_cache_hit_tokens": hit,
                      "prompt_cache_miss_tokens": prompt_tokens - hit}}


async def _chat(request: web.Request) -> web.Response:
    state: _State = request.app["state"]
    if state.api_key is not None and request.headers.get("Authorization") != f"Bearer {state.api_key}":
        state.unauthorized += 1
        return web.json_response({"error": {"message": "invalid api key", "type": "authentication_error"}},
                                 status=401)
    body = await request.json()
    if state.models is not None and body.get("model") not in state.models:
        return web.json_response({"error": {"message": f"model {body.get('model')!r} not found",
                                            "type": "invalid_request_error"}}, status=404)
    messages = body["messages"]
    user = messages[-1]["content"]
    key = request_key(user)
    state.requests[key] += 1
    attempt = state.requests[key]
    if state.latency_s > 0:
        await asyncio.sleep(state.latency_s)
    fault = FAULT_MARK.search(user)
    content = None
    if fault and (fault.group(2) is None or attempt <= int(fault.group(2))):
        kind = fault.group(1)
        state.faults[kind] += 1
        if kind == "429":
            return web.json_response({"error": {"message": "rate limited", "type": "rate_limit"}}, status=429,
                                     headers={"Retry-After": str(max(1, state.retry_after_ms // 1000)),
                                              "retry-after-ms": str(state.retry_after_ms)})
        if kind in ("500", "503"):
            return web.json_response({"error": {"message": "server busy", "type": "server_error"}},
                                     status=int(kind))
        if kind == "timeout":
            await asyncio.sleep(state.hang_s)
        content = {"empty": "", "malformed": '{"accuracy": 7, "safety": '}.get(kind)
    if content is None and "playing a patient" in messages[0]["content"]:  # the simulated patient
        content = patient_reply(user)
    if content is None and "Rubrics as Rewards" in messages[0]["content"]:  # rubric generation
        content = json.dumps(generated_rubric(messages[0]["content"], user), ensure_ascii=False)
    if content is None and '"criteria_met"' in messages[0]["content"]:  # the rubric grader
        content = _grade(messages[0]["content"], user, key)
    if content is None and '"equivalent"' in messages[0]["content"]:  # the verifier's rubric (yes/no json)
        content = json.dumps({"equivalent": expected_equivalent(user), "reason": f"loopback verdict {key}"})
    if content is None:
        content = json.dumps({**expected_scores(user), "reason": f"loopback verdict {key}"})
    state.served[key] += 1
    return web.json_response(_completion(body.get("model", "loopback"), content, messages, state))


async def _stats(request: web.Request) -> web.Response:
    s: _State = request.app["state"]
    return web.json_response({"requests": dict(s.requests), "served": dict(s.served), "faults": dict(s.faults),
                              "total": sum(s.requests.values()), "unauthorized": s.unauthorized})


async def _reset(request: web.Request) -> web.Response:
    request.app["state"].reset()
    return web.json_response({"ok": True})


async def _config(request: web.Request) -> web.Response:
    body = await request.json()
    request.app["state"].latency_s = float(body["latency_s"])
    return web.json_response({"ok": True})


def make_app(state: _State) -> web.Application:
    app = web.Application()
    app["state"] = state
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/stats", _stats)
    app.router.add_post("/reset", _reset)
    app.router.add_post("/config", _config)
    return app


class LoopbackJudge:
    """Runs the server in a subprocess on 127.0.0.1:<free port>; a context manager that stops it."""

    def __init__(self, latency_s: float = 0.0, api_key: str | None = None, retry_after_ms: int = 50,
                 hang_s: float = 30.0, models: list[str] | None = None):
        self.args = ["--latency", str(latency_s), "--retry-after-ms", str(retry_after_ms), "--hang", str(hang_s)]
        if models is not None:
            self.args += ["--models", ",".join(models)]
        self.api_key = api_key
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "LoopbackJudge":
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, LOOPBACK_JUDGE_KEY=self.api_key or "")
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "medrl.testing.loopback_server", "--port", str(self.port),
                                      *self.args], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                     stderr=self._log)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError("loopback judge failed to start:\n" + self._log.read().decode(errors="replace"))
            try:
                self.stats()
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("loopback judge did not answer in 30 s")

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def stats(self) -> dict:
        return self._call("/stats")

    def reset(self) -> None:
        self._call("/reset", {})

    def set_latency(self, latency_s: float) -> None:
        self._call("/config", {"latency_s": latency_s})

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--retry-after-ms", type=int, default=50)
    p.add_argument("--hang", type=float, default=30.0)
    p.add_argument("--models", default=None, help="comma-separated model names served (default: any)")
    a = p.parse_args()
    state = _State(a.latency, os.environ.get("LOOPBACK_JUDGE_KEY") or None, a.retry_after_ms, a.hang,
                   a.models.split(",") if a.models else None)
    web.run_app(make_app(state), host="127.0.0.1", port=a.port, access_log=None, print=None,
                handle_signals=True, backlog=1024)


if __name__ == "__main__":
    main()
