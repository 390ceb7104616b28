"""Feedback ingestion: items/s acknowledged (durably committed) by the feedback service on one stream.

Rounds, interleaved so that load on a shared machine hits every mode alike; each service mode against a fresh
feedback server in its own process and a fresh database:
  * baseline (the floor), raw `sqlite3` (no SQLAlchemy): executemany of the same rows into a fresh file with
    the service's own table and indexes, WAL, synchronous=NORMAL, one commit per group of the server's
    commit-group size (the durability of an acknowledgement), and, for reference, in one transaction;
  * one StreamFeedback stream through the SDK's FeedbackClient.stream (batches of whatever is ready, up to
    --batch items per message): items/s and the p50/p99 acknowledgement latency (an item handed to the
    client until its acknowledgement arrived) at full speed, and at a paced rate (--paced-rate);
  * the SDK's FeedbackSender (submit() every item, flush());
  * round 1 only: the same stream with one item per message (batch 1), as the protocol was before batching.
With --postgres URL (or --postgres-auto: the URL .ci/postgres.sh wrote), the stream and the raw baseline
(psycopg executemany, one commit per group) also run on PostgreSQL, each run in a fresh database.

Roadmap goal (issue 10; 2 cores, client included, SQLite): >= 30,000 items/s acknowledged on one stream, and
within 2x of raw sqlite3 at the same durability.

    python bench/bench_feedback_ingest.py [--quick] [--items N] [--rounds R] [--batch B] [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import resource
import sqlite3
import time
import uuid
from collections.abc import Iterator

import _common as common  # noqa: E402  (sets sys.path and the environment)

from rlhf.feedback.v1 import feedback_service_pb2 as fb  # noqa: E402
from rlhf.feedback.v1 import feedback_service_pb2_grpc as fb_grpc  # noqa: E402
from rlhf.sdk.clients import FeedbackClient  # noqa: E402

AGENT = "bench-agent"
GOAL_STREAM_ITEMS_S = 30_000
GOAL_RATIO_TO_RAW = 2.0


def make_items(count: int, seed: int = 0) -> list[dict]:
    """Realistic ratings: a question, a 1-3 sentence answer, a score, run/version ids, a little metadata."""
    from rlhf.sdk import rater
    from rlhf.training import corpus

    rng = random.Random(seed)
    topics = sorted(corpus.TOPICS)
    pool = []
    for _ in range(500):
        answer = " " + " ".join(corpus.sentence(rng, rng.choice(topics)) for _ in range(rng.randint(1, 3)))
        pool.append((rng.choice(corpus.QUESTIONS), answer, rater.rate(answer)))
    items = []
    for i in range(count):
        prompt, response, score = pool[i % len(pool)]
        items.append(
            {
                "prompt": prompt,
                "response": response,
                "score": score,
                "run_id": f"run-{i // 1000}",
                "policy_version": "v1",
                "metadata": {"source": "bench"},
                "request_id": f"req-{i:08d}",
            }
        )
    return items


def requests_of(items: list[dict]) -> list[fb.SubmitFeedbackRequest]:
    return [fb.SubmitFeedbackRequest(agent_id=AGENT, **item) for item in items]


def process_cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def warm_up(stub: fb_grpc.FeedbackServiceStub) -> None:
    """Open the connection and touch the database once, outside the timed part."""
    stub.SubmitFeedback(
        fb.SubmitFeedbackRequest(agent_id="warmup", prompt="q?", response=" a.", score=0.5, request_id="warmup"),
        timeout=30,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def server_args(database_url: str) -> list[str]:
    return ["--database-url", database_url] if database_url else []


def run_stream(requests: list[fb.SubmitFeedbackRequest], database_url: str, batch: int, rate: float = 0.0) -> dict:
    """One FeedbackClient.stream of every item against a fresh server; `rate` > 0 paces the producer."""
    handed = [0.0] * len(requests)
    acked = [0.0] * len(requests)

    def produce() -> Iterator[fb.SubmitFeedbackRequest]:
        began = time.perf_counter()
        for i, request in enumerate(requests):
            if rate:
                wait = began + i / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            handed[i] = time.perf_counter()
            yield request

    with common.scratch_dir("ingest-stream") as data_dir:
        url = database_url or f"sqlite:///{data_dir / 'feedback.db'}"
        with common.ServerProcess("feedback_service", data_dir, *server_args(url)) as server:
            with FeedbackClient(server.address) as client:
                warm_up(client.stub)
                server_cpu0, client_cpu0 = process_cpu_seconds(server.process.pid), self_cpu_seconds()
                started = time.perf_counter()
                count = 0
                for ack in client.stream(produce(), timeout=600, batch_items=batch):
                    if not ack.accepted or ack.duplicate:
                        raise RuntimeError(f"item {ack.index} not stored: {ack.reason or 'duplicate'}")
                    acked[ack.index] = time.perf_counter()
                    count += 1
                seconds = time.perf_counter() - started
                server_cpu = process_cpu_seconds(server.process.pid) - server_cpu0
                client_cpu = self_cpu_seconds() - client_cpu0
                stored = client.stats(AGENT).stats.feedback_count
    if count != len(requests) or stored != len(requests):
        raise RuntimeError(f"{count} acks and {stored} rows for {len(requests)} items")
    latencies = [(a - h) * 1000 for a, h in zip(acked, handed, strict=True)]
    return {
        "items": len(requests),
        "batch": batch,
        "paced_rate": rate,
        "seconds": seconds,
        "items_per_s": len(requests) / seconds,
        "ack_latency_ms_p50": percentile(latencies, 0.50),
        "ack_latency_ms_p99": percentile(latencies, 0.99),
        "server_cpu_us_per_item": server_cpu / len(requests) * 1e6,
        "client_cpu_us_per_item": client_cpu / len(requests) * 1e6,
    }


def run_sender(requests: list[fb.SubmitFeedbackRequest]) -> dict:
    """The SDK's FeedbackSender: submit every item (its queue blocks when full), then flush."""
    from rlhf.sdk.sender import FeedbackSender, SenderConfig

    with common.scratch_dir("ingest-sender") as data_dir:
        with common.ServerProcess("feedback_service", data_dir) as server:
            with FeedbackClient(server.address) as client:
                warm_up(client.stub)
            with FeedbackSender(SenderConfig(address=server.address)) as sender:
                sender.submit(AGENT, prompt="q?", response=" a.", score=0.5, request_id="sender-warmup")
                if not sender.flush(60):
                    raise RuntimeError("the sender could not reach the server")
                started = time.perf_counter()
                for request in requests:
                    sender.submit_request(request)
                if not sender.flush(600):
                    raise RuntimeError(f"sender did not finish: {sender.stats()}")
                seconds = time.perf_counter() - started
                stats = sender.stats()
    if stats.acknowledged != len(requests) + 1 or stats.duplicate:
        raise RuntimeError(f"sender: {stats}")
    return {
        "items": len(requests),
        "seconds": seconds,
        "items_per_s": len(requests) / seconds,
        "mean_batch": stats.sent / max(1, stats.messages),
    }


