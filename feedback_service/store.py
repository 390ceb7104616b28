"""Persistence of feedback rows with SQLAlchemy Core: SQLite (embedded default) or PostgreSQL.

Every method here blocks; the domain layer calls them off the event loop (a writer thread, or to_thread).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import operator
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Connection,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    any_,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError

from feedback_service.models import (
    COMPARISON,
    RATING,
    FeedbackFields,
    FeedbackRecord,
    ListFilters,
    NewFeedback,
    Stats,
    StatsResult,
    Stored,
)

metadata_obj = MetaData()

# SQLite only treats the exact type INTEGER PRIMARY KEY as the rowid alias; elsewhere a 64-bit key.
_SEQUENCE_TYPE = BigInteger().with_variant(Integer(), "sqlite")

feedback = Table(
    "feedback",
    metadata_obj,
    # Global insertion order; ids, page tokens and export watermarks are all this number.
    Column("sequence", _SEQUENCE_TYPE, primary_key=True, autoincrement=True),
    Column("agent_id", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # "rating" or "comparison"
    Column("prompt", Text, nullable=False),
    Column("response", Text, nullable=False),
    Column("score", Double, nullable=True),  # ratings only
    Column("chosen", Text, nullable=False),
    Column("rejected", Text, nullable=False),
    Column("margin", Double, nullable=True),  # comparisons only, optional
    Column("run_id", String, nullable=False),
    Column("notes", Text, nullable=False),
    Column("generation_id", String, nullable=False),
    Column("policy_version", String, nullable=False),  # "" when unknown (so GROUP BY and joins need no NULLs)
    Column("metadata", Text, nullable=False),  # JSON object of strings
    Column("request_id", String, nullable=False),
    # Microseconds since the Unix epoch (UTC): exact, portable and cheap to compare on both databases.
    Column("created_at", BigInteger, nullable=False),
    UniqueConstraint("agent_id", "request_id", name="uq_feedback_agent_request"),
    Index("ix_feedback_agent_sequence", "agent_id", "sequence"),
    Index("ix_feedback_agent_created", "agent_id", "created_at"),
    Index("ix_feedback_agent_version", "agent_id", "policy_version"),
    # AUTOINCREMENT: SQLite never reuses the sequence of a deleted row, so a recorded watermark stays valid.
    sqlite_autoincrement=True,
)

_c = feedback.c
_IDS = ARRAY(String)
_IN_CHUNK = 500  # ids per IN (...) list: far below every backend's bound-parameter limit
_INSERT_ATTEMPTS = 3


# Columns named like the fields every item and row share (FeedbackFields).
SHARED_COLUMNS = tuple(field.name for field in dataclasses.fields(FeedbackFields))


# The columns an insert fills, in the order of _row's tuples.
ROW_COLUMNS = (*SHARED_COLUMNS, "metadata", "created_at")
# SQLite: most rows per INSERT statement (a multi-row VALUES list), within the connection's host-parameter
# limit (999 where it cannot be read: the smallest any SQLite has had; 3.32+ allow 32766). A stream's whole
# commit group then goes in one statement: every statement costs the writer thread a GIL hand-off.
_SQLITE_MAX_ROWS_PER_INSERT = 1024
_SQLITE_MIN_PARAMETER_LIMIT = 999


def _sqlite_rows_per_insert(conn: Connection) -> int:
    driver = conn.connection.driver_connection
    getlimit = getattr(driver, "getlimit", None)  # Python 3.11+
    limit = getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if getlimit else _SQLITE_MIN_PARAMETER_LIMIT
    return max(1, min(_SQLITE_MAX_ROWS_PER_INSERT, limit // len(ROW_COLUMNS)))


class _StoredBefore(Exception):
    """The optimistic SQLite insert skipped a row whose (agent_id, request_id) was stored before."""


@functools.cache
def _sqlite_insert(rows: int) -> str:
    """INSERT of `rows` rows in one statement, skipping rows whose (agent_id, request_id) is stored. One
    statement per chunk rather than executemany: sqlite3's executemany releases and retakes the GIL around
    every row, and with the event loop's thread busy each retake waited its turn (the writer thread spent half
    its time in executemany at ~15 µs a row, twice a raw insert's whole cost; with a thread spinning beside it
    executemany fell to ~900 rows/s, the multi-row statement to ~13,000). (Numbered parameters, ?1 for the
    created_at every row shares, would save building a tuple per row, but SQLite binds them ~10% slower.)"""
    one = f"({', '.join('?' * len(ROW_COLUMNS))})"
    return (
        f"INSERT INTO feedback ({', '.join(ROW_COLUMNS)}) VALUES {', '.join([one] * rows)}"
        " ON CONFLICT (agent_id, request_id) DO NOTHING"
    )


def _sqlite_parameters(items: Sequence[NewFeedback], now_us: int) -> tuple[Any, ...]:
    """The parameters of _sqlite_insert(len(items)), row after row."""
    return tuple(itertools.chain.from_iterable((*_ROW_FIELDS(item), now_us) for item in items))


_PG_INSERT = (
    f"INSERT INTO feedback ({', '.join(ROW_COLUMNS)}) VALUES ({', '.join(['%s'] * len(ROW_COLUMNS))})"
    " ON CONFLICT (agent_id, request_id) DO NOTHING RETURNING sequence"
)
_ROW_FIELDS = operator.attrgetter(*SHARED_COLUMNS, "metadata_json")


def _row(item: NewFeedback, now_us: int) -> tuple[Any, ...]:
    return (*_ROW_FIELDS(item), now_us)


def _chunks(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _record(row: Row) -> FeedbackRecord:
    m = row._mapping
    return FeedbackRecord(
        **{name: m[name] for name in SHARED_COLUMNS},
        sequence=m["sequence"],
        metadata=json.loads(m["metadata"]) if m["metadata"] else {},
        created_at_us=m["created_at"],
    )


def _filter_conditions(agent_id: str, filters: ListFilters) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [_c.agent_id == agent_id]
    if filters.kind:
        conditions.append(_c.kind == filters.kind)
    if filters.start_us is not None:
        conditions.append(_c.created_at >= filters.start_us)
    if filters.end_us is not None:
        conditions.append(_c.created_at < filters.end_us)
    if filters.min_score is not None:
        conditions.append(_c.score >= filters.min_score)
    if filters.max_score is not None:
        conditions.append(_c.score <= filters.max_score)
    if filters.policy_version:
        conditions.append(_c.policy_version == filters.policy_version)
    if filters.run_id:
        conditions.append(_c.run_id == filters.run_id)
    return conditions


def _stats_columns() -> list[ColumnElement[Any]]:
    """Aggregates of one pass; NULL scores (comparisons) drop out of avg/min/max and every bin."""
    score = _c.score
    bins = [func.sum(case((and_(score >= i / 10, score < (i + 1) / 10), 1), else_=0)) for i in range(9)]
    bins.append(func.sum(case((score >= 0.9, 1), else_=0)))  # the last bin is closed: [0.9, 1.0]
    return [
        func.count(),
        func.sum(case((_c.kind == RATING, 1), else_=0)),
        func.sum(case((_c.kind == COMPARISON, 1), else_=0)),
        func.avg(score),
        func.min(score),
        func.max(score),
        func.max(_c.sequence),
        *bins,
    ]


def _stats_from(values: Sequence[Any]) -> Stats:
    count, ratings, comparisons, mean, low, high, watermark, *bins = values
    return Stats(
        feedback_count=int(count or 0),
        rating_count=int(ratings or 0),
        comparison_count=int(comparisons or 0),
        score_mean=float(mean or 0.0),
        score_min=float(low or 0.0),
        score_max=float(high or 0.0),
        score_histogram=[int(b or 0) for b in bins],
        watermark=int(watermark or 0),
    )


def commit_in_sequence_order(conn: Connection, items: Sequence[NewFeedback]) -> None:
    """Make this insert's rows commit after every row of their agents with a lower sequence, so a watermark
    (the agent's highest committed sequence, read by stats and exports) never passes a row still to commit.

    Exports take rows with sequence <= watermark, so a row that commits later with a lower sequence than one
    already visible would be missing from an export made meanwhile and then present in another with the same
    watermark. SQLite has one writer at a time, so its commits are in sequence order already. On PostgreSQL,
    replicas (or any writers) insert concurrently and a sequence is handed out when a row is inserted, not when
    it commits: there, each insert transaction first takes a transaction-scoped advisory lock per agent it
    writes (in sorted order: no deadlock between two batches), so the agent's inserts run one at a time and
    their sequences rise in commit order. Writers of different agents still run in parallel; a hash collision
    between two agents only serialises them too. (A global order would need one lock for every writer; the
    watermark is per agent, so per agent is enough.)"""
    if conn.dialect.name != "postgresql":
        return
    for agent_id in sorted({item.agent_id for item in items}):
        conn.execute(_AGENT_LOCK, {"key": f"rlhf-feedback-agent:{agent_id}"})


_AGENT_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")


class FeedbackStore:
    """The `feedback` table of one database. Thread-safe: each call uses its own pooled connection."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create_tables(self) -> None:
        metadata_obj.create_all(self._engine)

    # -- writes ---------------------------------------------------------------------------------------

    def insert_many(self, items: Sequence[NewFeedback]) -> list[Stored]:
        """Store `items` in ONE transaction, idempotently on (agent_id, request_id); one result per item.

        A request_id seen before (in the database, or earlier in `items`) stores nothing and returns the
        original row with duplicate=True. If a concurrent writer (another process) inserts one of the ids
        between our lookup and our insert, the unique constraint fails the transaction; we retry, and the
        lookup then finds the row. (With psycopg the insert comes first, ON CONFLICT DO NOTHING, and only the
        ids it skipped are looked up.)
        """
        if not items:
            return []
        # SQLite: first insert without looking anything up (a lookup of every id cost ~40% of the insert, and
        # retries are rare); if the insert skipped a row (stored before, or twice in `items`), roll back and
        # take the lookup path.
        optimistic = self._engine.dialect.name == "sqlite"
        for attempt in range(_INSERT_ATTEMPTS):
            try:
                with self._engine.begin() as conn:
                    commit_in_sequence_order(conn, items)
                    if optimistic:
                        return self._insert_new_sqlite(conn, items)
                    return self._insert_group(conn, items)
            except _StoredBefore:
                optimistic = False
            except IntegrityError:
                if attempt == _INSERT_ATTEMPTS - 1:
                    raise
        with self._engine.begin() as conn:  # the optimistic try took the last attempt
            return self._insert_group(conn, items)

    def _insert_new_sqlite(self, conn: Connection, items: Sequence[NewFeedback]) -> list[Stored]:
        """Insert `items` expecting each (agent_id, request_id) to be new; _StoredBefore (and so a rollback)
        when one was stored before or comes twice."""
        now_us = time.time_ns() // 1000
        sequences = self._insert_sqlite(conn, items, now_us)
        if sequences is None:
            raise _StoredBefore
        return [
            Stored(sequence, now_us, False, item.kind, item.score, item.policy_version)
            for sequence, item in zip(sequences, items, strict=True)
        ]

    @staticmethod
    def _insert_sqlite(conn: Connection, items: Sequence[NewFeedback], now_us: int) -> range | None:
        """SQLite: insert `items` and return their sequences in order; None when a row was skipped because its
        (agent_id, request_id) was stored before (or came twice in `items`).

        SQLAlchemy answers RETURNING with a guaranteed order one row per statement on SQLite, which is ~3x
        slower. Instead: multi-row INSERTs (rows keep their VALUES order), then count back from
        last_insert_rowid(). Exact, because this transaction holds SQLite's single write lock (no other insert
        can interleave) and AUTOINCREMENT hands out consecutive values above every sequence ever used. The
        statement goes to the driver as is: SQLAlchemy's per-row parameter processing cost about as much as
        SQLite's insert itself."""
        inserted = last = 0
        for chunk in _chunks(items, _sqlite_rows_per_insert(conn)):
            result = conn.exec_driver_sql(_sqlite_insert(len(chunk)), _sqlite_parameters(chunk, now_us))
            inserted += result.rowcount
            last = result.lastrowid  # sqlite3_last_insert_rowid(): no statement (each costs a GIL hand-off)
        if inserted != len(items):
            return None
        return range(last - len(items) + 1, last + 1)

    def _existing(self, conn: Connection, items: Sequence[NewFeedback]) -> dict[tuple[str, str], Stored]:
        wanted: dict[str, set[str]] = {}
        for item in items:
            wanted.setdefault(item.agent_id, set()).add(item.request_id)
        found: dict[tuple[str, str], Stored] = {}
        columns = select(_c.sequence, _c.created_at, _c.kind, _c.score, _c.policy_version, _c.request_id)
        postgres = conn.dialect.name == "postgresql"
        for agent_id, request_ids in wanted.items():
            for chunk in _chunks(sorted(request_ids), _IN_CHUNK):
                if postgres:  # = ANY(array): one statement text whatever the count (IN (...) is re-parsed)
                    rows = conn.execute(
                        columns.where(_c.agent_id == agent_id, _c.request_id == any_(bindparam("ids", type_=_IDS))),
                        {"ids": list(chunk)},
                    )
                else:
                    rows = conn.execute(columns.where(_c.agent_id == agent_id, _c.request_id.in_(chunk)))
                for seq, created, kind, score, version, request_id in rows:
                    found[(agent_id, request_id)] = Stored(seq, created, True, kind, score, version)
        return found

    def _insert_group(self, conn: Connection, items: Sequence[NewFeedback]) -> list[Stored]:
        # With psycopg the insert itself tells the request_ids stored before (ON CONFLICT DO NOTHING), and
        # only those are looked up afterwards; a lookup of every id first cost ~4x the insert on PostgreSQL.
        insert_first = conn.dialect.driver == "psycopg"
        known = {} if insert_first else self._existing(conn, items)
        now_us = time.time_ns() // 1000
        first_index: dict[tuple[str, str], int] = {}
        new: list[NewFeedback] = []
        positions: list[int] = []
        for index, item in enumerate(items):
            key = (item.agent_id, item.request_id)
            if key in known or key in first_index:
                continue
            first_index[key] = index
            positions.append(index)
            new.append(item)
        results: list[Stored | None] = [None] * len(items)
        if new:
            sequences = self._insert_rows(conn, new, now_us)
            conflicts = [items[index] for index, sequence in zip(positions, sequences, strict=True) if sequence is None]
            if conflicts:
                known = self._existing(conn, conflicts)
                if any((item.agent_id, item.request_id) not in known for item in conflicts):
                    # Not visible to us (yet): fail the group like a unique violation, and retry it.
                    raise IntegrityError(_PG_INSERT, None, LookupError("a conflicting row is not visible"))
            for index, sequence in zip(positions, sequences, strict=True):
                if sequence is None:
                    continue  # stored before: answered from `known` below
                item = items[index]
                results[index] = Stored(sequence, now_us, False, item.kind, item.score, item.policy_version)
        out: list[Stored] = []
        for index, item in enumerate(items):
            result = results[index]
            if result is None:
                key = (item.agent_id, item.request_id)
                original = known.get(key) or results[first_index[key]]
                assert original is not None
                result = original._replace(duplicate=True)
            out.append(result)
        return out

    def _insert_rows(self, conn: Connection, items: list[NewFeedback], now_us: int) -> list[int | None]:
        """Insert `items` (created at `now_us`) and return their sequences in the same order; with psycopg,
        None for an item whose (agent_id, request_id) was stored before (nothing inserted)."""
        if conn.dialect.name == "sqlite":
            sequences = self._insert_sqlite(conn, items, now_us)
            if sequences is None:  # stored by another writer since this transaction looked every id up
                raise IntegrityError(_PG_INSERT, None, LookupError("a row was stored concurrently"))
            return list(sequences)
        rows = [_row(item, now_us) for item in items]
        if conn.dialect.driver == "psycopg":
            # psycopg 3: one prepared INSERT ... RETURNING per row, pipelined (one round trip for the batch), in
            # this transaction. A fixed statement text, unlike a multi-row VALUES list, which psycopg re-parses
            # for every batch (that cost ~10x the insert itself).
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.executemany(_PG_INSERT, rows, returning=True)
            except conn.dialect.loaded_dbapi.IntegrityError as error:  # what SQLAlchemy would have raised
                raise IntegrityError(_PG_INSERT, None, error) from error
            sequences: list[int | None] = []
            while True:
                row = cursor.fetchone()
                sequences.append(row[0] if row else None)
                if not cursor.nextset():
                    return sequences
        # Elsewhere: batched multi-row INSERT ... RETURNING, paired with rows by parameter order.
        statement = insert(feedback).returning(_c.sequence, sort_by_parameter_order=True)
        return list(conn.execute(statement, [dict(zip(ROW_COLUMNS, row, strict=True)) for row in rows]).scalars())

    def delete(self, agent_id: str, ids: Sequence[int] | None = None, everything: bool = False) -> int:
        """Delete the agent's rows with these sequences, or all of its rows; returns how many went."""
        with self._engine.begin() as conn:
            if everything:
                return conn.execute(delete(feedback).where(_c.agent_id == agent_id)).rowcount or 0
            deleted = 0
            for chunk in _chunks(sorted(set(ids or ())), _IN_CHUNK):
                result = conn.execute(delete(feedback).where(_c.agent_id == agent_id, _c.sequence.in_(chunk)))
                deleted += result.rowcount or 0
            return deleted

    # -- reads ----------------------------------------------------------------------------------------

    def list_feedback(
        self,
        agent_id: str,
        filters: ListFilters,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int = 100,
    ) -> list[FeedbackRecord]:
        """Newest first. Keyset pagination: the next page is `before=<last sequence>`, so rows inserted
        meanwhile (always with higher sequences) never shift or repeat what the next page returns."""
        conditions = _filter_conditions(agent_id, filters)
        if before is not None:
            conditions.append(_c.sequence < before)
        if after is not None:
            conditions.append(_c.sequence > after)
        query = select(feedback).where(*conditions).order_by(_c.sequence.desc()).limit(limit)
        with self._engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def max_sequence(self, agent_id: str) -> int:
        with self._engine.connect() as conn:
            value = conn.execute(select(func.max(_c.sequence)).where(_c.agent_id == agent_id)).scalar()
        return int(value or 0)

    def export_chunk(
        self, agent_id: str, kind: str, watermark: int, after_sequence: int, limit: int
    ) -> list[FeedbackRecord]:
        """Rows with after_sequence < sequence <= watermark, in sequence order, at most `limit`."""
        conditions = [_c.agent_id == agent_id, _c.sequence > after_sequence, _c.sequence <= watermark]
        if kind:
            conditions.append(_c.kind == kind)
        query = select(feedback).where(*conditions).order_by(_c.sequence).limit(limit)
        with self._engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def export(
        self, agent_id: str, kind: str, watermark: int, after_sequence: int, chunk: int
    ) -> Iterator[list[FeedbackRecord]]:
        """Chunks of an export in sequence order; one short query per chunk (no long-held connection)."""
        while True:
            records = self.export_chunk(agent_id, kind, watermark, after_sequence, chunk)
            if not records:
                return
            yield records
            after_sequence = records[-1].sequence
            if len(records) < chunk:
                return

    def stats(
        self, agent_id: str, start_us: int | None = None, end_us: int | None = None, group_by_version: bool = False
    ) -> StatsResult:
        """Counts, score mean/min/max/population std, 10-bin histogram and watermark, overall and per version."""
        conditions = _filter_conditions(agent_id, ListFilters(start_us=start_us, end_us=end_us))
        with self._engine.connect() as conn:
            row = conn.execute(select(*_stats_columns()).where(*conditions)).one()
            overall = _stats_from(row)
            if overall.rating_count:
                # Second pass around the known mean: exact where E[x^2] - mean^2 would cancel.
                deviation = _c.score - overall.score_mean
                variance = conn.execute(
                    select(func.avg(deviation * deviation)).where(*conditions, _c.score.is_not(None))
                ).scalar()
                overall.score_std = math.sqrt(max(float(variance or 0.0), 0.0))
            by_version: dict[str, Stats] | None = None
            if group_by_version:
                by_version = {}
                grouped = select(_c.policy_version, *_stats_columns()).where(*conditions)
                for version, *values in conn.execute(grouped.group_by(_c.policy_version)):
                    by_version[version] = _stats_from(values)
                means = (
                    select(_c.policy_version.label("version"), func.avg(_c.score).label("mean"))
                    .where(*conditions)
                    .group_by(_c.policy_version)
                    .subquery()
                )
                deviation = _c.score - means.c.mean
                spread = (
                    select(_c.policy_version, func.avg(deviation * deviation))
                    .select_from(feedback.join(means, _c.policy_version == means.c.version))
                    .where(*conditions, _c.score.is_not(None))
                    .group_by(_c.policy_version)
                )
                for version, variance in conn.execute(spread):
                    by_version[version].score_std = math.sqrt(max(float(variance or 0.0), 0.0))
        return StatsResult(overall=overall, by_policy_version=by_version)
