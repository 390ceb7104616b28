"""Start the policy service: `python -m policy_service` or `rlhf serve policy`."""

from __future__ import annotations

import argparse

from policy_service.config import PolicyServiceConfig
from policy_service.domain import PolicyDomain
from policy_service.servicer import PolicyServicer
from policy_service.store import PolicyStore
from rlhf.app import run_service, server_flags, server_overrides
from rlhf.db import make_engine
from rlhf.policy.v1 import policy_service_pb2_grpc as pb_grpc
from rlhf.server import RunningServer, ServiceBinding, start_server


async def start(config: PolicyServiceConfig) -> RunningServer:
    engine = make_engine(config.server.resolved_database_url())
    domain = PolicyDomain(config, PolicyStore(engine))
    await domain.start()
    running = await start_server(config.server, [ServiceBinding(
        "rlhf.policy.v1.PolicyService", PolicyServicer(domain), pb_grpc.add_PolicyServiceServicer_to_server)])

    async def cleanup() -> None:
        await domain.close()
        engine.dispose()

    running.on_stop.append(cleanup)
    running.domain = domain
    return running


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="policy_service", description="RLHF policy service")
    server_flags(parser)
    parser.add_argument("--feedback-addr", help="feedback service address (env RLHF_FEEDBACK_ADDR)")
    parser.add_argument("--reward-addr", help="reward service address (env RLHF_REWARD_ADDR)")
    args = parser.parse_args(argv)
    config = PolicyServiceConfig.from_env(**server_overrides(args))
    config.feedback_address = args.feedback_addr or config.feedback_address
    config.reward_address = args.reward_addr or config.reward_address
    run_service("policy", start, config, config.server)