def tuples_of(items: list[dict]) -> list[tuple]:
    """The rows in the column order of the service's own insert (feedback_service.store.ROW_COLUMNS)."""
    now_us = time.time_ns() // 1000
    return [
        (AGENT, "rating", it["prompt"], it["response"], it["score"], "", "", None, it["run_id"], "", "",
         it["policy_version"], it["request_id"], json.dumps(it["metadata"]), now_us)
        for it in items
    ]  # fmt: skip


def run_raw_sqlite(items: list[dict], group: int) -> dict:
    """The floor: raw sqlite3 executemany, the service's table and pragmas, one commit per `group` rows."""
    from feedback_service.store import ROW_COLUMNS, metadata_obj
    from rlhf.runtime.db import make_engine

    rows = tuples_of(items)
    insert = f"INSERT INTO feedback ({', '.join(ROW_COLUMNS)}) VALUES ({', '.join('?' * len(ROW_COLUMNS))})"
    with common.scratch_dir("ingest-raw") as folder:
        path = folder / "feedback.db"
        engine = make_engine(f"sqlite:///{path}")
        metadata_obj.create_all(engine)  # the same table and indexes as the service's
        engine.dispose()
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        started = time.perf_counter()
        for start in range(0, len(rows), group):
            conn.execute("BEGIN")
            conn.executemany(insert, rows[start : start + group])
            conn.execute("COMMIT")
        seconds = time.perf_counter() - started
        assert conn.execute("SELECT count(*) FROM feedback").fetchone()[0] == len(rows)
        conn.close()
    return {"items": len(rows), "seconds": seconds, "items_per_s": len(rows) / seconds, "group": group}


