"""`rlhf policies ...`, `rlhf deploy`, `rlhf deployments show` and `rlhf generate`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rlhf.sdk.cli import output
from rlhf.sdk.cli.common import add_parser, client_parser, subcommands
from rlhf.sdk.cli.errors import connected


def cmd_policies_list(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import PolicyClient

    with connected(PolicyClient(args.policy_addr)) as client:
        policies = client.list_policies(args.agent_id)
    output.show_table(
        ["version", "created", "steps", "reward", "kl", "reward model", "path"],
        (
            [
                p.version,
                output.timestamp(p, "created_at"),
                p.metrics.training_steps,
                p.metrics.reward_mean,
                p.metrics.kl,
                p.reward_model_version,
                p.model_path,
            ]
            for p in policies
        ),
        args.json,
        policies,
        empty=f"{args.agent_id} has no trained policy versions yet (rlhf train {args.agent_id})",
    )
    return 0


def cmd_policies_show(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import PolicyClient

    with connected(PolicyClient(args.policy_addr)) as client:
        policy = client.get_policy(args.agent_id, args.version or "")
    output.show_object(policy, args.json, title=f"policy {policy.agent_id} {policy.version}")
    return 0


def deployment_weight(text: str) -> tuple[str, float]:
    """VERSION=WEIGHT (or VERSION alone, weight 1) as argparse reads it."""
    version, sign, weight = text.partition("=")
    if not version:
        raise argparse.ArgumentTypeError(f"{text!r}: expected VERSION=WEIGHT, e.g. v2=50")
    try:
        value = float(weight) if sign else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must be a number, e.g. {version}=50") from None
    return version, value


def cmd_deploy(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import InferenceClient

    weights: dict[str, float] = {}
    for version, weight in args.weights:
        if version in weights:
            args.parser.error(f"version {version} is named twice")
        weights[version] = weight
    with connected(InferenceClient(args.inference_addr)) as client:
        deployment = client.set_deployment(args.agent_id, weights)
    _show_deployment(deployment, args.json)
    return 0


def cmd_deployments_show(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import InferenceClient

    with connected(InferenceClient(args.inference_addr)) as client:
        deployment = client.get_deployment(args.agent_id)
    _show_deployment(deployment, args.json)
    return 0


def _show_deployment(deployment: Any, as_json: bool) -> None:
    if as_json:
        output.print_json(deployment)
        return
    total = sum(t.weight for t in deployment.targets) or 1.0
    output.show_table(
        ["version", "weight", "share"],
        ([t.version, t.weight, f"{100 * t.weight / total:.0f}%"] for t in deployment.targets),
        False,
        [],
    )
    if deployment.is_default:
        output.note(
            f"{deployment.agent_id} has no deployment set: its latest version serves it "
            f"(rlhf deploy {deployment.agent_id} VERSION=WEIGHT ... to choose)"
        )
    else:
        output.note(f"revision {deployment.revision}, updated {output.timestamp(deployment, 'updated_at')} UTC")


def cmd_generate(args: argparse.Namespace) -> int:
    from rlhf.sdk.clients import InferenceClient

    params: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    for name in ("seed", "temperature", "top_k", "top_p"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    with connected(InferenceClient(args.inference_addr)) as client:
        if not args.stream:
            answer = client.generate(args.agent_id, args.prompt, version=args.version or "", **params)
            if args.json:
                output.print_json(answer)
            else:
                print(answer.text)
                output.note(f"generation {answer.generation_id} by {answer.policy_version}")
            return 0
        last = None
        for chunk in client.generate_stream(args.agent_id, args.prompt, version=args.version or "", **params):
            last = chunk
            if args.json:  # one JSON object per chunk (JSON lines)
                print(json.dumps(output.as_dict(chunk)), flush=True)
            elif chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    if not args.json:
        print()
        if last is not None:
            output.note(f"generation {last.generation_id} by {last.policy_version}")
    return 0


def register(sub: Any) -> None:
    policies = subcommands(add_parser(sub, "policies", "the policy registry: trained versions"), "actions")
    plist = client_parser(policies, "list", "an agent's policy versions, newest first", cmd_policies_list, ["policy"])
    plist.add_argument("agent_id", help="the agent")
    show = client_parser(policies, "show", "one policy version with metrics and lineage", cmd_policies_show, ["policy"])
    show.add_argument("agent_id", help="the agent")
    show.add_argument("version", nargs="?", default="", help="e.g. v3 (default: the latest)")

    deploy = client_parser(
        sub,
        "deploy",
        "set which versions serve an agent, with weights (an A/B split)",
        cmd_deploy,
        ["inference"],
        description="Set which versions serve an agent: VERSION=WEIGHT ..., e.g. `rlhf deploy my_agent v2=50 v3=50`\n"
        "(weights are relative), or `rlhf deploy my_agent base=1` for the base model.",
    )
    deploy.add_argument("agent_id", help="the agent")
    deploy.add_argument(
        "weights", nargs="+", type=deployment_weight, metavar="VERSION=WEIGHT", help="e.g. v2=50 v3=50, or base=1"
    )

    deployments = subcommands(add_parser(sub, "deployments", "what serves each agent"), "actions")
    dshow = client_parser(
        deployments,
        "show",
        "an agent's current deployment: versions, weights, revision",
        cmd_deployments_show,
        ["inference"],
    )
    dshow.add_argument("agent_id", help="the agent")

    generate = client_parser(
        sub, "generate", "generate an answer from an agent's deployment", cmd_generate, ["inference"]
    )
    generate.add_argument("agent_id", help="the agent")
    generate.add_argument("prompt", help="the prompt")
    generate.add_argument("--version", help="pin a version, or 'base' (default: the deployment picks)")
    generate.add_argument("--stream", action="store_true", help="print the text as it is generated")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens")
    generate.add_argument("--temperature", type=float, help="sampling temperature (default: the server's, 1.0)")
    generate.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (default: the server's)")
    generate.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the server's)")
    generate.add_argument("--seed", type=int, help="sampling seed, for a reproducible answer (default: random)")
