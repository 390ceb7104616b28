"""Start the policy service: `python -m policy_service` or `rlhf serve policy`."""

from __future__ import annotations

import argparse

from policy_service.config import PolicyServiceConfig
from policy_service.domain import PolicyDomain
from policy_service.servicer import PolicyServicer
from rlhf.policy.v1 import policy_service_pb2_grpc as pb_grpc
from rlhf.runtime.app import run_service, server_flags, server_overrides, start_with_domain
from rlhf.runtime.collectors import JobsCollector
from rlhf.runtime.db import make_engine
from rlhf.runtime.registry import NAMINGS
from rlhf.runtime.server import RunningServer, ServiceBinding
from rlhf.runtime.training_store import TrainingStore


async def start(config: PolicyServiceConfig) -> RunningServer:
    engine = make_engine(config.server.resolved_database_url())
    store = TrainingStore(engine, "policies", "policy", config.version_naming, config.server.database_migrate)
    domain = PolicyDomain(config, store)
    binding = ServiceBinding(
        "rlhf.policy.v1.PolicyService", PolicyServicer(domain), pb_grpc.add_PolicyServiceServicer_to_server
    )
    running = await start_with_domain(config.server, engine, domain, binding)
    running.metrics.add(JobsCollector(domain.jobs.store, "policy"))
    return running


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="policy_service", description="RLHF policy service")
    server_flags(parser)
    parser.add_argument("--feedback-addr", help="feedback service address (env RLHF_FEEDBACK_ADDR)")
    parser.add_argument("--reward-addr", help="reward service address (env RLHF_REWARD_ADDR)")
    parser.add_argument(
        "--version-naming",
        choices=NAMINGS,
        help="v1, v2, ... or the seed's v<feedback count> (env RLHF_POLICY_VERSION_NAMING, default sequential)",
    )
    args = parser.parse_args(argv)
    config = PolicyServiceConfig.from_env(**server_overrides(args))
    config.feedback_address = args.feedback_addr or config.feedback_address
    config.reward_address = args.reward_addr or config.reward_address
    config.version_naming = args.version_naming or config.version_naming
    if config.version_naming not in NAMINGS:
        parser.error(f"RLHF_POLICY_VERSION_NAMING must be one of {', '.join(NAMINGS)}, not {config.version_naming!r}")
    run_service("policy", start, config, config.server)
