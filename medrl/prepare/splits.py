"""Deterministic selection on compact columns: split hashes, gold set, train/dev/test, train mix, RL prompt mix.

Every choice is a sort by a 64-bit hash of (record id, ``data.split_seed``), so the same records always land in
the same split whatever order they were read in, and adding records moves few others.
"""
from __future__ import annotations

import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def split_hash(id_keys: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (id key + seed): a uniform uint64 per record."""
    with np.errstate(over="ignore"):
        z = id_keys.astype(np.uint64) + np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _round_robin(idx: np.ndarray, source: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``idx`` reordered: each source's records by hash, interleaved (1st of every source, then 2nd, ...)."""
    if not idx.size:
        return idx
    by_hash = idx[np.lexsort((h[idx], source[idx]))]
    src = source[by_hash]
    starts = np.r_[0, np.flatnonzero(src[1:] != src[:-1]) + 1]
    rank = np.arange(by_hash.size) - np.repeat(starts, np.diff(np.r_[starts, by_hash.size]))
    return by_hash[np.lexsort((src, rank))]


def select_gold(candidates: np.ndarray, source: np.ndarray, h: np.ndarray, size: int) -> np.ndarray:
    """Gold: ``size`` records with a reference, taken round-robin over sources in split-hash order."""
    return np.sort(_round_robin(candidates, source, h)[:size])


def _quota(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 3:
        return 0
    return max(1, int(round(n * fraction)))


def _trim(counts: dict[int, int], cap: int) -> None:
    while sum(counts.values()) > cap:
        biggest = max(counts, key=lambda s: (counts[s], -s))
        counts[biggest] -= 1


def assign_splits(pool: np.ndarray, source: np.ndarray, h: np.ndarray, *, dev_fraction: float,
                  test_fraction: float, max_dev: int, max_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, dev, test) indices. Stratified by source: each source with >= 3 records gives its lowest-hash
    records to test, the next ones to dev, at least one each; totals are capped at max_test / max_dev. When no
    source is big enough but the pool has >= 3 records, the lowest-hash records overall fill dev and test."""
    test_n, dev_n, members = {}, {}, {}
    for s in np.unique(source[pool]).tolist():
        m = pool[source[pool] == s]
        members[s] = m[np.argsort(h[m], kind="stable")]
        test_n[s], dev_n[s] = _quota(m.size, test_fraction), _quota(m.size, dev_fraction)
    _trim(test_n, max_test)
    _trim(dev_n, max_dev)
    test = [members[s][:test_n[s]] for s in members]
    dev = [members[s][test_n[s]:test_n[s] + dev_n[s]] for s in members]
    train = [members[s][test_n[s] + dev_n[s]:] for s in members]
    test, dev, train = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (test, dev, train))
    for fraction, part in ((test_fraction, "test"), (dev_fraction, "dev")):
        current = test if part == "test" else dev
        if fraction > 0 and not current.size and train.size >= 2:
            first = train[np.argmin(h[train])]
            train = train[train != first]
            if part == "test":
                test = np.array([first])
            else:
                dev = np.array([first])
    return np.sort(train), np.sort(dev), np.sort(test)


def apply_train_size(train: np.ndarray, source: np.ndarray, h: np.ndarray, weights: dict[int, float],
                     train_size: int | None) -> np.ndarray:
    """Keep ``train_size`` train records shared among sources by weight (lowest hashes first); a source with fewer
    records than its share keeps them all and the rest is not redistributed."""
    if train_size is None or train.size <= train_size:
        return train
    present = [int(s) for s in np.unique(source[train])]
    total_w = sum(weights[s] for s in present)
    keep = []
    for s in present:
        m = train[source[train] == s]
        share = int(round(train_size * weights[s] / total_w))
        keep.append(m[np.argsort(h[m], kind="stable")][:share])
    return np.sort(np.concatenate(keep))


def risk_first(idx: np.ndarray, risk: np.ndarray, graded: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``idx`` ordered high risk first, then those with a rubric, then with a reference (``graded`` 2, 1, 0), then by
    hash."""
    return idx[np.lexsort((h[idx], -graded[idx].astype(np.int16), risk[idx]))]


def select_rl(idx: np.ndarray, n: int, risk: np.ndarray, graded: np.ndarray, h: np.ndarray,
              low_risk_floor: float, low_code: int = 2) -> np.ndarray:
    """``n`` prompts of ``idx``: round(n x low_risk_floor) low-risk ones (as many as there are), the rest high risk
    first (see ``risk_first``)."""
    low = idx[risk[idx] == low_code]
    reserved = risk_first(low, risk, graded, h)[:min(low.size, int(round(n * low_risk_floor)))]
    rest = risk_first(np.setdiff1d(idx, reserved), risk, graded, h)[:max(0, n - reserved.size)]
    return np.concatenate([rest, reserved])


def rl_counts(total: int, shares: dict[str, float], available: dict[str, int]) -> dict[str, int]:
    """Prompts per pool: ``total`` split by normalised shares, each capped by what the pool has; the shortfall of
    red-team and gold goes to train."""
    norm = sum(shares.values()) or 1.0
    counts = {k: min(available[k], int(round(total * shares[k] / norm))) for k in ("redteam", "gold")}
    counts["train"] = min(available["train"], max(0, total - counts["redteam"] - counts["gold"]))
    return counts
