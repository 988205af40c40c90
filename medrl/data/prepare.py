"""``medrl prepare``: sources -> records -> cleaning -> splits, gold, red-team, RL prompt mix -> DATA_CARD.md.

Streaming design: pass 1 turns every raw row into a record, counts its tokens, writes it to a spool file on disk
and keeps only compact columns (hashes, MinHash signature, source, risk, lengths: ~120 bytes per record). Dedupe,
near-duplicate removal, gold and split selection run on those columns; pass 2 reads eval records back by offset
to build the decontamination index, then streams train records through it into the output files.
"""
from __future__ import annotations

import json
import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medrl.config import Config
from medrl.data.card import empty_set_warning, render_card
from medrl.data.clean import Decontaminator, exact_duplicates, near_duplicates
from medrl.data.redteam import REDTEAM_SOURCE, load_redteam
from medrl.data.schema import conversation_text, rl_prompt_row
from medrl.data.sources import Row, iter_rows, resolve_spec, source_files
from medrl.data.splits import apply_train_size, assign_splits, rl_counts, select_gold, select_rl, split_hash
from medrl.data.spool import BATCH, BENCHMARK, POOL, REDTEAM, Rejects, SourceStats, Spool
from medrl.errors import UsageError
from medrl.reward.rubric_gen_cli import attach_generated, read_rubric_file
from medrl.runs import MetricsLogger, RunDir

log = logging.getLogger("medrl.data")

OUTPUT_FILES = ("train", "dev", "test", "gold", "redteam")
"""Fixed output files; each benchmark source adds ``<name>.jsonl``."""


def _load_source(spool: Spool, name: str) -> None:
    cfg = spool.cfg
    spec = resolve_spec(cfg.data, name)
    files = source_files(name, spec, cfg.data)
    origin = spec.path or f"modelscope:{spec.modelscope}"
    stats = spool.stats[name] = SourceStats(origin=origin, license=spec.license, role=spec.role)
    spool.source_id(name)
    attached = read_rubric_file(Path(spec.rubrics).expanduser()) if spec.rubrics else {}
    generated = spool.path.parent / "rubrics" / f"{name}.jsonl"  # editable; read back with data.catalog.<>.rubrics
    generated.unlink(missing_ok=True)

    def add(rows: list[Row]) -> None:
        if spec.generate_rubrics:
            attach_generated(cfg.reward, [r.record for r in rows], generated)
        spool.add_batch(rows, [BENCHMARK if r.benchmark else POOL for r in rows])

    accepted, batch = 0, []
    rows = iter_rows(name, spec, files, cfg.data.max_row_bytes, tuple(cfg.data.canaries))
    for row in tqdm(rows, desc=f"prepare {name}", unit=" rows", disable=None, leave=False):
        stats.rows += 1
        if row.error is not None:
            stats.invalid += 1
            spool.rejects.add(row.file, row.line, name, "parse", row.error, _summary(row.error))
            continue
        if row.record["id"] in attached:
            row.record["rubrics"] = attached[row.record["id"]]
        if not row.benchmark:
            if spec.limit is not None and accepted >= spec.limit:
                stats.over_limit += 1
                continue
            accepted += 1
        batch.append(row)
        if len(batch) >= BATCH:
            add(batch)
            batch = []
    if batch:
        add(batch)


def _summary(reason: str) -> str:
    """Reject reason without numbers, for counting ("... at column 7" -> "... at column N")."""
    return re.sub(r"\d+", "N", reason)


