"""Throughput and memory of ``medrl prepare`` on synthetic records.

    .venv/bin/python bench/prepare.py                       # 25k and 100k records, char-estimate token counts
    .venv/bin/python bench/prepare.py --tokenizer DIR       # token counts with a real tokenizer directory

Each size runs in a fresh process (so peak RSS is that run's own) on a delicate-medical-format JSONL file (mixed
Chinese/English, ~1% exact and ~1% near duplicates). Prints records/s of run_prepare and peak RSS over the baseline
after imports: the spool design keeps no record text in memory, so the growth per record is a few hundred bytes.
Target: >= 5,000 records/s on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZH = ["头痛", "发热", "咳嗽", "胸闷", "腹泻", "失眠", "关节痛", "皮疹", "乏力", "头晕"]
EN = ["headache", "fever", "cough", "chest tightness", "diarrhoea", "insomnia", "joint pain", "rash", "fatigue"]


def synth(n: int, path: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if rng.random() < 0.6:
                a, b = rng.sample(ZH, 2)
                q = f"医生您好，我{rng.randint(18, 80)}岁，最近{rng.randint(2, 30)}天一直{a}，还有点{b}，编号{i}，需要做什么检查？"
                think = f"患者{a}伴{b}，病程{rng.randint(2, 30)}天。需要考虑感染、炎症和慢性病等原因，结合年龄评估。" * 4
                ans = f"建议先到医院查血常规和相关检查，明确{a}的原因；如出现高热、呼吸困难或意识改变，请立即就医。" * 3
            else:
                a, b = rng.sample(EN, 2)
                q = (f"I am {rng.randint(18, 80)} and have had {a} and {b} for {rng.randint(2, 30)} days "
                     f"(case {i}). What tests should I get?")
                think = f"The patient reports {a} with {b}. Consider infection, inflammation and chronic causes. " * 4
                ans = f"See a doctor for a blood count and targeted tests for {a}; seek urgent care if it worsens. " * 3
            if i % 100 == 1:  # exact duplicate question of the previous row
                q = prev_q
            elif i % 100 == 2:  # near duplicate
                q = prev_q.replace("？", "呢？").replace("?", " now?")
            prev_q = q
            f.write(json.dumps({"instruction": "", "question": q, "think": think, "answer": ans,
                                "metrics": {"quality_f1": 1.0}}, ensure_ascii=False) + "\n")


def child(n: int, data_file: str, root: str, tokenizer: str | None) -> None:
    from medrl.config import load_config
    from medrl.prepare.stage import run_prepare
    from medrl.runs import RunDir

    cfg = load_config(None, [f"run.root={root}", f"run.name=bench{n}", f"model.path={tokenizer or '/nonexistent'}",
                             "data.sources=[synthetic]", "data.catalog.synthetic.format=delicate-medical",
                             f"data.catalog.synthetic.path={data_file}", "data.rl_prompts=2000"])
    if tokenizer:  # the tokenizer's libraries are a fixed cost: count them in the baseline
        from medrl.models.loading import load_tokenizer

        load_tokenizer(tokenizer)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    summary = run_prepare(cfg, RunDir.from_config(cfg))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = summary["sources"]["synthetic"]["rows"]
    print(json.dumps({"records": rows, "seconds": round(dt, 2), "records_per_s": round(rows / dt),
                      "cpu_seconds": round(cpu, 2), "records_per_cpu_s": round(rows / cpu),
                      "baseline_rss_mib": round(base / 1024), "peak_rss_mib": round(peak / 1024),
                      "growth_mib": round((peak - base) / 1024), "train": summary["train"],
                      "duplicates": summary["duplicates"], "near_duplicates": summary["near_duplicates"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="25000,100000")
    ap.add_argument("--tokenizer", default=None, help="model/tokenizer directory (default: char estimate)")
    ap.add_argument("--child", nargs=3, metavar=("N", "FILE", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], args.child[2], args.tokenizer)
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="medrl_bench_prepare_") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            data = Path(tmp) / f"synthetic_{n}.jsonl"
            synth(n, data)
            cmd = [sys.executable, __file__, "--child", str(n), str(data), str(Path(tmp) / "runs")]
            if args.tokenizer:
                cmd += ["--tokenizer", args.tokenizer]
            out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            mib = data.stat().st_size / 2**20
            print(f"prepare {r['records']:>7} records ({mib:.0f} MiB JSONL): {r['seconds']:6.1f} s  "
                  f"{r['records_per_s']:>6} records/s ({r['records_per_cpu_s']} per CPU-second)  peak RSS {r['peak_rss_mib']} MiB "
                  f"(+{r['growth_mib']} MiB over {r['baseline_rss_mib']} MiB after imports)  "
                  f"train {r['train']}, dup {r['duplicates']}, near-dup {r['near_duplicates']}")


if __name__ == "__main__":
    main()
