"""Feedback ingestion: rows/s acknowledged (durably committed) by the feedback service, SQLite.

Modes, each against a fresh feedback server in its own process (fresh SQLite file):
  * one StreamFeedback stream carrying every item;
  * 8 concurrent StreamFeedback streams (one channel and client thread each), the items split between them;
  * one unary SubmitFeedback call per item, sequentially (fewer items: it is slow).
Baseline (the floor), in the same run: the same rows bulk-inserted straight through SQLAlchemy into a fresh
SQLite file with the service's own table (feedback_service.store.feedback) and engine settings (WAL,
synchronous=NORMAL), in one executemany + commit. A diagnostic row shows the service's store layer alone
(FeedbackStore.insert_many in groups of the server's commit-group size, with its idempotency lookup).

Roadmap goal (2 cores, SQLite): >= 20,000 items/s over one stream, and within 3x of the direct bulk insert.

    python bench/bench_feedback_ingest.py [--quick] [--items N] [--unary-items N] [--streams K]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import threading
import time

import _common as common  # noqa: E402  (sets sys.path and the environment)

from rlhf.feedback.v1 import feedback_service_pb2 as fb  # noqa: E402
from rlhf.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from rlhf.sdk.clients import channel as make_channel  # noqa: E402

AGENT = "bench-agent"
GOAL_STREAM_ITEMS_S = 20_000
GOAL_RATIO_TO_DIRECT = 3.0


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


def stream_once(stub: fb_grpc.FeedbackServiceStub, requests: list[fb.SubmitFeedbackRequest]) -> int:
    acks = 0
    for ack in stub.StreamFeedback((fb.StreamFeedbackRequest(feedback=r) for r in requests), timeout=600):
        if not ack.accepted or ack.duplicate:
            raise RuntimeError(f"item {ack.index} not stored: {ack.reason or 'duplicate'}")
        acks += 1
    if acks != len(requests):
        raise RuntimeError(f"{acks} acks for {len(requests)} items")
    return acks


def run_service_mode(mode: str, requests: list[fb.SubmitFeedbackRequest], streams: int) -> dict:
    with common.scratch_dir(f"ingest-{mode}") as data_dir, common.ServerProcess("feedback_service", data_dir) as server:
        channels = [make_channel(server.address) for _ in range(max(1, streams))]
        stubs = [fb_grpc.FeedbackServiceStub(c) for c in channels]
        for stub in stubs:
            warm_up(stub)
        server_cpu0, client_cpu0 = process_cpu_seconds(server.process.pid), self_cpu_seconds()
        started = time.perf_counter()
        if mode == "stream_1":
            stream_once(stubs[0], requests)
        elif mode == "stream_n":
            parts = [requests[i::streams] for i in range(streams)]
            errors: list[BaseException] = []
            barrier = threading.Barrier(streams + 1)

            def worker(stub, part):
                barrier.wait()
                try:
                    stream_once(stub, part)
                except BaseException as error:  # noqa: BLE001 - re-raised below
                    errors.append(error)

            threads = [threading.Thread(target=worker, args=(s, p)) for s, p in zip(stubs, parts, strict=False)]
            for t in threads:
                t.start()
            barrier.wait()
            started = time.perf_counter()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
        elif mode == "unary":
            for request in requests:
                stubs[0].SubmitFeedback(request, timeout=30)
        else:
            raise ValueError(mode)
        seconds = time.perf_counter() - started
        server_cpu = process_cpu_seconds(server.process.pid) - server_cpu0
        client_cpu = self_cpu_seconds() - client_cpu0
        stats = stubs[0].GetFeedbackStats(fb.GetFeedbackStatsRequest(agent_id=AGENT), timeout=60).stats
        if stats.feedback_count != len(requests):
            raise RuntimeError(f"{mode}: {stats.feedback_count} rows stored, {len(requests)} sent")
        for c in channels:
            c.close()
    return {
        "items": len(requests),
        "seconds": seconds,
        "items_per_s": len(requests) / seconds,
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "server_cpu_us_per_item": server_cpu / len(requests) * 1e6,
        "client_cpu_us_per_item": client_cpu / len(requests) * 1e6,
    }


def rows_of(items: list[dict]) -> list[dict]:
    now_us = time.time_ns() // 1000
    return [
        {
            "agent_id": AGENT,
            "kind": "rating",
            "prompt": it["prompt"],
            "response": it["response"],
            "score": it["score"],
            "chosen": "",
            "rejected": "",
            "margin": None,
            "run_id": it["run_id"],
            "notes": "",
            "generation_id": "",
            "policy_version": it["policy_version"],
            "metadata": json.dumps(it["metadata"]),
            "request_id": it["request_id"],
            "created_at": now_us,
        }
        for it in items
    ]


def run_direct(items: list[dict]) -> dict:
    """The floor: one executemany of every row into a fresh SQLite file, then one commit."""
    from sqlalchemy import func, insert, select

    from feedback_service.store import feedback, metadata_obj
    from rlhf.runtime.db import make_engine

    rows = rows_of(items)
    with common.scratch_dir("ingest-direct") as folder:
        engine = make_engine(f"sqlite:///{folder / 'feedback.db'}")
        metadata_obj.create_all(engine)
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(insert(feedback), rows)
        seconds = time.perf_counter() - started
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(feedback)).scalar_one() == len(rows)
        engine.dispose()
    return {"items": len(rows), "seconds": seconds, "items_per_s": len(rows) / seconds}


def run_store(items: list[dict], group: int) -> dict:
    """Diagnostic: the service's store layer alone (validation and gRPC excluded), groups of `group`."""
    from feedback_service.models import NewFeedback
    from feedback_service.store import FeedbackStore
    from rlhf.runtime.db import make_engine

    news = [
        NewFeedback(
            agent_id=AGENT,
            kind="rating",
            prompt=it["prompt"],
            response=it["response"],
            score=it["score"],
            chosen="",
            rejected="",
            margin=None,
            run_id=it["run_id"],
            notes="",
            generation_id="",
            policy_version=it["policy_version"],
            metadata_json=json.dumps(it["metadata"]),
            request_id=it["request_id"],
        )
        for it in items
    ]
    with common.scratch_dir("ingest-store") as folder:
        engine = make_engine(f"sqlite:///{folder / 'feedback.db'}")
        store = FeedbackStore(engine)
        store.create_tables()
        started = time.perf_counter()
        for start in range(0, len(news), group):
            store.insert_many(news[start : start + group])
        seconds = time.perf_counter() - started
        engine.dispose()
    return {"items": len(news), "seconds": seconds, "items_per_s": len(news) / seconds, "group": group}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--items", type=int, help="items for the stream modes and the baseline (default 20000)")
    parser.add_argument("--unary-items", type=int, help="items sent one unary call each (default 2000)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (default 8)")
    args = parser.parse_args()
    items_n = args.items or (4000 if args.quick else 20_000)
    unary_n = args.unary_items or (400 if args.quick else 2000)

    info = common.machine()
    common.print_machine(info)
    from feedback_service.config import FeedbackServiceConfig

    group_size = FeedbackServiceConfig.from_env().stream_group_size  # what the server will use
    items = make_items(items_n)
    requests = requests_of(items)

    results: dict[str, dict] = {}
    results["direct_bulk_insert"] = run_direct(items)
    print(f"direct bulk insert: {results['direct_bulk_insert']['items_per_s']:,.0f} items/s", flush=True)
    results["store_insert_many"] = run_store(items, group_size)
    results["stream_1"] = run_service_mode("stream_1", requests, 1)
    print(f"1 stream: {results['stream_1']['items_per_s']:,.0f} items/s", flush=True)
    results["stream_n"] = run_service_mode("stream_n", requests, args.streams)
    print(f"{args.streams} streams: {results['stream_n']['items_per_s']:,.0f} items/s", flush=True)
    results["unary"] = run_service_mode("unary", requests[:unary_n], 1)
    print(f"unary: {results['unary']['items_per_s']:,.0f} items/s", flush=True)

    floor = results["direct_bulk_insert"]["items_per_s"]
    for r in results.values():
        r["slowdown_vs_direct"] = floor / r["items_per_s"]
    labels = {
        "direct_bulk_insert": "direct SQLAlchemy bulk insert (baseline)",
        "store_insert_many": f"FeedbackStore.insert_many, {group_size}/txn (no gRPC)",
        "stream_1": "StreamFeedback, 1 stream",
        "stream_n": f"StreamFeedback, {args.streams} streams",
        "unary": "SubmitFeedback, 1 unary call per item",
    }
    print()
    common.print_table(
        ["mode", "items", "seconds", "items/s", "x slower than direct", "server CPU us/item", "client CPU us/item"],
        [
            [
                labels[k],
                r["items"],
                r["seconds"],
                r["items_per_s"],
                r["slowdown_vs_direct"],
                r.get("server_cpu_us_per_item", "-"),
                r.get("client_cpu_us_per_item", "-"),
            ]
            for k, r in results.items()
        ],
    )
    one = results["stream_1"]
    met_rate = one["items_per_s"] >= GOAL_STREAM_ITEMS_S
    met_ratio = one["slowdown_vs_direct"] <= GOAL_RATIO_TO_DIRECT
    print(
        f"\ngoal: >= {GOAL_STREAM_ITEMS_S:,} items/s on one stream: {'MET' if met_rate else 'NOT MET'} "
        f"({one['items_per_s']:,.0f}); within {GOAL_RATIO_TO_DIRECT:g}x of direct insert: "
        f"{'MET' if met_ratio else 'NOT MET'} ({one['slowdown_vs_direct']:.1f}x)"
    )
    common.write_results(
        "feedback_ingest",
        {
            "benchmark": "feedback_ingest",
            "machine": info,
            "database": "sqlite (WAL, synchronous=NORMAL)",
            "server_group_size": group_size,
            "streams": args.streams,
            "results": results,
            "goal": {
                "stream_items_per_s": GOAL_STREAM_ITEMS_S,
                "max_slowdown_vs_direct": GOAL_RATIO_TO_DIRECT,
                "met_rate": met_rate,
                "met_ratio": met_ratio,
            },
        },
    )


if __name__ == "__main__":
    main()
