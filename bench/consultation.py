"""Consultation rollouts vs the same cases single turn: dialogues/s and patient calls per dialogue, with the LLM
patient on the loopback server (200 ms per call by default) through the real client, gate and judge store.

Prints one table: mode, dialogues, wall time, dialogues/s, policy turns and patient calls per dialogue, and the
patient time the calls would cost one after another. The same dialogues run against a server answering at once and
one taking ``--latency`` per call: the wall-time difference is what the latency really cost (calls of a turn run
concurrently across the batch, so about turns x latency, not calls x latency). A last pass replays from the store
(a resumed run: no calls).

    .venv/bin/python bench/consultation.py                      # tiny model, 7 cases x 2 dialogues, 3 turns
    .venv/bin/python bench/consultation.py --latency 0.2 --samples 4 --turns 4 --tokens 32
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the tiny Qwen3, built in a temp dir)")
    parser.add_argument("--cases", default="data/samples/consultation/cases.jsonl")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--latency", type=float, default=0.2, help="loopback seconds per patient call")
    args = parser.parse_args()

    from pydantic import SecretStr
    from transformers import AutoModelForCausalLM

    from medrl.config import load_config
    from medrl.consult.cases import load_cases
    from medrl.consult.dialogue import hf_turns
    from medrl.consult.engine import ConsultSpec, PatientSpec, llm_patient, patient_judge_config, play
    from medrl.consult.protocol import whole_case_turns
    from medrl.models.chat import render_prompt
    from medrl.models.generation import generate
    from medrl.models.loading import load_tokenizer
    from medrl.models.tiny import build_tiny_model
    from medrl.reward.ledger import Ledger, local_gate
    from medrl.reward.text import key_terms
    from medrl.testing.loopback_server import LoopbackJudge

    tmp = Path(tempfile.mkdtemp(prefix="bench-consult-"))
    model_dir = Path(args.model) if args.model else build_tiny_model(tmp / "tiny-qwen3")
    tok = load_tokenizer(str(model_dir), None)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cases = load_cases(args.cases)
    n = len(cases) * args.samples
    rows = []

    t0 = time.perf_counter()
    prompts = [render_prompt(tok, None, whole_case_turns(c, "You are a careful doctor.")) for c in cases]
    generate(model, tok, prompts, max_new_tokens=args.tokens, temperature=1.0, num_return_sequences=args.samples,
             batch_size=len(prompts), seed=0)
    wall = time.perf_counter() - t0
    rows.append(("single turn (case given whole)", n, wall, 1.0, 0.0, 0.0))

    key_terms("急性缺血性脑卒中 acute stroke", 8)  # warm up jieba (the leak check) outside the timings
    with LoopbackJudge(latency_s=0.0) as server:
        def spec_for(store: str) -> ConsultSpec:
            cfg = load_config(None, [f"reward.judge.base_url={server.base_url}", "reward.judge.max_retries=0",
                                     f"reward.cache.path={tmp / store}"])
            patient = PatientSpec("openai", 1, judge=patient_judge_config(cfg.consult, cfg.reward),
                                  cache=cfg.reward.cache, api_key=SecretStr("sk-bench"), prompt_version="patient-v1")
            return ConsultSpec(args.turns, args.tokens, 1.0, 1.0, "You are a careful doctor.", patient)

        # the same dialogues three times: a server answering at once, one taking --latency, then a replay
        for label, latency, store in (("interviewed, LLM patient at 0 ms", 0.0, "a.sqlite"),
                                      (f"interviewed, LLM patient at {args.latency * 1000:.0f} ms", args.latency,
                                       "b.sqlite"),
                                      ("interviewed, replayed from the store", args.latency, "b.sqlite")):
            server.set_latency(latency)
            spec = spec_for(store)
            loop = asyncio.new_event_loop()

            async def build():
                return llm_patient(spec.patient, local_gate(Ledger(0, 0, None), lease_size=16))

            patient = loop.run_until_complete(build())
            t0 = time.perf_counter()
            samples = play(hf_turns(model, tok, spec, 0), tok, [(i, c) for i, c in enumerate(cases)], args.samples,
                           spec, patient, loop)
            wall = time.perf_counter() - t0
            loop.run_until_complete(patient.close())
            loop.close()
            turns = sum(s.dialogue["policy_turns"] for s in samples) / n
            calls = sum(s.dialogue["patient_calls"] for s in samples) / n
            rows.append((label, n, wall, turns, calls, latency))

    print(f"model {model_dir}, {len(cases)} cases x {args.samples} dialogues, max {args.turns} turns x "
          f"{args.tokens} tokens, patient latency {args.latency * 1000:.0f} ms")
    print(f"{'mode':40s} {'dialogues':>9s} {'wall s':>8s} {'dial/s':>8s} {'turns':>6s} {'calls/dial':>10s} "
          f"{'serial patient s':>16s}")
    for label, count, wall, turns, calls, latency in rows:
        print(f"{label:40s} {count:9d} {wall:8.2f} {count / wall:8.2f} {turns:6.2f} {calls:10.2f} "
              f"{calls * count * latency:16.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
