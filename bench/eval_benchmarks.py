"""Eval throughput on CPU with the tiny Qwen3 over real benchmark items (``../shared/data/benchmarks``).

Generation goes through ``medrl.evaluation.evaluate.generate_model`` (what ``medrl eval`` runs: prompts rendered
with the MCQ template, longest first so that a batch holds similar lengths) and, as the baseline in the same run,
through ``medrl.models.generation.generate`` with the prompts in file order. Then the answers are read and scored
(``annotate``: strict + lenient extraction) and the accuracies with Wilson intervals are computed.

    .venv/bin/python bench/eval_benchmarks.py                      # 128 MedQA + 128 CMExam items, ~2 min
    .venv/bin/python bench/eval_benchmarks.py --items 512 --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from medrl.config import ModelConfig  # noqa: E402
from medrl.data.config import DataConfig, SourceSpec  # noqa: E402
from medrl.data.sources import iter_rows, resolve_spec, source_files  # noqa: E402
from medrl.evaluation.config import McqPrompt  # noqa: E402
from medrl.evaluation.evaluate import generate_model  # noqa: E402
from medrl.evaluation.metrics import annotate, set_metrics  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


def items(name: str, fmt: str, path: Path, n: int) -> list[dict]:
    data = DataConfig(catalog={name: SourceSpec(format=fmt, path=str(path))})
    spec = resolve_spec(data, name)
    out = []
    for row in iter_rows(name, spec, source_files(name, spec, data), data.max_row_bytes):
        if row.record:
            out.append(row.record)
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=128, help="items per benchmark")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    import torch

    from medrl.models.chat import render_prompt
    from medrl.models.generation import generate
    from medrl.models.loading import load_policy, load_tokenizer
    from medrl.models.tiny import build_tiny_model

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sets = {"medqa": items("medqa", "huatuo-eval", BENCH / "medqa-usmle" / "medqa_usmle_test.json", args.items),
            "cmexam": items("cmexam", "medllm-qa", BENCH / "cmexam" / "cmexam.jsonl", args.items)}
    mcq = McqPrompt()
    questions = {s: [mcq.render(it) for it in its] for s, its in sets.items()}
    decoding = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0, "top_p": 1.0,
                "batch_size": args.batch_size, "seed": 0}
    n = sum(len(v) for v in sets.values())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny")
        cfg = ModelConfig(path=str(model_dir), device="cpu", gradient_checkpointing=False)
        generate_model(cfg, None, {"warm": questions["medqa"][:2]}, decoding)  # load/compile once
        t0 = time.perf_counter()
        out = generate_model(cfg, None, questions, decoding)
        sorted_s = time.perf_counter() - t0
        tok = load_tokenizer(cfg.path)
        model = load_policy(cfg, None).eval()
        prompts = [render_prompt(tok, cfg.system_prompt, q) for qs in questions.values() for q in qs]
        t0 = time.perf_counter()
        generate(model, tok, prompts, **decoding)
        file_order_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = {s: [annotate({**it, "response": g["response"], "response_tokens": g["response_tokens"],
                          "finished": g["finished"], "rules": {}, "judge": None})
                for it, g in zip(its, out["outputs"][s])] for s, its in sets.items()}
    score_s = time.perf_counter() - t0
    print(f"{n} items ({', '.join(f'{s} {len(v)}' for s, v in sets.items())}), max_new_tokens "
          f"{args.max_new_tokens}, batch {args.batch_size}, {torch.get_num_threads()} thread(s), load "
          f"{os.getloadavg()[0]:.1f}")
    print(f"  generate, longest first (eval):  {n / sorted_s:7.2f} items/s ({sorted_s:.1f} s)")
    print(f"  generate, file order (baseline): {n / file_order_s:7.2f} items/s ({file_order_s:.1f} s)")
    print(f"  extract + score answers:         {n / score_s:7.0f} items/s")
    for s, rs in rows.items():
        m = set_metrics(rs)
        print(f"  {s}: accuracy strict {m['accuracy_strict']} {m['accuracy_strict_ci']}, lenient "
              f"{m['accuracy_lenient']} (random tiny model: chance or below is expected)")


if __name__ == "__main__":
    main()
