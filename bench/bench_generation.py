"""Generation throughput: continuous batching against one-at-a-time generation, in the same run.

Setup: two inference servers in their own processes on the tiny model (`version="base"`, no policy service):
  * "batching": the default engine (continuous batching, inference_service/engine.py);
  * "one at a time": the same server with RLHF_INFERENCE_BATCHING=0, i.e. today's path before batching
    (each request its own sampling loop in an executor thread).
Both answer the very same requests (same prompts from rlhf.training.corpus, same seeds), so they do the same
work: with a seed the two engines produce the same tokens (checked: the texts are compared).

Scenarios, run in rounds that alternate the two servers (so load from other work hits both alike):
  * lone: one client, requests back to back; latency per request and tokens/s;
  * 16 clients: 16 threads, each sending requests back to back (closed loop) over one channel; tokens/s over
    the round's wall time.
Sampling: temperature 1.0, top_p 0.95, 64 new tokens at most, seed = request number ("natural": responses end
at EOS as the model decides), and a "fixed" variant at temperature 5, top_k 0 (near-uniform, practically never
EOS: every response is 64 tokens, so per-token cost dominates).
Tokens/s counts completion tokens (as reported by the server) per second of wall time; min and median over
rounds. Roadmap goals: 16 clients >= 4x the tokens/s of one-at-a-time generation (judged against both its
16-client rate, the stricter, and its one-client rate, the issue's framing); a lone request no more than 10%
slower than one-at-a-time (median latency; lone requests alternate between the servers request by request).

    python bench/bench_generation.py [--quick] [--rounds N] [--clients 16] [--per-client 4]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import time

import _common as common  # noqa: E402  (sets sys.path and the environment)

GOAL_SPEEDUP = 4.0
GOAL_LONE_SLOWDOWN = 0.10
SCENARIOS = {
    "natural": dict(max_new_tokens=64, temperature=1.0, top_p=0.95),
    "fixed": dict(max_new_tokens=64, temperature=5.0, top_k=0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests (a smoke run)")
    parser.add_argument("--rounds", type=int, help="rounds per server and scenario (default 5, quick 2)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--per-client", type=int, help="requests per client per round (default 4, quick 2)")
    parser.add_argument("--lone", type=int, help="requests per lone round (default 8, quick 4)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    per_client = args.per_client or (2 if args.quick else 4)
    lone_n = args.lone or (4 if args.quick else 8)

    info = common.machine()
    common.print_machine(info)
    model, model_s = common.ensure_tiny_model()

    import grpc

    from rlhf.inference.v1 import inference_service_pb2 as pb
    from rlhf.inference.v1 import inference_service_pb2_grpc as pb_grpc
    from rlhf.training.corpus import prompts

    questions = prompts(max(lone_n, args.clients * per_client), seed=3)

    def request(i: int, settings: dict) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            agent_id="bench", prompt=questions[i], version="base", params=pb.SamplingParams(seed=i, **settings)
        )

    def lone(stub, i: int, settings: dict) -> tuple[float, int, str]:
        t0 = time.perf_counter()
        reply = stub.Generate(request(i, settings), timeout=300)
        return time.perf_counter() - t0, reply.completion_tokens, reply.text

    def crowd(stub, pool, settings: dict) -> tuple[float, int, list[str]]:
        def client(c: int) -> list[tuple[int, str]]:
            out = []
            for k in range(per_client):
                reply = stub.Generate(request(c * per_client + k, settings), timeout=300)
                out.append((reply.completion_tokens, reply.text))
            return out

        started = time.perf_counter()
        results = [r for f in [pool.submit(client, c) for c in range(args.clients)] for r in f.result()]
        return time.perf_counter() - started, sum(t for t, _ in results), [text for _, text in results]

    dead_policy = "unix:/nonexistent/no-policy-service.sock"
    rows: dict[tuple[str, str, str], list[dict]] = {}
    mismatches = 0
    with common.scratch_dir("generation") as data_dir:
        flags = ("--base-model", str(model), "--policy-addr", dead_policy, "--device", "cpu")
        with (
            common.ServerProcess("inference_service", data_dir / "batching", *flags) as batched,
            common.ServerProcess(
                "inference_service", data_dir / "alone", *flags, env={"RLHF_INFERENCE_BATCHING": "0"}
            ) as alone,
            grpc.insecure_channel(batched.address) as batched_channel,
            grpc.insecure_channel(alone.address) as alone_channel,
            concurrent.futures.ThreadPoolExecutor(args.clients) as pool,
        ):
            servers = {
                "batching": pb_grpc.InferenceServiceStub(batched_channel),
                "one at a time": pb_grpc.InferenceServiceStub(alone_channel),
            }
            for stub in servers.values():  # load the model, warm up
                for i in range(3):
                    stub.Generate(request(i, SCENARIOS["natural"]), timeout=300)
            print(f"setup: tiny model {model_s:.1f}s; {rounds} rounds", flush=True)
            for r in range(rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for scenario, settings in SCENARIOS.items():
                    texts: dict[str, list[str]] = {name: [] for name in order}
                    # Lone requests alternate between the servers request by request (paired under the same
                    # load); the 16-client rounds alternate round by round.
                    lone_runs = {name: [] for name in order}
                    for i in range(lone_n):
                        for name in order if i % 2 == 0 else order[::-1]:
                            lone_runs[name].append(lone(servers[name], i, settings))
                    for name in order:
                        latencies = [latency for latency, _, _ in lone_runs[name]]
                        rows.setdefault((scenario, "lone", name), []).append(
                            {
                                "wall_s": sum(latencies),
                                "tokens": sum(tokens for _, tokens, _ in lone_runs[name]),
                                "latency_median_s": common.median(latencies),
                            }
                        )
                        texts[name] += [text for _, _, text in lone_runs[name]]
                    for name in order:
                        cwall, ctokens, crowd_texts = crowd(servers[name], pool, settings)
                        rows.setdefault((scenario, "clients", name), []).append({"wall_s": cwall, "tokens": ctokens})
                        texts[name] += crowd_texts
                    a, b = texts.values()
                    mismatches += sum(x != y for x, y in zip(a, b, strict=True))
                print(f"round {r + 1}/{rounds} done (load avg {[round(x, 2) for x in os.getloadavg()]})", flush=True)

    summary = []
    for (scenario, mode, name), runs in rows.items():
        rates = [run["tokens"] / run["wall_s"] for run in runs]
        entry = {
            "scenario": scenario,
            "mode": mode,
            "server": name,
            "rounds": runs,
            "tokens_per_s_min": min(rates),
            "tokens_per_s_median": common.median(rates),
            "tokens_per_request": sum(run["tokens"] for run in runs)
            / (len(runs) * (lone_n if mode == "lone" else args.clients * per_client)),
        }
        if mode == "lone":
            lat = [run["latency_median_s"] for run in runs]
            entry["latency_min_s"], entry["latency_median_s"] = min(lat), common.median(lat)
        summary.append(entry)

    def find(scenario: str, mode: str, name: str) -> dict:
        return next(e for e in summary if (e["scenario"], e["mode"], e["server"]) == (scenario, mode, name))

    table, goals = [], {}
    for scenario in SCENARIOS:
        base_lone = find(scenario, "lone", "one at a time")
        for mode in ("lone", "clients"):
            for name in ("one at a time", "batching"):
                e = find(scenario, mode, name)
                ratio = e["tokens_per_s_median"] / base_lone["tokens_per_s_median"]
                table.append(
                    [
                        scenario,
                        "1 client" if mode == "lone" else f"{args.clients} clients",
                        name,
                        e["tokens_per_s_min"],
                        e["tokens_per_s_median"],
                        ratio,
                        e["tokens_per_request"],
                        e.get("latency_median_s", float("nan")) * 1000,
                    ]
                )
        crowd_ratio = (
            find(scenario, "clients", "batching")["tokens_per_s_median"]
            / find(scenario, "clients", "one at a time")["tokens_per_s_median"]
        )
        slowdown = find(scenario, "lone", "batching")["latency_median_s"] / base_lone["latency_median_s"] - 1
        crowd_rate = find(scenario, "clients", "batching")["tokens_per_s_median"]
        over_one_client = crowd_rate / base_lone["tokens_per_s_median"]
        goals[scenario] = {
            "clients_speedup": crowd_ratio,
            "clients_speedup_met": crowd_ratio >= GOAL_SPEEDUP,
            "clients_over_one_client": over_one_client,
            "clients_over_one_client_met": over_one_client >= GOAL_SPEEDUP,
            "lone_slowdown": slowdown,
            "lone_slowdown_met": slowdown <= GOAL_LONE_SLOWDOWN,
        }
    print()
    common.print_table(
        [
            "sampling",
            "load",
            "server",
            "tokens/s min",
            "tokens/s median",
            "x one-at-a-time lone",
            "tokens/request",
            "lone latency ms",
        ],
        table,
    )
    print(f"\ntexts that differed between the two servers (same request, same seed): {mismatches}")
    for scenario, goal in goals.items():
        print(
            f"goal ({scenario}): {args.clients} clients >= {GOAL_SPEEDUP:g}x one-at-a-time with {args.clients} "
            f"clients: {'MET' if goal['clients_speedup_met'] else 'NOT MET'} ({goal['clients_speedup']:.2f}x); "
            f"with one client: {'MET' if goal['clients_over_one_client_met'] else 'NOT MET'} "
            f"({goal['clients_over_one_client']:.2f}x); "
            f"lone request <= {100 * GOAL_LONE_SLOWDOWN:.0f}% slower: "
            f"{'MET' if goal['lone_slowdown_met'] else 'NOT MET'} ({100 * goal['lone_slowdown']:+.1f}%)"
        )
    common.write_results(
        "generation",
        {
            "benchmark": "generation",
            "machine": info,
            "settings": {
                "rounds": rounds,
                "clients": args.clients,
                "per_client": per_client,
                "lone_requests": lone_n,
                "scenarios": SCENARIOS,
            },
            "results": summary,
            "text_mismatches": mismatches,
            "goals": goals,
        },
    )


if __name__ == "__main__":
    main()