def _load_all(spool: Spool, names: list[str]) -> None:
    spool.source_id(REDTEAM_SOURCE)
    extra = spool.cfg.data.redteam_path
    spool.stats[REDTEAM_SOURCE] = SourceStats(origin="medrl/data/redteam.jsonl" + (f" + {extra}" if extra else ""),
                                              license="Apache-2.0 (medrl, written by the developers)", role="eval")
    redteam = load_redteam(spool.cfg.data.redteam_path)
    spool.stats[REDTEAM_SOURCE].rows = len(redteam)
    origin = spool.stats[REDTEAM_SOURCE].origin
    spool.add_batch([Row(origin, i + 1, r, None) for i, r in enumerate(redteam)], [REDTEAM] * len(redteam))
    if spool.cfg.data.mode == "mix":
        for name in names:
            _load_source(spool, name)
        return
    chosen, failures = None, []
    for name in names:
        spec = resolve_spec(spool.cfg.data, name)
        if chosen is not None and spec.role != "benchmark":
            spool.stats[name] = SourceStats(skipped=f"priority mode: '{chosen}' loaded first")
            continue
        try:
            _load_source(spool, name)
        except UsageError as exc:
            if spec.role == "benchmark":
                raise
            failures.append(f"{name}: {exc}")
            spool.stats[name] = SourceStats(skipped=str(exc))
            log.warning("priority mode: %s could not be loaded (%s)", name, exc)
            continue
        if spec.role != "benchmark":
            chosen = name
    if chosen is None:
        raise UsageError("priority mode: no source could be loaded (" + "; ".join(failures) + ")")


def _train_text(rec: dict) -> str:
    """What decontamination searches in a record: its whole conversation, reasoning and answer."""
    return "\x00".join((conversation_text(rec), rec["think"], rec["answer"]))


def _read_line(fh, offset: int) -> bytes:
    fh.seek(offset)
    return fh.readline()


