"""Bootstrap of the feedback service: database, tables, domain, servicer and the gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence

from feedback_service.config import FeedbackServiceConfig
from feedback_service.domain import FeedbackDomain
from feedback_service.metrics import FeedbackCollector
from feedback_service.migrations import schema
from feedback_service.servicer import FeedbackServicer
from feedback_service.store import FeedbackStore
from rlhf.feedback.v1 import feedback_service_pb2_grpc as pb_grpc
from rlhf.runtime.app import run_service, server_flags, server_overrides
from rlhf.runtime.db import make_engine
from rlhf.runtime.migrations import prepare_database
from rlhf.runtime.server import RunningServer, ServiceBinding, start_server

SERVICE_NAME = "rlhf.feedback.v1.FeedbackService"

log = logging.getLogger(__name__)


async def start(config: FeedbackServiceConfig) -> RunningServer:
    """Open the database (creating tables), then serve until the returned server is stopped."""
    engine = make_engine(config.server.resolved_database_url())
    store = FeedbackStore(engine)
    await asyncio.to_thread(prepare_database, engine, schema(), config.server.database_migrate)
    domain = FeedbackDomain(store, config)
    servicer = FeedbackServicer(domain)
    try:
        running = await start_server(
            config.server, [ServiceBinding(SERVICE_NAME, servicer, pb_grpc.add_FeedbackServiceServicer_to_server)]
        )
    except BaseException:
        await domain.close()
        await asyncio.to_thread(engine.dispose)
        raise

    async def dispose() -> None:
        # After the server stopped (in-flight calls done): finish queued writes, then close connections.
        await domain.close()
        await asyncio.to_thread(engine.dispose)

    running.on_stop.append(dispose)
    running.metrics.add(FeedbackCollector(domain))
    running.domain = domain
    return running


def parse_args(argv: Sequence[str] | None) -> FeedbackServiceConfig:
    parser = argparse.ArgumentParser(
        prog="python -m feedback_service", description="Serve rlhf.feedback.v1.FeedbackService over gRPC."
    )
    server_flags(parser)
    parser.add_argument(
        "--inference-addr",
        help="inference service address for attributing feedback to "
        "policy versions (default RLHF_FEEDBACK_INFERENCE_ADDRESS; "
        "empty: off)",
    )
    args = parser.parse_args(argv)
    return FeedbackServiceConfig.from_env(**server_overrides(args), inference_address=args.inference_addr)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    run_service("feedback", start, config, config.server)
