"""The judge store: the content-addressed judgement cache (rubric judgements of the reward plane, pairwise verdicts of
eval, rubrics written by ``medrl rubrics generate``), claims on keys being judged, the rate-limit buckets and the
spend ledger, in one SQLite file (WAL, one machine) or one PostgreSQL database (psycopg 3, clusters and teams).

Both backends run the same SQL. A judgement is committed before the reward that uses it is returned, and a key is
claimed before its judge call (the claim expires unless its holder renews it), so no key is paid for twice, by
concurrent actors, processes and runs, or across restarts. Only valid judgements are stored: a failure is retried.
The PostgreSQL connection string is read from the environment variable ``reward.cache.url_env`` and never written
anywhere. A PostgreSQL connection lost mid-run (a server restart) is reopened with backoff and the operation run
again (every operation is idempotent: insert-if-absent, re-claims by the same holder); past
``reward.cache.outage_s`` the store raises ``StoreDownError``, one line that stops the run.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import random
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from medrl.errors import UsageError
from medrl.reward.config import CacheConfig
from medrl.reward.ledger import RateBucket, lease_buckets
from medrl.reward.store.schema import (JUDGEMENT_COLUMNS, PAIRWISE_COLUMNS, PATIENT_COLUMNS, RUBRIC_COLUMNS,
                                     SCHEMA_VERSION, SELECT_JUDGEMENTS, TABLES)

log = logging.getLogger("medrl.reward")

_CHUNK = 500
_PG_SCHEMA_LOCK = 0x6D6564726C  # advisory lock id taken while the schema is created
_BACKOFF_S = (0.1, 5.0)
"""First and longest wait between reconnection attempts to a lost PostgreSQL server (doubling in between)."""


class StoreDownError(UsageError):
    """The judge store stayed unreachable past ``reward.cache.outage_s``: the run stops (never a per-sample failure)."""


def _chunks(keys: list[str]):
    for start in range(0, len(keys), _CHUNK):
        yield keys[start:start + _CHUNK]


def _rows_sql(columns: int, rows: int) -> str:
    """The VALUES list of a multi-row INSERT (one statement for a chunk of rows)."""
    row = f"({','.join('?' * columns)})"
    return ",".join([row] * rows)


def _reconnecting(method):
    """PostgreSQL: when ``method`` loses its connection, reconnect (``JudgeStore._reconnect``) and run it again."""

    @functools.wraps(method)
    def run(self: "JudgeStore", *args, **kwargs):
        if not self._pg:
            return method(self, *args, **kwargs)
        import psycopg

        while True:
            try:
                return method(self, *args, **kwargs)
            except psycopg.OperationalError as exc:
                if self._db is None or not (self._db.broken or self._db.closed):
                    raise  # the server answered with an error: not an outage
                self._reconnect(exc)

    return run


class JudgeStore:
    """One connection per process/actor (autocommit; multi-statement changes in explicit transactions). Use
    ``open_store``. ``where`` names the store in messages (the file, or the URL's variable name: never the URL).
    ``connect`` (PostgreSQL) opens a new connection, used after the old one is lost, for up to ``outage_s``."""

    def __init__(self, db, backend: str, where: str, connect: Callable[[], object] | None = None,
                 outage_s: float = 0.0):
        self._db, self.backend, self.where = db, backend, where
        self._pg = backend == "postgres"
        self._connect, self._outage_s = connect, outage_s
        self._down_since: float | None = None  # time.monotonic() of the first operation that found the store down

    def _reconnect(self, lost: Exception) -> None:
        """Open a new connection with bounded backoff; StoreDownError once the store has been down ``outage_s``
        (counted from the first lost operation: later ones then fail after one attempt)."""
        import psycopg

        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("%s: connection lost (%s): reconnecting for up to %g s (reward.cache.outage_s)", self.where,
                        str(lost).strip().splitlines()[0], self._outage_s)
        wait, error = _BACKOFF_S[0], lost
        while True:
            try:
                self._db = self._connect()
                log.warning("%s: reconnected after %.1f s", self.where, time.monotonic() - self._down_since)
                self._down_since = None
                return
            except psycopg.OperationalError as exc:
                error = exc
            left = self._outage_s - (time.monotonic() - self._down_since)
            if left <= 0:
                reason = str(error).strip().splitlines()[0]
                raise StoreDownError(f"{self.where}: unreachable for {self._outage_s:g} s (reward.cache.outage_s): "
                                     f"{reason}") from None
            time.sleep(min(wait, left))
            wait = min(2 * wait, _BACKOFF_S[1])

    # ---- plumbing
    def _sql(self, query: str) -> str:
        return query.replace("?", "%s") if self._pg else query

    def _run(self, query: str, params: Iterable = ()):
        return self._db.execute(self._sql(query), tuple(params))

    def _run_many(self, query: str, rows: list[tuple]) -> None:
        if rows:
            self._db.cursor().executemany(self._sql(query), rows)

    @contextmanager
    def _tx(self, durable: bool = False):
        """A write transaction: SQLite takes the write lock at once (BEGIN IMMEDIATE), so read-modify-write
        sequences never deadlock; PostgreSQL locks the rows it reads ``FOR UPDATE``. On PostgreSQL only ``durable``
        transactions (judgements, spending) wait for the WAL flush; claims and rate buckets, which a server crash may
        lose harmlessly, do not (``synchronous_commit`` off for the session)."""
        if self._pg:
            with self._db.transaction():
                if durable:
                    self._run("SET LOCAL synchronous_commit TO ON")
                yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _create_schema(self) -> None:
        with self._tx():
            if self._pg:
                self._run("SELECT pg_advisory_xact_lock(?)", (_PG_SCHEMA_LOCK,))
            for table in TABLES:
                self._run(table)
            row = self._run("SELECT MAX(version) FROM medrl_schema").fetchone()
            if row[0] is None:
                self._run("INSERT INTO medrl_schema (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise UsageError(f"{self.where}: judge store has schema version {row[0]}, this medrl knows "
                                 f"{SCHEMA_VERSION} (upgrade medrl)")

    @_reconnecting
    def _rows_of(self, select: str, keys: Iterable[str]) -> list[tuple]:
        """The rows of ``select`` (its first column is ``key``) whose key is among ``keys``, in chunks."""
        if self._db is None:
            return []
        return [row for chunk in _chunks(list(dict.fromkeys(keys)))
                for row in self._run(f"{select} WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()]

    # ---- judgements
    def get_many(self, keys: Iterable[str]) -> dict[str, dict]:
        """Cached judgements of the given keys (missing keys are absent)."""
        return {row[0]: dict(zip(JUDGEMENT_COLUMNS, row)) for row in self._rows_of(SELECT_JUDGEMENTS, keys)}

    def put(self, record: dict, holder: str | None = None) -> None:
        """Store one judgement (``put_many`` of one)."""
        self.put_many([record], holder)

    @_reconnecting
    def put_many(self, records: list[dict], holder: str | None = None) -> None:
        """Store judgements (first writer wins) and drop ``holder``'s claims on them, in one transaction committed
        before returning (one WAL flush for the lot: ``claims.GroupCommit``)."""
        now = time.time()
        rows = [[rec.get(c) for c in JUDGEMENT_COLUMNS[:-1]] + [rec.get("created", now)] for rec in records]
        with self._tx(durable=True):
            for start in range(0, len(rows), _CHUNK):  # one statement per chunk of rows, not one per row
                chunk = rows[start:start + _CHUNK]
                values = _rows_sql(len(JUDGEMENT_COLUMNS), len(chunk))
                self._run(f"INSERT INTO judgements ({', '.join(JUDGEMENT_COLUMNS)}) VALUES {values} "
                          "ON CONFLICT (key) DO NOTHING", [v for row in chunk for v in row])
            if holder is not None:
                self._release([row[0] for row in rows], holder)

    @_reconnecting
    def count(self) -> int:
        return 0 if self._db is None else self._run("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def export_jsonl(self, out: str | Path, keys: Iterable[str] | None = None) -> int:
        """Write judgements (all, or those of ``keys``) as ``teacher_judgements.jsonl``; returns the row count."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if keys is not None:
            records = list(self.get_many(keys).values())
        elif self._db is None:
            records = []
        else:
            records = [dict(zip(JUDGEMENT_COLUMNS, r)) for r in self._run(f"{SELECT_JUDGEMENTS} ORDER BY created").fetchall()]
        with open(out, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        return len(records)

    # ---- pairwise verdicts (eval's pairwise judge; key: ``cache_key`` over both answers in their shown order)
    def pairwise_many(self, keys: Iterable[str]) -> dict[str, tuple[str, str]]:
        """{key: (winner, reason)} of the cached pairwise verdicts among ``keys``."""
        return {k: (w, r) for k, w, r in self._rows_of("SELECT key, winner, reason FROM pairwise_verdicts", keys)}

    @_reconnecting
    def put_pairwise(self, record: dict, holder: str | None = None) -> None:
        """Store one pairwise verdict (first writer wins) and drop ``holder``'s claim on it, committed before
        returning."""
        rec = dict(record, created=record.get("created", time.time()))
        with self._tx(durable=True):
            self._run(f"INSERT INTO pairwise_verdicts ({', '.join(PAIRWISE_COLUMNS)}) VALUES "
                      f"({','.join('?' * len(PAIRWISE_COLUMNS))}) ON CONFLICT (key) DO NOTHING",
                      [rec.get(c) for c in PAIRWISE_COLUMNS])
            self._drop_claim(rec["key"], holder)

    # ---- generated rubrics (``medrl rubrics generate``; key: ``rubric_gen.rubric_key``)
    def rubrics_many(self, keys: Iterable[str]) -> dict[str, list[dict]]:
        """{key: [{criterion, category, axis}]} of the stored rubrics among ``keys``."""
        return {k: json.loads(c) for k, c in self._rows_of("SELECT key, criteria FROM generated_rubrics", keys)}

    @_reconnecting
    def put_rubric(self, record: dict, holder: str | None = None) -> None:
        """Store one generated rubric (``criteria``: a list, stored as JSON; first writer wins) and drop
        ``holder``'s claim on it, committed before returning."""
        rec = dict(record, criteria=json.dumps(record["criteria"], ensure_ascii=False),
                   created=record.get("created", time.time()))
        with self._tx(durable=True):
            self._run(f"INSERT INTO generated_rubrics ({', '.join(RUBRIC_COLUMNS)}) VALUES "
                      f"({','.join('?' * len(RUBRIC_COLUMNS))}) ON CONFLICT (key) DO NOTHING",
                      [rec.get(c) for c in RUBRIC_COLUMNS])
            self._drop_claim(rec["key"], holder)

    # ---- simulated-patient replies (``medrl.consult``; key: ``medrl.consult.patient.reply_key``, prefix ``patient:``)
    def patient_replies_many(self, keys: Iterable[str]) -> dict[str, dict]:
        """Cached simulated-patient replies of the given keys."""
        return {row[0]: dict(zip(PATIENT_COLUMNS, row))
                for row in self._rows_of(f"SELECT {', '.join(PATIENT_COLUMNS)} FROM patient_replies", keys)}

    @_reconnecting
    def put_patient_reply(self, record: dict, holder: str | None = None) -> None:
        """Store one patient reply (first writer wins: a replayed dialogue sees the reply the first run saw) and drop
        ``holder``'s claim on it."""
        rec = dict(record, created=record.get("created", time.time()))
        with self._tx(durable=True):
            self._run(f"INSERT INTO patient_replies ({', '.join(PATIENT_COLUMNS)}) VALUES "
                      f"({','.join('?' * len(PATIENT_COLUMNS))}) ON CONFLICT (key) DO NOTHING",
                      [rec.get(c) for c in PATIENT_COLUMNS])
            self._drop_claim(rec["key"], holder)

    # ---- claims: who is working on a key right now (judgements, pairwise verdicts, rubrics: their keys never collide)
    def _drop_claim(self, key: str, holder: str | None) -> None:
        if holder is not None:
            self._run("DELETE FROM claims WHERE key = ? AND holder = ?", (key, holder))

    @_reconnecting
    def claim_many(self, keys: list[str], holder: str, ttl_s: float) -> set[str]:
        """Claim the keys nobody holds (or whose claim expired); returns the keys ``holder`` now holds (its claims
        made before are renewed). One statement per chunk of keys."""
        held: set[str] = set()
        now = time.time()
        for chunk in _chunks(list(dict.fromkeys(keys))):
            rows = self._run(f"INSERT INTO claims (key, holder, expires) VALUES {_rows_sql(3, len(chunk))} ON CONFLICT "
                             "(key) DO UPDATE SET holder = excluded.holder, expires = excluded.expires "
                             "WHERE claims.expires < ? OR claims.holder = excluded.holder RETURNING key",
                             [*(v for k in chunk for v in (k, holder, now + ttl_s)), now]).fetchall()
            held.update(r[0] for r in rows)
        return held

    @_reconnecting
    def release(self, keys: Iterable[str], holder: str) -> None:
        self._release(keys, holder)

    def _release(self, keys: Iterable[str], holder: str) -> None:
        for chunk in _chunks(list(dict.fromkeys(keys))):
            self._run(f"DELETE FROM claims WHERE holder = ? AND key IN ({','.join('?' * len(chunk))})",
                      [holder, *chunk])

    @_reconnecting
    def renew_claims(self, holder: str, ttl_s: float) -> None:
        """Push back the expiry of every claim ``holder`` has (its heartbeat)."""
        self._run("UPDATE claims SET expires = ? WHERE holder = ?", (time.time() + ttl_s, holder))

    # ---- rate limits and spending shared by every process on the store
    @_reconnecting
    def rate_lease(self, limits: list[tuple[str, int, int]], n: int) -> tuple[int, float]:
        """Book up to ``n`` calls on the named buckets ((name, per minute, units per call)); returns (calls, wait)."""
        names = [name for name, _, _ in limits]
        now = time.time()
        with self._tx():
            self._run_many("INSERT INTO rate_buckets (name, tat) VALUES (?, 0) ON CONFLICT (name) DO NOTHING",
                           [(name,) for name in names])
            rows = dict(self._run(f"SELECT name, tat FROM rate_buckets WHERE name IN ({','.join('?' * len(names))})"
                                  + (" FOR UPDATE" if self._pg else ""), names).fetchall())
            buckets = []
            for name, per_minute, units in limits:
                bucket = RateBucket(per_minute)
                bucket.tat = rows[name]
                buckets.append((bucket, units))
            n, wait = lease_buckets(buckets, n, now)
            self._run_many("UPDATE rate_buckets SET tat = ? WHERE name = ?",
                           [(b.tat, name) for (b, _), name in zip(buckets, names)])
        return n, wait

    @_reconnecting
    def spent(self, scope: str) -> float:
        row = self._run("SELECT spent_usd FROM spend WHERE scope = ?", (scope,)).fetchone()
        return float(row[0]) if row else 0.0

    @_reconnecting
    def settle_usage(self, scope: str, usd: float, moves: list[tuple[str, int, int]]) -> None:
        """What finished calls used, in one transaction: ``usd`` added to the spending of ``scope`` (durable) and
        the rate buckets corrected by ``moves``: (name, per minute, units), negative units give bookings back."""
        if not usd and not moves:
            return
        with self._tx(durable=bool(usd)):
            if usd:
                self._run("INSERT INTO spend (scope, spent_usd) VALUES (?, ?) ON CONFLICT (scope) DO UPDATE "
                          "SET spent_usd = spend.spent_usd + excluded.spent_usd", (scope, usd))
            if moves:
                self._run_many("UPDATE rate_buckets SET tat = tat + ? WHERE name = ?",
                               [(units * 60.0 / per_minute, name) for name, per_minute, units in moves])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _set_wal(db: sqlite3.Connection, wait_s: float = 30.0) -> None:
    """Switch a SQLite store to WAL. SQLite answers "database is locked" at once, without its busy handler, when
    another process opens the same new file at that moment, so the switch is retried for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01 + random.random() * 0.05)


def _open_sqlite(path: Path, readonly: bool) -> JudgeStore:
    where = str(path)
    try:
        if readonly:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) if path.exists() else None
            store = JudgeStore(db, "sqlite", where)
            if db is not None:
                store.count()  # a file that is not a judge store fails here, not later
            return store
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        _set_wal(db)
        db.execute("PRAGMA synchronous=NORMAL")
        store = JudgeStore(db, "sqlite", where)
        store._create_schema()
        return store
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"{path}: not a usable judge cache ({exc})") from None


def store_url(cfg: CacheConfig) -> str | None:
    """The PostgreSQL connection string from ``cfg.url_env`` (None for SQLite); one-line error when it is unset."""
    if cfg.backend != "postgres":
        return None
    url = os.environ.get(cfg.url_env)
    if not url:
        raise UsageError(f"reward.cache.backend is 'postgres' but the environment variable {cfg.url_env} "
                         f"(reward.cache.url_env) is not set")
    return url


def _open_postgres(url: str, cfg: CacheConfig) -> JudgeStore:
    where = f"PostgreSQL at ${cfg.url_env}"
    import psycopg

    def connect():
        db = psycopg.connect(url, autocommit=True, connect_timeout=10)
        db.execute("SET synchronous_commit TO OFF")  # durable writes turn it back on (JudgeStore._tx)
        return db

    try:
        db = connect()
    except psycopg.Error as exc:
        raise UsageError(f"{where}: cannot connect: {str(exc).replace(url, '***').strip()}") from None
    store = JudgeStore(db, "postgres", where, connect, cfg.outage_s)
    store._create_schema()
    return store


def open_store(cfg: CacheConfig, readonly: bool = False, url: str | None = None) -> JudgeStore:
    """The store ``cfg`` names. ``readonly`` (SQLite): never create the file; a missing file is an empty store.
    ``url`` (PostgreSQL): the connection string when the caller already read it (a Ray actor gets it from the
    driver, as a secret argument, so only the driver's node needs the variable); else it is read from the env."""
    if cfg.backend == "postgres":
        return _open_postgres(url or store_url(cfg), cfg)
    return _open_sqlite(Path(cfg.path).expanduser(), readonly)
