"""The `rlhf` command line: serve the stack, run the demo, and talk to the services."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import json_format

from rlhf.runtime.config import DEFAULT_PORTS, data_dir_default


def _print(message, as_json: bool) -> None:
    if as_json:
        print(json_format.MessageToJson(message, preserving_proto_field_name=True))
    else:
        print(json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2))


def _print_list(messages, as_json: bool, header: str, row: Callable[[Any], str]) -> int:
    """A JSON array (--json) or a table: the header, then one row per message."""
    if as_json:
        print(json.dumps([json_format.MessageToDict(m, preserving_proto_field_name=True) for m in messages]))
        return 0
    print(header)
    for message in messages:
        print(row(message))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from rlhf.sdk.supervisor import MODULES, Stack, serve

    ports = {s: getattr(args, f"{s}_port") for s in DEFAULT_PORTS}
    stack = Stack(data_dir=args.data_dir.resolve(), host=args.host, ports=ports)
    services = list(MODULES) if args.service == "all" else [args.service]
    if args.service != "all":
        import os

        from rlhf.runtime.environment import prepare_environment

        os.environ.update(stack.env())
        prepare_environment()
        module = __import__(f"{MODULES[args.service]}.app", fromlist=["main"])
        module.main(["--port", str(ports[args.service]), "--host", args.host])
        return 0
    return serve(stack, services)


def cmd_demo(args: argparse.Namespace) -> int:
    from rlhf.sdk.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(data_dir=args.data_dir.resolve(), fresh=not args.keep))


def cmd_feedback_submit(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import FeedbackClient

    fields = {"prompt": args.prompt, "run_id": args.run_id, "notes": args.notes}
    if args.score is not None:
        fields.update(response=args.response, score=args.score)
    else:
        fields.update(chosen=args.chosen, rejected=args.rejected)
    with FeedbackClient(args.feedback_addr) as client:
        _print(client.submit(args.agent_id, **fields), args.json)
    return 0


def cmd_feedback_stats(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import FeedbackClient

    with FeedbackClient(args.feedback_addr) as client:
        _print(client.stats(args.agent_id, group_by_policy_version=args.by_version), args.json)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rlhf.policy.v1 import policy_service_pb2 as pol
    from rlhf.sdk.clients import PolicyClient

    request = pol.TrainPolicyRequest(
        agent_id=args.agent_id, dry_run=args.dry_run, reward_model_version=args.reward_model_version or ""
    )
    if args.max_steps is not None:
        request.max_steps = args.max_steps
    if args.learning_rate is not None:
        request.learning_rate = args.learning_rate
    if args.config:
        json_format.Parse(pathlib.Path(args.config).read_text(), request.config)
    with PolicyClient(args.policy_addr) as client:
        response = client.train(request)
        if args.dry_run or args.no_watch:
            _print(response, args.json)
            return 0
        print(f"job {response.job.job_id} started", file=sys.stderr)
        return _watch_policy_job(client, response.job.job_id, args.json)


def _watch_job(client, pb, job_id: str, as_json: bool, describe: Callable[[Any], str]) -> int:
    """Show a job's progress on one live line (`describe`) until it ends, then the job itself;
    exit code 0 only if it succeeded. `pb` is the service's message module (its JobState)."""
    print("watching (Ctrl-C stops watching, not the job)", file=sys.stderr)
    job = None
    for job in client.watch(job_id):
        print(f"\r[{pb.JobState.Name(job.state)[10:]}] {describe(job)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    _print(job, as_json)
    return 0 if job.state == pb.JOB_STATE_SUCCEEDED else 1


def _describe_policy_job(job) -> str:
    p, metrics = job.progress, job.progress.metrics
    return (
        f"{p.phase} step {p.step}/{p.total_steps} score {metrics.get('objective/scores', 0):.3f} "
        f"kl {metrics.get('objective/kl', 0):.3f} eta {p.eta_seconds:.0f}s {p.message[:60]:<60}"
    )


def _describe_reward_job(job) -> str:
    p = job.progress
    return (
        f"{p.phase} epoch {p.epoch}/{p.total_epochs} step {p.step}/{p.total_steps} "
        f"loss {p.train_loss:.4f} eta {p.eta_seconds:.0f}s   "
    )


def _watch_policy_job(client, job_id: str, as_json: bool) -> int:
    from rlhf.policy.v1 import policy_service_pb2 as pol

    return _watch_job(client, pol, job_id, as_json, _describe_policy_job)


def _job_client(args: argparse.Namespace):
    """The client and message module of the service whose jobs are meant (policy, or reward with --reward)."""
    from rlhf.sdk.clients import PolicyClient, RewardClient

    client = RewardClient(args.reward_addr) if args.reward else PolicyClient(args.policy_addr)
    return client, client.messages


def cmd_jobs_list(args: argparse.Namespace) -> int:
    client, pb = _job_client(args)
    with client:
        jobs, _ = client.list_jobs(args.agent_id or "", page_size=args.limit)

    def row(job) -> str:
        version = getattr(job, "policy_version", "") or getattr(job, "reward_model_version", "")
        return (
            f"{job.job_id:<34} {job.agent_id:<20} {pb.JobState.Name(job.state)[10:]:<12} "
            f"{job.progress.phase:<13} {job.progress.step:>5}/{job.progress.total_steps:<5}  {version}"
        )

    return _print_list(
        jobs, args.json, f"{'job id':<34} {'agent':<20} {'state':<12} {'phase':<13} {'step':>11}  version", row
    )


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    client, pb = _job_client(args)
    describe = _describe_reward_job if args.reward else _describe_policy_job
    with client:
        return _watch_job(client, pb, args.job_id, args.json, describe)


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    client, _ = _job_client(args)
    with client:
        _print(client.cancel_job(args.job_id), args.json)
    return 0


def cmd_jobs_resume(args: argparse.Namespace) -> int:
    from rlhf.policy.v1 import policy_service_pb2 as pol
    from rlhf.sdk.clients import PolicyClient

    with PolicyClient(args.policy_addr) as client:
        job = client.stub.ResumeTrainingJob(
            pol.ResumeTrainingJobRequest(job_id=args.job_id), timeout=client.timeout
        ).job
        print(f"job {job.job_id} resumed", file=sys.stderr)
        if args.no_watch:
            _print(job, args.json)
            return 0
        return _watch_policy_job(client, job.job_id, args.json)


def cmd_reward_models_list(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import RewardClient

    with RewardClient(args.reward_addr) as client:
        models = client.list_models(args.agent_id)

    def row(m) -> str:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(m.metrics.items()) if k != "validation_count")
        return f"{m.version:<8} {m.created_at.ToDatetime():%Y-%m-%d %H:%M:%S} {m.feedback_count:>8}  {metrics}"

    return _print_list(models, args.json, f"{'version':<8} {'created':<20} {'feedback':>8}  metrics", row)


def cmd_policies_show(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import PolicyClient

    with PolicyClient(args.policy_addr) as client:
        _print(client.get_policy(args.agent_id, args.version or ""), args.json)
    return 0


def cmd_policies_list(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import PolicyClient

    with PolicyClient(args.policy_addr) as client:
        policies = client.list_policies(args.agent_id)

    def row(p) -> str:
        return (
            f"{p.version:<8} {p.created_at.ToDatetime():%Y-%m-%d %H:%M:%S} {p.metrics.training_steps:>6} "
            f"{p.metrics.reward_mean:>8.3f} {p.metrics.kl:>8.3f}  {p.model_path}"
        )

    return _print_list(
        policies, args.json, f"{'version':<8} {'created':<20} {'steps':>6} {'reward':>8} {'kl':>8}  path", row
    )


def cmd_deploy(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import InferenceClient

    weights = {}
    for item in args.weights:
        version, _, weight = item.partition("=")
        weights[version] = float(weight or 1)
    with InferenceClient(args.inference_addr) as client:
        _print(client.set_deployment(args.agent_id, weights), args.json)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import InferenceClient

    params = {"max_new_tokens": args.max_new_tokens}
    if args.seed is not None:
        params["seed"] = args.seed
    with InferenceClient(args.inference_addr) as client:
        _print(client.generate(args.agent_id, args.prompt, version=args.version or "", **params), args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rlhf.runtime.config import service_address

    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF platform: serve the stack and use it.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start services (all: four processes)")
    serve.add_argument("service", choices=["all", "feedback", "reward", "policy", "inference"])
    serve.add_argument(
        "--data-dir",
        type=pathlib.Path,
        default=data_dir_default(),
        help="data dir (env RLHF_DATA_DIR, default ./.rlhf)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 in containers)")
    for service, port in DEFAULT_PORTS.items():
        import os

        serve.add_argument(
            f"--{service}-port", type=int, default=int(os.environ.get(f"RLHF_{service.upper()}_PORT", port))
        )
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="run the whole loop end to end on embedded defaults")
    demo.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path(".rlhf/demo"))
    demo.add_argument("--keep", action="store_true", help="keep earlier demo data (default: start fresh)")
    demo.set_defaults(func=cmd_demo)

    def client_parser(parent, name: str, help_text: str, func: Callable, services: list[str]):
        p = parent.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true", help="print compact JSON")
        for service in services:
            p.add_argument(
                f"--{service}-addr",
                default=service_address(service),
                help=f"{service} service address (env RLHF_{service.upper()}_ADDR)",
            )
        p.set_defaults(func=func)
        return p

    feedback = sub.add_parser("feedback", help="submit and inspect feedback").add_subparsers(
        dest="action", required=True
    )
    submit = client_parser(feedback, "submit", "submit one rating or comparison", cmd_feedback_submit, ["feedback"])
    submit.add_argument("agent_id")
    submit.add_argument("--prompt", required=True)
    submit.add_argument("--response")
    submit.add_argument("--score", type=float, help="rating in [0, 1]")
    submit.add_argument("--chosen")
    submit.add_argument("--rejected")
    submit.add_argument("--run-id", default="")
    submit.add_argument("--notes", default="")
    stats = client_parser(feedback, "stats", "feedback statistics", cmd_feedback_stats, ["feedback"])
    stats.add_argument("agent_id")
    stats.add_argument("--by-version", action="store_true", help="also per policy version (A/B readout)")

    train = client_parser(sub, "train", "train a policy (or estimate with --dry-run)", cmd_train, ["policy"])
    train.add_argument("agent_id")
    train.add_argument("--dry-run", action="store_true")
    train.add_argument("--max-steps", type=int)
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--reward-model-version", help="reuse this reward model ('latest' for the newest)")
    train.add_argument("--config", help="JSON file with a TrainingConfig (proto JSON names)")
    train.add_argument("--no-watch", action="store_true", help="return once the job is queued")

    policies = sub.add_parser("policies", help="the policy registry").add_subparsers(dest="action", required=True)
    plist = client_parser(policies, "list", "list an agent's policy versions", cmd_policies_list, ["policy"])
    plist.add_argument("agent_id")

    show = client_parser(policies, "show", "one policy version with metrics and lineage", cmd_policies_show, ["policy"])
    show.add_argument("agent_id")
    show.add_argument("version", nargs="?", help="e.g. v3 (default: the latest)")

    jobs = sub.add_parser("jobs", help="training jobs (policy jobs; --reward for reward-model jobs)").add_subparsers(
        dest="action", required=True
    )
    for name, func, help_text in (
        ("list", cmd_jobs_list, "list jobs, newest first"),
        ("watch", cmd_jobs_watch, "follow a job until it ends"),
        ("cancel", cmd_jobs_cancel, "ask a job to stop"),
    ):
        job_parser = client_parser(jobs, name, help_text, func, ["policy", "reward"])
        job_parser.add_argument("--reward", action="store_true", help="reward-model jobs instead of policy jobs")
        if name == "list":
            job_parser.add_argument("--agent-id", help="only this agent's jobs")
            job_parser.add_argument("--limit", type=int, default=50)
        else:
            job_parser.add_argument("job_id")

    resume = client_parser(
        jobs,
        "resume",
        "continue an interrupted, failed or cancelled policy job from its last checkpoint",
        cmd_jobs_resume,
        ["policy"],
    )
    resume.add_argument("job_id")
    resume.add_argument("--no-watch", action="store_true", help="return once the job is queued")

    reward_models = sub.add_parser("reward-models", help="the reward-model registry").add_subparsers(
        dest="action", required=True
    )
    rlist = client_parser(reward_models, "list", "list an agent's reward models", cmd_reward_models_list, ["reward"])
    rlist.add_argument("agent_id")

    deploy = client_parser(sub, "deploy", "set an agent's deployment: VERSION=WEIGHT ...", cmd_deploy, ["inference"])
    deploy.add_argument("agent_id")
    deploy.add_argument("weights", nargs="+", help="e.g. v2=50 v3=50, or base=1")

    generate = client_parser(sub, "generate", "generate from an agent's deployment", cmd_generate, ["inference"])
    generate.add_argument("agent_id")
    generate.add_argument("prompt")
    generate.add_argument("--version", help="pin a version, or 'base'")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--seed", type=int)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except grpc.RpcError as error:
        print(f"rlhf: {error.code().name}: {error.details()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
