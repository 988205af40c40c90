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
from medrl.prepare.card import empty_set_warning, render_card
from medrl.data.clean import Decontaminator, exact_duplicates, near_duplicates
from medrl.data.redteam import REDTEAM_SOURCE, load_redteam
from medrl.data.schema import conversation_text, rl_prompt_row
from medrl.data.sources import Row, iter_rows, resolve_spec, source_files
from medrl.prepare.splits import apply_train_size, assign_splits, rl_counts, select_gold, select_rl, split_hash
from medrl.prepare.spool import BATCH, BENCHMARK, POOL, REDTEAM, Rejects, SourceStats, Spool
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


def _source_roles(data_cfg, src_names: list[str]) -> dict[str, str]:
    """Each pool source's role in training; a benchmark source's pool rows (PubMedQA outside its test pmids) train
    like an sft source's."""
    return {name: "sft" if (r := resolve_spec(data_cfg, name).role) == "benchmark" else r
            for name in src_names if name != REDTEAM_SOURCE}


class _Selection:
    """The selection over the spool's compact columns: rows dropped (each with its reason, in the rejects and the
    per-source stats), then the sets the others end up in, read back from the spool file by offset."""

    def __init__(self, cfg: Config, spool: Spool, rejects: Rejects):
        self.data_cfg, self.spool, self.rejects = cfg.data, spool, rejects
        self.cols = spool.cols.numpy()
        n = self.cols["kind"].size
        self.protected = self.cols["kind"] != POOL  # eval items: a pool copy of one is dropped, never the item
        self.rank = np.where(self.protected, 0, 1) * n + np.arange(n)
        self.alive = np.ones(n, dtype=bool)
        self.split_key = split_hash(self.cols["idkey"], self.data_cfg.split_seed)
        self.contaminated: list[tuple[int, str]] = []  # (row, reason): shares a run with an eval item
        self.benchmark_names: list[str] = []

    def drop(self, rows: np.ndarray, stage: str, reasons: list[str], summary: str) -> None:
        src_names, files, cols = self.spool.sources, self.spool.files, self.cols
        for i, reason in zip(rows.tolist(), reasons):
            name = src_names[cols["source"][i]]
            self.rejects.add(files[cols["file"][i]], int(cols["line"][i]), name, stage, reason, summary,
                             f"{int(cols['idkey'][i]):016x}")
            self.spool.stats[name].filtered[stage] = self.spool.stats[name].filtered.get(stage, 0) + 1
        self.alive[rows] = False

    def drop_duplicates(self) -> int:
        """Drop exact, then near-duplicate questions of an earlier or eval record; returns the exact ones' count."""
        cols, threshold = self.cols, self.data_cfg.near_dup_threshold
        dup_of = exact_duplicates(cols["qkey"], self.rank, self.protected)
        dups = np.flatnonzero(dup_of >= 0)
        self.drop(dups, "duplicate", [f"same question as {int(cols['idkey'][j]):016x}" for j in dup_of[dups]],
                  "same question as an earlier or eval record")
        if threshold is not None:
            near_of, sim = near_duplicates(cols["sig"], np.flatnonzero(self.alive), self.rank, self.protected,
                                           threshold)
            hit = np.flatnonzero(near_of >= 0)
            self.drop(hit, "near_duplicate", [f"near-duplicate of {int(cols['idkey'][j]):016x} (estimated Jaccard "
                                              f"{s:.2f})" for j, s in zip(near_of[hit], sim[hit])],
                      f"question near-duplicate (Jaccard >= {threshold}) of an earlier or eval record")
        return int(dups.size)

    def split(self) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
        """The eval sets (dev, test, gold, one per benchmark source, redteam; each but redteam in split-key order),
        the train rows in the mix, and how many pool rows the mix left out. Sets ``benchmark_names``."""
        d, cols, key = self.data_cfg, self.cols, self.split_key
        src_names = self.spool.sources
        pool = np.flatnonzero(self.alive & (cols["kind"] == POOL))
        gold = select_gold(pool[cols["graded"][pool] > 0], cols["source"], key, d.gold_size)
        pool = np.setdiff1d(pool, gold)
        train, dev, test = assign_splits(pool, cols["source"], key, dev_fraction=d.dev_fraction,
                                         test_fraction=d.test_fraction, max_dev=d.max_dev, max_test=d.max_test)
        weights = {i: (resolve_spec(d, name).weight if name != REDTEAM_SOURCE else 1.0)
                   for i, name in enumerate(src_names)}
        in_mix = apply_train_size(train, cols["source"], key, weights, d.train_size)
        bench = np.flatnonzero(self.alive & (cols["kind"] == BENCHMARK))
        benchmarks = {src_names[s]: bench[cols["source"][bench] == s]
                      for s in np.unique(cols["source"][bench]).tolist()}
        self.benchmark_names = list(benchmarks)
        sets = {"dev": dev, "test": test, "gold": gold, **benchmarks,
                "redteam": np.flatnonzero(cols["kind"] == REDTEAM)}
        for set_name, rows in sets.items():
            sets[set_name] = rows if set_name == "redteam" else rows[np.argsort(key[rows], kind="stable")]
        return sets, in_mix, train.size - in_mix.size

    def read(self, spool_file, row: int) -> bytes:
        return _read_line(spool_file, int(self.cols["offset"][row]))

    def decontaminate_eval_sets(self, sets: dict[str, np.ndarray], benchmark_names: list[str], spool_file,
                                decontam: Decontaminator) -> None:
        """Index the benchmark and red-team items, drop the dev/test/gold records that copy one (gold feeds RL),
        then index dev/test/gold too, for the train records."""
        def index(set_names, final: bool) -> None:
            for set_name in set_names:
                for i in sets[set_name].tolist():
                    rec = json.loads(self.read(spool_file, i))
                    decontam.add(f"{set_name}:{rec['id']}", conversation_text(rec) + "\x00" + (rec["reference"] or ""))
            decontam.freeze(final)

        index([*benchmark_names, "redteam"], final=False)
        for set_name in ("dev", "test", "gold"):
            rows = sets[set_name]
            recs = [json.loads(self.read(spool_file, i)) for i in rows.tolist()]
            hits = decontam.find_many([_train_text(r) for r in recs])
            bad = [(int(i), f"shares a {self.data_cfg.decontam_chars}-character run with {hit}")
                   for i, hit in zip(rows.tolist(), hits) if hit is not None]
            self.contaminated += bad
            sets[set_name] = rows[~np.isin(rows, [i for i, _ in bad])]
        index(("dev", "test", "gold"), final=True)

    def write_train(self, path: Path, train: np.ndarray, roles: dict[str, str], spool_file,
                    decontam: Decontaminator) -> None:
        """Stream the train rows (split-key order) through decontamination: the sft sources' clean records go to
        ``path``, a contaminated one is remembered for ``drop``."""
        with open(path, "wb") as fh, tqdm(total=train.size, desc="prepare decontaminate", unit=" rec", disable=None,
                                          leave=False) as bar:
            for start in range(0, train.size, BATCH):
                chunk = train[start:start + BATCH].tolist()
                lines = [self.read(spool_file, i) for i in chunk]
                recs = [json.loads(line) for line in lines]
                hits = decontam.find_many([_train_text(r) for r in recs])
                for i, line, rec, hit in zip(chunk, lines, recs, hits):
                    if hit is not None:
                        self.contaminated.append((i, f"shares a {self.data_cfg.decontam_chars}-character run with "
                                                     f"{hit}"))
                    elif roles[rec["source"]] == "sft":
                        fh.write(line)
                bar.update(len(chunk))

    def count_kept(self, sets: dict[str, np.ndarray], rl_only: np.ndarray) -> dict[str, int]:
        """Rows per set (and per source into the stats, with the train rows only RL prompts draw from)."""
        src_names, source = self.spool.sources, self.cols["source"]
        counts: dict[str, int] = {}
        for set_name, rows in sets.items():
            counts[set_name] = int(rows.size)
            for s, k in zip(*np.unique(source[rows], return_counts=True)):
                self.spool.stats[src_names[s]].kept[set_name] = int(k)
        for s, k in zip(*np.unique(source[rl_only], return_counts=True)):
            self.spool.stats[src_names[s]].kept["rl_pool"] = int(k)
        return counts


