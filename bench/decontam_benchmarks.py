"""Decontamination false positives on the real benchmark files (``../shared/data/benchmarks``), before and after the
stock-phrasing rule.

Method: each file is split in two halves by a hash of the record id. Half A is indexed as eval items (question +
reference, as ``prepare`` indexes benchmark items), half B is checked as if it were a training split of the same
exam (question + think + answer). The halves hold different questions, so a hit is a false positive unless the two
questions really are copies of each other (the files hold some repeated questions: exact duplicates of the
question skeleton are counted and listed separately, and any other hit is printed for inspection).

"before": every shared 64-character run counts (``data.decontam_phrase_items: null``, the old behaviour);
"after": a run needs >= 32 characters outside the windows found in >= N eval items (default N = 3), the rest is
stock phrasing. Recall is checked too: every half-A question, copied with its first number changed, must still be
flagged.

    .venv/bin/python bench/decontam_benchmarks.py          # ~10 s
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from difflib import SequenceMatcher
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medrl.data.clean import Decontaminator, key64, skeleton  # noqa: E402
from medrl.data.config import DataConfig, SourceSpec  # noqa: E402
from medrl.data.sources import iter_rows, resolve_spec, source_files  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
FILES = {"medqa-usmle": ("huatuo-eval", BENCH / "medqa-usmle" / "medqa_usmle_test.json"),
         "cmexam": ("medllm-qa", BENCH / "cmexam" / "cmexam.jsonl")}


def load(name: str, fmt: str, path: Path) -> tuple[list[dict], int]:
    data = DataConfig(catalog={name: SourceSpec(format=fmt, path=str(path))})
    spec = resolve_spec(data, name)
    rows = list(iter_rows(name, spec, source_files(name, spec, data), data.max_row_bytes))
    return [r.record for r in rows if r.record], sum(r.error is not None for r in rows)


def check(records: list[dict], phrase_items: int | None, run_chars: int = 64) -> tuple[int, int, list]:
    half_a = [r for r in records if int(r["id"], 16) % 2 == 0]
    half_b = [r for r in records if int(r["id"], 16) % 2 == 1]
    dec = Decontaminator(run_chars, phrase_items)
    by_label = {}
    for r in half_a:
        dec.add(r["id"], r["question"] + "\x00" + (r["reference"] or ""))
        by_label[r["id"]] = r
    dec.freeze()
    hits = dec.find_many(["\x00".join((r["question"], r["think"], r["answer"])) for r in half_b])
    same, other = 0, []
    for r, hit in zip(half_b, hits):
        if hit is None:
            continue
        if key64(skeleton(r["question"])) == key64(skeleton(by_label[hit]["question"])):
            same += 1  # a repeated question: a true positive
        else:
            a, b = r["question"].lower(), by_label[hit]["question"].lower()
            m = SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
            other.append(a[m.a:m.a + m.size])  # the longest shared run
    # recall: every half-A question copied with a small edit (its first number changed, as a paraphrasing copier
    # would) must still be flagged
    copies = [re.sub(r"\d+", lambda m: str(int(m.group()) + 1), r["question"], count=1) for r in half_a]
    caught = sum(hit is not None for hit in dec.find_many(copies))
    return len(half_b), same, other, caught, len(half_a)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phrase-items", type=int, default=DataConfig().decontam_phrase_items)
    ap.add_argument("--show", type=int, default=3, help="hits printed per file and setting")
    args = ap.parse_args()
    for name, (fmt, path) in FILES.items():
        t0 = time.perf_counter()
        records, rejected = load(name, fmt, path)
        print(f"{name}: {len(records)} rows loaded, {rejected} rejected ({time.perf_counter() - t0:.1f} s)")
        for label, items in (("before (every run)", None), (f"after (phrase_items={args.phrase_items})",
                                                            args.phrase_items)):
            t0 = time.perf_counter()
            n, same, other, caught, copies = check(records, items)
            print(f"  {label}: {same + len(other)} of {n} half-B rows flagged: {same} repeated questions "
                  f"(true positives), {len(other)} other; edited copies of half-A questions caught: "
                  f"{caught} of {copies} ({time.perf_counter() - t0:.1f} s)")
            for run in other[:args.show]:
                print(f"    longest shared run: {run[:200]!r}")


if __name__ == "__main__":
    main()