def run_prepare(cfg: Config, run: RunDir, *, sources: list[str] | None = None, strict: bool = False) -> dict:
    """Build ``run.data``: train/dev/test/gold/redteam/rl_prompts/rejects .jsonl, ``<benchmark>.jsonl`` per benchmark
    source, and DATA_CARD.md.
    Returns the summary counts (also logged to metrics.jsonl)."""
    d = cfg.data
    names = list(sources) if sources else list(d.sources)
    if not names:
        raise UsageError("no data sources given (data.sources or --sources)")
    for name in names:
        resolve_spec(d, name)  # unknown names fail before any work
    run.record_stage(cfg, "prepare")
    out = run.data
    out.mkdir(parents=True, exist_ok=True)
    run.data_card.unlink(missing_ok=True)  # the card marks a finished stage; a failed run must not leave an old one
    rejects = Rejects(out / "rejects.jsonl", strict)
    spool = Spool(out / ".spool.jsonl", cfg, rejects)
    try:
        _load_all(spool, names)
        spool.close()
        summary = _select_and_write(cfg, run, spool, rejects, names, strict)
    finally:
        spool.close()
        rejects.close()
        spool.path.unlink(missing_ok=True)
    with MetricsLogger(run, "prepare", trackers=False) as metrics:
        metrics.log(0, {**{k: v for k, v in summary.items() if isinstance(v, int)},
                        **{f"benchmark/{k}": v for k, v in summary["benchmarks"].items()}})
    log.info("prepare: %s", ", ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, int)))
    return summary


def _select_and_write(cfg: Config, run: RunDir, spool: Spool, rejects: Rejects, names: list[str],
                      strict: bool) -> dict[str, Any]:
    d, c = cfg.data, spool.cols.numpy()
    n = c["kind"].size
    eval_only = not (c["kind"] == POOL).any()
    if eval_only:
        if not (c["kind"] == BENCHMARK).any():
            raise UsageError(f"no usable records in {', '.join(names)} (see {run.data / 'rejects.jsonl'})")
        log.warning("prepare: every record of %s is a benchmark item: preparing for evaluation only (the benchmark "
                    "files, the red-team set; no train, dev, test or gold records)", ", ".join(names))
    protected = c["kind"] != POOL
    rank = np.where(protected, 0, 1) * n + np.arange(n)
    alive = np.ones(n, dtype=bool)
    src_names, files = spool.sources, spool.files

    def drop(idx: np.ndarray, stage: str, reasons: list[str], summary: str) -> None:
        for i, reason in zip(idx.tolist(), reasons):
            name = src_names[c["source"][i]]
            rejects.add(files[c["file"][i]], int(c["line"][i]), name, stage, reason, summary,
                        f"{int(c['idkey'][i]):016x}")
            spool.stats[name].filtered[stage] = spool.stats[name].filtered.get(stage, 0) + 1
        alive[idx] = False

    dup_of = exact_duplicates(c["qkey"], rank, protected)
    dups = np.flatnonzero(dup_of >= 0)
    drop(dups, "duplicate", [f"same question as {int(c['idkey'][j]):016x}" for j in dup_of[dups]],
         "same question as an earlier or eval record")
    if d.near_dup_threshold is not None:
        near_of, sim = near_duplicates(c["sig"], np.flatnonzero(alive), rank, protected, d.near_dup_threshold)
        hit = np.flatnonzero(near_of >= 0)
        drop(hit, "near_duplicate", [f"near-duplicate of {int(c['idkey'][j]):016x} (estimated Jaccard {s:.2f})"
                                     for j, s in zip(near_of[hit], sim[hit])],
             f"question near-duplicate (Jaccard >= {d.near_dup_threshold}) of an earlier or eval record")

    h = split_hash(c["idkey"], d.split_seed)
    pool = np.flatnonzero(alive & (c["kind"] == POOL))
    gold = select_gold(pool[c["graded"][pool] > 0], c["source"], h, d.gold_size)
    pool = np.setdiff1d(pool, gold)
    train, dev, test = assign_splits(pool, c["source"], h, dev_fraction=d.dev_fraction,
                                     test_fraction=d.test_fraction, max_dev=d.max_dev, max_test=d.max_test)
    # a benchmark source's pool rows (PubMedQA outside its test pmids) train like an sft source's
    role = {name: "sft" if (r := resolve_spec(d, name).role) == "benchmark" else r
            for name in src_names if name != REDTEAM_SOURCE}
    weights = {i: (resolve_spec(d, name).weight if name != REDTEAM_SOURCE else 1.0) for i, name in enumerate(src_names)}
    before = train.size
    train = apply_train_size(train, c["source"], h, weights, d.train_size)
    mix_dropped = before - train.size
    bench = np.flatnonzero(alive & (c["kind"] == BENCHMARK))
    redteam = np.flatnonzero(c["kind"] == REDTEAM)
    benchmarks = {src_names[s]: bench[c["source"][bench] == s] for s in np.unique(c["source"][bench]).tolist()}

    sets = {"dev": dev, "test": test, "gold": gold, **benchmarks, "redteam": redteam}
    decontam = Decontaminator(d.decontam_chars, d.decontam_phrase_items)
    counts: dict[str, int] = {}
    contaminated: list[tuple[int, str]] = []
    with open(spool.path, "rb") as sp:
        for set_name, idx in sets.items():
            sets[set_name] = idx if set_name == "redteam" else idx[np.argsort(h[idx], kind="stable")]

        def index(names, final: bool) -> None:
            for set_name in names:
                for i in sets[set_name].tolist():
                    rec = json.loads(_read_line(sp, int(c["offset"][i])))
                    decontam.add(f"{set_name}:{rec['id']}", conversation_text(rec) + "\x00" + (rec["reference"] or ""))
            decontam.freeze(final)

        # benchmark and red-team items first: a dev/test/gold record copying one is dropped too (gold feeds RL)
        index([*benchmarks, "redteam"], final=False)
        for set_name in ("dev", "test", "gold"):
            idx = sets[set_name]
            recs = [json.loads(_read_line(sp, int(c["offset"][i]))) for i in idx.tolist()]
            hits = decontam.find_many([_train_text(r) for r in recs])
            bad = [(int(i), f"shares a {d.decontam_chars}-character run with {hit}")
                   for i, hit in zip(idx.tolist(), hits) if hit is not None]
            contaminated += bad
            sets[set_name] = idx[~np.isin(idx, [i for i, _ in bad])]
        gold = sets["gold"]
        index(("dev", "test", "gold"), final=True)
        for set_name, idx in sets.items():
            with open(run.data / f"{set_name}.jsonl", "wb") as fh:
                for i in idx.tolist():
                    fh.write(_read_line(sp, int(c["offset"][i])))
        train = train[np.argsort(h[train], kind="stable")]
        with open(run.data / "train.jsonl", "wb") as fh, tqdm(total=train.size, desc="prepare decontaminate",
                                                                unit=" rec", disable=None, leave=False) as bar:
            for start in range(0, train.size, BATCH):
                chunk = train[start:start + BATCH].tolist()
                lines = [_read_line(sp, int(c["offset"][i])) for i in chunk]
                recs = [json.loads(line) for line in lines]
                hits = decontam.find_many([_train_text(r) for r in recs])
                for i, line, rec, hit in zip(chunk, lines, recs, hits):
                    if hit is not None:
                        contaminated.append((i, f"shares a {d.decontam_chars}-character run with {hit}"))
                    elif role[rec["source"]] == "sft":
                        fh.write(line)
                bar.update(len(chunk))
        if contaminated:
            drop(np.array([i for i, _ in contaminated]), "contaminated", [r for _, r in contaminated],
                 f"shares a {d.decontam_chars}-character run with an eval item")
        train_all = np.setdiff1d(train, np.array([i for i, _ in contaminated], dtype=np.int64))
        train_all = train_all[np.argsort(h[train_all], kind="stable")]
        sft_source = np.array([role.get(name) == "sft" for name in src_names], dtype=bool)
        is_sft = sft_source[c["source"][train_all]]
        sets["train"] = train_all[is_sft]
        rl_rows = _write_rl_prompts(cfg, run, c, h, sp, sets["redteam"], gold, train_all)
    for set_name, idx in sets.items():
        counts[set_name] = int(idx.size)
        for s, k in zip(*np.unique(c["source"][idx], return_counts=True)):
            spool.stats[src_names[s]].kept[set_name] = int(k)
    rl_only = train_all[~is_sft]
    for s, k in zip(*np.unique(c["source"][rl_only], return_counts=True)):
        spool.stats[src_names[s]].kept["rl_pool"] = int(k)
    for set_name in () if eval_only else ("gold", "dev", "test"):  # eval-only: said above
        if counts[set_name] == 0 and (set_name != "gold" or d.gold_size > 0):
            log.warning("prepare: %s", empty_set_warning(set_name))
    summary: dict[str, Any] = {**{k: counts[k] for k in OUTPUT_FILES}, "rl_prompts": len(rl_rows),
                               "benchmarks": {k: counts[k] for k in benchmarks},
                               "rejects": rejects.count,
                               "invalid": sum(s.invalid for s in spool.stats.values()),
                               "duplicates": int(dups.size),
                               "near_duplicates": sum(s.filtered.get("near_duplicate", 0) for s in spool.stats.values()),
                               "contaminated": len(contaminated), "not_in_train_mix": int(mix_dropped),
                               "decontam_common_windows": decontam.common_windows,
                               "sources": {k: vars(v) for k, v in spool.stats.items()}}
    command = " ".join(shlex.quote(a) for a in ["medrl", *sys.argv[1:]]) if Path(sys.argv[0]).name in (
        "medrl", "cli.py") else f"run_prepare(sources={names}, strict={strict})"
    run.data_card.write_text(render_card(cfg, summary, spool, c, sets, rl_rows, rejects.by_reason, command),
                             encoding="utf-8")
    return summary


def _write_rl_prompts(cfg: Config, run: RunDir, c: dict, h: np.ndarray, sp, redteam: np.ndarray, gold: np.ndarray,
                      train: np.ndarray) -> list[dict]:
    """rl_prompts.jsonl: red-team + gold + train by ``data.rl_mix``, each pool high-risk first (a low-risk floor
    reserved), written high-risk first. Returns the rows' (pool, risk) for the card."""
    mix = cfg.data.rl_mix
    pools = {"redteam": redteam, "gold": gold, "train": train}
    want = rl_counts(cfg.data.rl_prompts, {"redteam": mix.redteam, "gold": mix.gold, "train": mix.train},
                     {k: v.size for k, v in pools.items()})
    chosen = []
    for pool_rank, (name, idx) in enumerate(pools.items()):
        for i in select_rl(idx, want[name], c["risk"], c["graded"], h, mix.low_risk_floor).tolist():
            chosen.append((int(c["risk"][i]), pool_rank, int(h[i]), i, name))
    chosen.sort()
    rows = []
    with open(run.data / "rl_prompts.jsonl", "w", encoding="utf-8") as fh:
        for _, _, _, i, name in chosen:
            row = rl_prompt_row(json.loads(_read_line(sp, int(c["offset"][i]))), cfg.eval.mcq_prompt.render)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            rows.append({"pool": name, "risk": row["risk"]})
    return rows