def fresh_postgres_database(admin_url: str) -> str:
    """A new empty database on the server of `admin_url`; its SQLAlchemy URL."""
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return admin_url.rsplit("/", 1)[0] + "/" + name


def run_raw_postgres(items: list[dict], group: int, admin_url: str) -> dict:
    """The PostgreSQL floor: psycopg executemany into the service's table, one commit per `group` rows."""
    import psycopg
    from sqlalchemy import create_engine

    from feedback_service.store import ROW_COLUMNS, metadata_obj

    url = fresh_postgres_database(admin_url)
    engine = create_engine(url)
    metadata_obj.create_all(engine)
    engine.dispose()
    rows = tuples_of(items)
    insert = f"INSERT INTO feedback ({', '.join(ROW_COLUMNS)}) VALUES ({', '.join(['%s'] * len(ROW_COLUMNS))})"
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        started = time.perf_counter()
        for start in range(0, len(rows), group):
            with conn.cursor() as cursor:
                cursor.executemany(insert, rows[start : start + group])
            conn.commit()
        seconds = time.perf_counter() - started
    return {"items": len(rows), "seconds": seconds, "items_per_s": len(rows) / seconds, "group": group}


def summary(runs: list[dict]) -> dict:
    """The median run of a mode (by items/s), with every run's rate beside it."""
    ordered = sorted(runs, key=lambda r: r["items_per_s"])
    middle = dict(ordered[len(ordered) // 2])
    middle["items_per_s_runs"] = [round(r["items_per_s"]) for r in runs]
    return middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round (a smoke run)")
    parser.add_argument("--items", type=int, help="items per run (default 100000; --quick 10000)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    parser.add_argument("--batch", type=int, default=512, help="most items per stream message (default 512)")
    parser.add_argument("--paced-rate", type=float, default=10_000, help="items/s of the paced run (default 10000)")
    parser.add_argument("--postgres", default="", help="also run on this PostgreSQL (SQLAlchemy URL)")
    parser.add_argument("--postgres-items", type=int, default=20_000, help="items per PostgreSQL run (20000)")
    parser.add_argument(
        "--postgres-paced-rate", type=float, default=1_000, help="items/s of the paced PostgreSQL run (1000)"
    )
    parser.add_argument("--postgres-auto", action="store_true", help="use the URL in .ci/.pg_url (.ci/postgres.sh)")
    args = parser.parse_args()
    items_n = args.items or (10_000 if args.quick else 100_000)
    rounds = args.rounds or (1 if args.quick else 3)
    postgres = args.postgres
    if args.postgres_auto and not postgres:
        postgres = (pathlib.Path(__file__).resolve().parent.parent / ".ci" / ".pg_url").read_text().strip()

    info = common.machine()
    common.print_machine(info)
    from feedback_service.config import FeedbackServiceConfig

    group_size = FeedbackServiceConfig.from_env().stream_group_size  # what the server will use
    items = make_items(items_n)
    requests = requests_of(items)
    paced_n = min(items_n, int(args.paced_rate * 3))  # about 3 s at the paced rate
    runs: dict[str, list[dict]] = {}
    loads: list[float] = []

    def record(name: str, result: dict) -> None:
        runs.setdefault(name, []).append(result)
        loads.append(os.getloadavg()[0])
        extra = (
            f", p50 {result['ack_latency_ms_p50']:.1f} ms, p99 {result['ack_latency_ms_p99']:.1f} ms"
            if ("ack_latency_ms_p50" in result)
            else ""
        )
        print(f"  {name}: {result['items_per_s']:,.0f} items/s{extra} (load {loads[-1]:.1f})", flush=True)

    for round_no in range(rounds):
        print(f"round {round_no + 1}/{rounds}", flush=True)
        record("raw_sqlite_group", run_raw_sqlite(items, group_size))
        record("stream_sqlite", run_stream(requests, "", args.batch))
        record("raw_sqlite_one_txn", run_raw_sqlite(items, len(items)))
        record("sender_sqlite", run_sender(requests))
        record("stream_sqlite_paced", run_stream(requests[:paced_n], "", args.batch, args.paced_rate))
        if round_no == 0:
            single_n = max(1000, items_n // 10)
            record("stream_sqlite_batch1", run_stream(requests[:single_n], "", 1))
        if postgres:  # fewer items: PostgreSQL commits (fsync) are far slower here
            pg_n = min(items_n, args.postgres_items)
            record("raw_postgres_group", run_raw_postgres(items[:pg_n], group_size, postgres))
            record("stream_postgres", run_stream(requests[:pg_n], fresh_postgres_database(postgres), args.batch))
            pg_rate = args.postgres_paced_rate
            record(
                "stream_postgres_paced",
                run_stream(requests[: int(pg_rate * 3)], fresh_postgres_database(postgres), args.batch, pg_rate),
            )

    results = {name: summary(r) for name, r in runs.items()}
    floors = {"sqlite": results["raw_sqlite_group"]["items_per_s"]}
    if postgres:
        floors["postgres"] = results["raw_postgres_group"]["items_per_s"]
    for name, r in results.items():
        if not name.startswith("raw_"):
            r["slowdown_vs_raw"] = floors["postgres" if "postgres" in name else "sqlite"] / r["items_per_s"]
    labels = {
        "raw_sqlite_group": f"raw sqlite3 executemany, {group_size} rows/commit (baseline)",
        "raw_sqlite_one_txn": "raw sqlite3 executemany, one transaction",
        "stream_sqlite": f"FeedbackClient.stream, batches <= {args.batch}",
        "stream_sqlite_paced": f"  same, paced at {args.paced_rate:,.0f} items/s",
        "sender_sqlite": "FeedbackSender (submit + flush)",
        "stream_sqlite_batch1": "FeedbackClient.stream, 1 item per message (before)",
        "raw_postgres_group": f"PostgreSQL: raw psycopg executemany, {group_size} rows/commit",
        "stream_postgres": f"PostgreSQL: FeedbackClient.stream, batches <= {args.batch}",
        "stream_postgres_paced": f"PostgreSQL:   same, paced at {args.postgres_paced_rate:,.0f} items/s",
    }
    print()
    common.print_table(
        ["mode", "items", "items/s (median)", "x slower than raw", "ack p50 ms", "ack p99 ms", "server us/item"],
        [
            [
                labels[k],
                r["items"],
                r["items_per_s"],
                r.get("slowdown_vs_raw", "-"),
                r.get("ack_latency_ms_p50", "-"),
                r.get("ack_latency_ms_p99", "-"),
                r.get("server_cpu_us_per_item", "-"),
            ]
            for k, r in results.items()
        ],
    )
    one = results["stream_sqlite"]
    met_rate = one["items_per_s"] >= GOAL_STREAM_ITEMS_S
    met_ratio = one["slowdown_vs_raw"] <= GOAL_RATIO_TO_RAW
    print(
        f"\nload average during the runs: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores\n"
        f"goal: >= {GOAL_STREAM_ITEMS_S:,} items/s on one stream: {'MET' if met_rate else 'NOT MET'} "
        f"({one['items_per_s']:,.0f}); within {GOAL_RATIO_TO_RAW:g}x of raw sqlite3: "
        f"{'MET' if met_ratio else 'NOT MET'} ({one['slowdown_vs_raw']:.2f}x)"
    )
    common.write_results(
        "feedback_ingest",
        {
            "benchmark": "feedback_ingest",
            "machine": info,
            "database": "sqlite (WAL, synchronous=NORMAL)" + (" and postgresql" if postgres else ""),
            "server_group_size": group_size,
            "batch_items": args.batch,
            "rounds": rounds,
            "load_average_during": [min(loads), max(loads)],
            "results": results,
            "goal": {
                "stream_items_per_s": GOAL_STREAM_ITEMS_S,
                "max_slowdown_vs_raw": GOAL_RATIO_TO_RAW,
                "met_rate": met_rate,
                "met_ratio": met_ratio,
            },
        },
    )


if __name__ == "__main__":
    main()