def _eval_only(cols: dict, names: list[str], run: RunDir) -> bool:
    """True when no record can train (every one is a benchmark item); none usable at all is a usage error."""
    if (cols["kind"] == POOL).any():
        return False
    if not (cols["kind"] == BENCHMARK).any():
        raise UsageError(f"no usable records in {', '.join(names)} (see {run.data / 'rejects.jsonl'})")
    log.warning("prepare: every record of %s is a benchmark item: preparing for evaluation only (the benchmark "
                "files, the red-team set; no train, dev, test or gold records)", ", ".join(names))
    return True


def _select_and_write(cfg: Config, run: RunDir, spool: Spool, rejects: Rejects, names: list[str],
                      strict: bool) -> dict[str, Any]:
    d = cfg.data
    sel = _Selection(cfg, spool, rejects)
    cols, src_names = sel.cols, spool.sources
    eval_only = _eval_only(cols, names, run)
    duplicates = sel.drop_duplicates()
    sets, train, mix_dropped = sel.split()
    benchmark_names = sel.benchmark_names
    roles = _source_roles(d, src_names)
    decontam = Decontaminator(d.decontam_chars, d.decontam_phrase_items)
    with open(spool.path, "rb") as spool_file:
        sel.decontaminate_eval_sets(sets, benchmark_names, spool_file, decontam)
        for set_name, rows in sets.items():
            with open(run.data / f"{set_name}.jsonl", "wb") as fh:
                for i in rows.tolist():
                    fh.write(sel.read(spool_file, i))
        train = train[np.argsort(sel.split_key[train], kind="stable")]
        sel.write_train(run.data / "train.jsonl", train, roles, spool_file, decontam)
        contaminated = sel.contaminated
        if contaminated:
            sel.drop(np.array([i for i, _ in contaminated]), "contaminated", [r for _, r in contaminated],
                     f"shares a {d.decontam_chars}-character run with an eval item")
        train_all = np.setdiff1d(train, np.array([i for i, _ in contaminated], dtype=np.int64))
        train_all = train_all[np.argsort(sel.split_key[train_all], kind="stable")]
        sft_source = np.array([roles.get(name) == "sft" for name in src_names], dtype=bool)
        is_sft = sft_source[cols["source"][train_all]]
        sets["train"] = train_all[is_sft]
        rl_rows = _write_rl_prompts(cfg, run, cols, sel.split_key, spool_file, sets["redteam"], sets["gold"],
                                    train_all)
    counts = sel.count_kept(sets, train_all[~is_sft])
    for set_name in () if eval_only else ("gold", "dev", "test"):  # eval-only: said above
        if counts[set_name] == 0 and (set_name != "gold" or d.gold_size > 0):
            log.warning("prepare: %s", empty_set_warning(set_name))
    summary: dict[str, Any] = {**{k: counts[k] for k in OUTPUT_FILES}, "rl_prompts": len(rl_rows),
                               "benchmarks": {k: counts[k] for k in benchmark_names},
                               "rejects": rejects.count,
                               "invalid": sum(s.invalid for s in spool.stats.values()),
                               "duplicates": duplicates,
                               "near_duplicates": sum(s.filtered.get("near_duplicate", 0)
                                                      for s in spool.stats.values()),
                               "contaminated": len(contaminated), "not_in_train_mix": int(mix_dropped),
                               "decontam_common_windows": decontam.common_windows,
                               "sources": {k: vars(v) for k, v in spool.stats.items()}}
    command = " ".join(shlex.quote(a) for a in ["medrl", *sys.argv[1:]]) if Path(sys.argv[0]).name in (
        "medrl", "cli.py") else f"run_prepare(sources={names}, strict={strict})"
    run.data_card.write_text(render_card(cfg, summary, spool, cols, sets, rl_rows, rejects.by_reason, command),
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
