"""`rlhf serve` and `rlhf demo`: the commands that run the services themselves (the only ones that may load
the training stack)."""

from __future__ import annotations

import argparse
import os
import pathlib
import threading
from collections.abc import MutableMapping
from typing import Any

from rlhf.runtime.config import DEFAULT_PORTS, METRICS_PORTS, data_dir_default
from rlhf.sdk.cli import output
from rlhf.sdk.cli.common import add_parser

# Services that load models: the tiny default model is built for them before their first job needs it.
MODEL_SERVICES = ("reward", "policy", "inference")


def _prebuild_tiny_model(data_dir: pathlib.Path) -> threading.Thread | None:
    """Build the tiny default model in the background, saying so, when this data dir (or RLHF_MODEL_CACHE)
    has none yet: otherwise the first training job or generation would build it silently for a minute.
    The services keep serving meanwhile; a job that needs the model waits for the build (a file lock)."""
    from rlhf.training.tinymodel import ensure_tiny_model, tiny_model_dir

    if (tiny_model_dir(data_dir) / "build_info.json").exists():
        return None

    def build() -> None:
        output.note(
            "rlhf: building the tiny default model once (about a minute on 2 idle CPU cores, longer on a busy "
            "machine; training and generation wait for it)"
        )
        try:
            ensure_tiny_model(data_dir, progress=lambda line: output.note(f"rlhf: {line}"))
        except Exception as error:  # noqa: BLE001 - the services report it again when they need the model
            output.note(f"rlhf: building the tiny model failed: {error}")

    thread = threading.Thread(target=build, name="tiny-model", daemon=True)
    thread.start()
    return thread


def metrics_ports_in(env: MutableMapping[str, str]) -> dict[str, int]:
    """`serve --metrics`: each service's RLHF_<SERVICE>_METRICS_PORT (which the services and their restarts
    read) set to its METRICS_PORTS default, unless the environment already names one. Returns the ports."""
    ports = {}
    for service, port in METRICS_PORTS.items():
        ports[service] = int(env.setdefault(f"RLHF_{service.upper()}_METRICS_PORT", str(port)))
    return ports


def cmd_serve(args: argparse.Namespace) -> int:
    from rlhf.sdk.extras import require_server_extra

    require_server_extra()  # before any service starts
    from rlhf.sdk.supervisor import MODULES, Stack, serve

    ports = {s: getattr(args, f"{s}_port") for s in DEFAULT_PORTS}
    if args.metrics:
        metrics_ports_in(os.environ)
    data_dir = args.data_dir.resolve()
    stack = Stack(data_dir=data_dir, host=args.host, ports=ports)
    services = list(MODULES) if args.service == "all" else [args.service]
    if not args.no_model_build and any(s in MODEL_SERVICES for s in services):
        _prebuild_tiny_model(data_dir)
    if args.service != "all":
        from rlhf.runtime.environment import prepare_environment

        os.environ.update(stack.env())
        prepare_environment()
        module = __import__(f"{MODULES[args.service]}.app", fromlist=["main"])
        module.main(["--port", str(ports[args.service]), "--host", args.host])
        return 0
    return serve(stack, services)


def cmd_demo(args: argparse.Namespace) -> int:
    from rlhf.sdk.extras import require_server_extra

    require_server_extra()  # before any service starts
    from rlhf.sdk.demo import DemoConfig, run_demo
    from rlhf.sdk.supervisor import MODULES

    config = DemoConfig(
        data_dir=args.data_dir.resolve(),
        fresh=not args.keep,
        agent_id=args.agent_id,
        train_prompts=args.train_prompts,
        answers_per_prompt=args.answers_per_prompt,
        eval_samples=args.eval_samples,
        ppo_steps=args.ppo_steps,
        max_new_tokens=args.max_new_tokens,
        ports={s: getattr(args, f"{s}_port") for s in MODULES},
    )
    return run_demo(config)


def register(sub: Any) -> None:
    serve = add_parser(
        sub,
        "serve",
        "start the services (all: the four gRPC services and the REST gateway)",
        description="Start the services. `rlhf serve all` runs the four gRPC services and the REST gateway as\n"
        "separate processes wired to each other, restarting one that dies;\n"
        "Ctrl-C stops them all. Clients find them through RLHF_<SERVICE>_ADDR (default 127.0.0.1:<port>).",
    )
    serve.add_argument(
        "service", choices=["all", "feedback", "reward", "policy", "inference"], help="which service(s) to start"
    )
    serve.add_argument(
        "--data-dir", type=pathlib.Path, default=data_dir_default(), help="databases, artifacts, models (RLHF_DATA_DIR)"
    )
    serve.add_argument("--host", default=os.environ.get("RLHF_HOST", "127.0.0.1"), help="interface to bind (RLHF_HOST)")
    for service, port in DEFAULT_PORTS.items():
        serve.add_argument(
            f"--{service}-port",
            type=int,
            default=int(os.environ.get(f"RLHF_{service.upper()}_PORT", port)),
            help=f"port of the {service} service (RLHF_{service.upper()}_PORT)",
        )
    serve.add_argument(
        "--metrics",
        action="store_true",
        help="serve each service's Prometheus metrics at GET /metrics on "
        + ", ".join(f"{s} {p}" for s, p in METRICS_PORTS.items())
        + " (RLHF_<SERVICE>_METRICS_PORT overrides each; the gateway serves /metrics on its own port)",
    )
    serve.add_argument(
        "--no-model-build",
        action="store_true",
        help="do not build the tiny default model at start (the first job that needs it builds it)",
    )
    serve.set_defaults(func=cmd_serve, parser=serve)

    import dataclasses

    from rlhf.sdk.demo import DemoConfig  # light: grpc clients and the prompt corpus, no torch

    DEMO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DemoConfig)}

    demo = add_parser(
        sub,
        "demo",
        "run the whole loop end to end on the tiny model (a few minutes on a laptop)",
        description="Start a private stack, rate the base policy's answers with a simulated rater, train a reward\n"
        "model and a policy, deploy it, and compare base and trained answers on held-out prompts.",
    )
    demo.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path(".rlhf/demo"), help="the demo's data")
    demo.add_argument("--keep", action="store_true", help="keep earlier demo data (default: start fresh)")
    demo.add_argument("--agent-id", default=DEMO_DEFAULTS["agent_id"], help="the agent trained")
    demo.add_argument(
        "--train-prompts", type=int, default=DEMO_DEFAULTS["train_prompts"], help="prompts the agent is trained on"
    )
    demo.add_argument(
        "--answers-per-prompt",
        type=int,
        default=DEMO_DEFAULTS["answers_per_prompt"],
        help="base-policy answers rated per training prompt",
    )
    demo.add_argument(
        "--eval-samples", type=int, default=DEMO_DEFAULTS["eval_samples"], help="answers per held-out prompt"
    )
    demo.add_argument("--ppo-steps", type=int, default=DEMO_DEFAULTS["ppo_steps"], help="PPO steps")
    demo.add_argument(
        "--max-new-tokens", type=int, default=DEMO_DEFAULTS["max_new_tokens"], help="longest answer, in tokens"
    )
    from rlhf.sdk.supervisor import MODULES  # the demo's stack: the four gRPC services

    for service in MODULES:
        demo.add_argument(
            f"--{service}-port", type=int, default=0, help=f"port of the {service} service (0: a free one)"
        )
    demo.set_defaults(func=cmd_demo, parser=demo)
