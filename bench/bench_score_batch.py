"""Reward scoring: pairs/s through ScoreBatch over gRPC vs the same batch scored in-process.

Setup: a feedback server and a reward server, each in its own process; 60 synthetic ratings
(tests.helpers.rated_answers) are submitted and a reward model is trained on them through the real services
(full fine-tune, 1 epoch, batch 16, lr 5e-4, on the tiny model). Then, for batch sizes 16, 64 and 256:
  * gRPC: `RewardClient.score` (one ScoreBatch call: request building, transport, model lookup, scoring,
    response) against the reward server;
  * baseline, same run: `rlhf.training.scoring.Scorer.score` in this process on the same model folder,
    with the service's micro-batch size and device, called from a worker thread as the service calls it
    (asyncio.to_thread). On a loaded 2-core machine, back-to-back calls from the main thread were up to 4x
    slower than from a worker thread (OpenMP scheduling under CPU contention), which would flatter gRPC.
The two are interleaved call by call. Overhead = grpc_time / inprocess_time - 1 on the median wall time per
call; also on the best (minimum) call, and on CPU seconds per call (client + reward-server process for gRPC,
this process for in-process), which stays meaningful when other work loads the machine.
Roadmap goal: <= 10% at batch 64 (judged on the median wall time).

    python bench/bench_score_batch.py [--quick] [--sizes 16,64,256] [--seconds S]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import time

import _common as common  # noqa: E402  (sets sys.path and the environment)

GOAL_OVERHEAD_AT_64 = 0.10


def self_cpu() -> float:
    times = os.times()
    return times.user + times.system


def process_cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, all threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--sizes", default="16,64,256", help="comma-separated batch sizes (default 16,64,256)")
    parser.add_argument("--seconds", type=float, help="timed seconds per path and size (default 4, quick 1)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    budget = args.seconds or (1.0 if args.quick else 4.0)

    info = common.machine()
    common.print_machine(info)
    _, model_s = common.ensure_tiny_model()

    from reward_service.config import RewardServiceConfig
    from rlhf.sdk.clients import RewardClient
    from rlhf.training.modeling import pick_device
    from rlhf.training.scoring import Scorer, load_reward_model
    from tests.helpers import rated_answers

    service_defaults = RewardServiceConfig.from_env()
    device = pick_device(service_defaults.device)
    texts = [(p, r) for p, r, _ in rated_answers(max(sizes), seed=99)]
    rows = []
    with common.reward_stack("score") as (reward_server, version, model_path, train_s):
        print(
            f"setup: tiny model {model_s:.1f}s, reward model {version} trained through the services in {train_s:.1f}s",
            flush=True,
        )
        scorer = Scorer(device, service_defaults.score_micro_batch, cache_size=1)
        loaded = load_reward_model(model_path, device)
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inprocess-scorer")
        with pool, RewardClient(reward_server.address, timeout=120) as client:
            for size in sizes:
                pairs = texts[:size]

                def grpc_call(pairs: list[tuple[str, str]] = pairs) -> list[float]:
                    return [s.score for s in client.score("bench", pairs, version=version).scores]

                def local_call(pairs: list[tuple[str, str]] = pairs) -> list[float]:
                    return [s.score for s in pool.submit(scorer.score, loaded, pairs).result()]

                # Warm up (first load of the model in the server, allocator, thread pools) and check that
                # both paths give the same scores.
                for _ in range(2):
                    remote, local = grpc_call(), local_call()
                diff = max(abs(a - b) for a, b in zip(remote, local, strict=False))
                est = time.perf_counter()
                grpc_call()
                local_call()
                per_round = time.perf_counter() - est
                rounds = max(5, int(2 * budget / max(per_round, 1e-6)))
                grpc_times, local_times, grpc_cpu, local_cpu = [], [], [], []
                server_pid = reward_server.process.pid
                for i in range(rounds):
                    order = (grpc_call, local_call) if i % 2 == 0 else (local_call, grpc_call)
                    for call in order:
                        c0, s0, t0 = self_cpu(), process_cpu(server_pid), time.perf_counter()
                        call()
                        wall, own, server = time.perf_counter() - t0, self_cpu() - c0, process_cpu(server_pid) - s0
                        if call is grpc_call:
                            grpc_times.append(wall)
                            grpc_cpu.append(own + server)
                        else:
                            local_times.append(wall)
                            local_cpu.append(own)
                g, loc = common.median(grpc_times), common.median(local_times)
                gc, lc = sum(grpc_cpu) / len(grpc_cpu), sum(local_cpu) / len(local_cpu)
                row = {
                    "batch": size,
                    "rounds": rounds,
                    "grpc_s": g,
                    "inprocess_s": loc,
                    "grpc_pairs_per_s": size / g,
                    "inprocess_pairs_per_s": size / loc,
                    "overhead": g / loc - 1,
                    "grpc_minus_inprocess_ms": (g - loc) * 1000,
                    "overhead_best_of": min(grpc_times) / min(local_times) - 1,
                    "grpc_cpu_s": gc,
                    "inprocess_cpu_s": lc,
                    "cpu_overhead": gc / lc - 1,
                    "max_abs_score_diff": diff,
                }
                rows.append(row)
                print(
                    f"batch {size}: gRPC {size / g:,.0f} pairs/s, in-process {size / loc:,.0f} pairs/s, "
                    f"overhead {100 * (g / loc - 1):+.1f}%",
                    flush=True,
                )

    print()
    common.print_table(
        [
            "batch",
            "gRPC pairs/s",
            "in-process pairs/s",
            "gRPC ms/call",
            "in-process ms/call",
            "overhead %",
            "best-of overhead %",
            "CPU overhead %",
            "rounds",
        ],
        [
            [
                r["batch"],
                r["grpc_pairs_per_s"],
                r["inprocess_pairs_per_s"],
                r["grpc_s"] * 1000,
                r["inprocess_s"] * 1000,
                100 * r["overhead"],
                100 * r["overhead_best_of"],
                100 * r["cpu_overhead"],
                r["rounds"],
            ]
            for r in rows
        ],
    )
    at64 = next((r for r in rows if r["batch"] == 64), None)
    met = at64 is not None and at64["overhead"] <= GOAL_OVERHEAD_AT_64
    if at64 is not None:
        print(
            f"\ngoal: gRPC overhead <= {100 * GOAL_OVERHEAD_AT_64:.0f}% at batch 64: "
            f"{'MET' if met else 'NOT MET'} ({100 * at64['overhead']:+.1f}%)"
        )
    common.write_results(
        "score_batch",
        {
            "benchmark": "score_batch",
            "machine": info,
            "device": device,
            "micro_batch": service_defaults.score_micro_batch,
            "reward_model": {"version": version, "path": model_path},
            "setup_seconds": {"tiny_model": model_s, "reward_model_training": train_s},
            "results": rows,
            "goal": {"max_overhead_at_64": GOAL_OVERHEAD_AT_64, "met": met},
        },
    )


if __name__ == "__main__":
    main()
