"""Start the reward service: `python -m reward_service` or `rlhf serve reward`."""

from __future__ import annotations

import argparse

from reward_service.config import RewardServiceConfig
from reward_service.domain import RewardDomain
from reward_service.servicer import RewardServicer
from rlhf.reward.v1 import reward_service_pb2_grpc as pb_grpc
from rlhf.runtime.app import run_service, server_flags, server_overrides, start_with_domain
from rlhf.runtime.collectors import JobsCollector, ModelCacheCollector
from rlhf.runtime.db import make_engine
from rlhf.runtime.server import RunningServer, ServiceBinding
from rlhf.runtime.training_store import TrainingStore


async def start(config: RewardServiceConfig) -> RunningServer:
    engine = make_engine(config.server.resolved_database_url())
    domain = RewardDomain(
        config, TrainingStore(engine, "reward_models", "reward model", migrate=config.server.database_migrate)
    )
    binding = ServiceBinding(
        "rlhf.reward.v1.RewardService", RewardServicer(domain), pb_grpc.add_RewardServiceServicer_to_server
    )
    running = await start_with_domain(config.server, engine, domain, binding)
    running.metrics.add(
        JobsCollector(domain.jobs.store, "reward_model"), ModelCacheCollector(domain.scorer.cache, "reward")
    )
    return running


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="reward_service", description="RLHF reward service")
    server_flags(parser)
    parser.add_argument("--feedback-addr", help="feedback service address (env RLHF_FEEDBACK_ADDR)")
    args = parser.parse_args(argv)
    config = RewardServiceConfig.from_env(**server_overrides(args))
    if args.feedback_addr:
        config.feedback_address = args.feedback_addr
    run_service("reward", start, config, config.server)
