"""Bootstrap of the feedback service: database, tables, domain, servicer and the gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
from typing import Sequence

from rlhf.db import make_engine
from rlhf.feedback.v1 import feedback_service_pb2_grpc as pb_grpc
from rlhf.logs import setup_logging
from rlhf.server import RunningServer, ServiceBinding, serve_until_signal, start_server

from feedback_service.config import FeedbackServiceConfig
from feedback_service.domain import FeedbackDomain
from feedback_service.servicer import FeedbackServicer
from feedback_service.store import FeedbackStore

SERVICE_NAME = "rlhf.feedback.v1.FeedbackService"

log = logging.getLogger(__name__)


async def start(config: FeedbackServiceConfig) -> RunningServer:
    """Open the database (creating tables), then serve until the returned server is stopped."""
    engine = make_engine(config.server.resolved_database_url())
    store = FeedbackStore(engine)
    await asyncio.to_thread(store.create_tables)
    domain = FeedbackDomain(store, config)
    servicer = FeedbackServicer(domain)
    try:
        running = await start_server(config.server, [
            ServiceBinding(SERVICE_NAME, servicer, pb_grpc.add_FeedbackServiceServicer_to_server)])
    except BaseException:
        await domain.close()
        await asyncio.to_thread(engine.dispose)
        raise

    async def dispose() -> None:
        # After the server stopped (in-flight calls done): finish queued writes, then close connections.
        await domain.close()
        await asyncio.to_thread(engine.dispose)

    running.on_stop.append(dispose)
    return running


def parse_args(argv: Sequence[str] | None) -> FeedbackServiceConfig:
    parser = argparse.ArgumentParser(prog="python -m feedback_service",
                                     description="Serve rlhf.feedback.v1.FeedbackService over gRPC.")
    parser.add_argument("--host", help="interface to bind (default RLHF_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind; 0 picks a free one "
                                                 "(default RLHF_FEEDBACK_PORT or 50051)")
    parser.add_argument("--data-dir", type=pathlib.Path, help="data folder (default RLHF_DATA_DIR or ./.rlhf)")
    parser.add_argument("--database-url", help="SQLAlchemy URL (default RLHF_FEEDBACK_DATABASE_URL, "
                                               "else SQLite in the data folder)")
    parser.add_argument("--inference-addr", help="inference service address for attributing feedback to "
                                                 "policy versions (default RLHF_FEEDBACK_INFERENCE_ADDRESS; "
                                                 "empty: off)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir.resolve() if args.data_dir else None
    return FeedbackServiceConfig.from_env(host=args.host, port=args.port, data_dir=data_dir,
                                          database_url=args.database_url, inference_address=args.inference_addr)


async def _serve(config: FeedbackServiceConfig) -> None:
    running = await start(config)
    await serve_until_signal(running, config.server.grace_seconds)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    setup_logging("feedback")
    asyncio.run(_serve(config))
