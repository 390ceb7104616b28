"""Bootstrap: wire store, policy client, model cache, domain and servicer into a gRPC server; the CLI."""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib

from inference_service.config import InferenceServiceConfig
from inference_service.domain import InferenceDomain
from inference_service.models import ModelCache
from inference_service.policy_client import PolicyClient
from inference_service.servicer import InferenceServicer
from inference_service.store import InferenceStore
from rlhf.db import make_engine
from rlhf.inference.v1 import inference_service_pb2_grpc as pb_grpc
from rlhf.logs import setup_logging
from rlhf.server import RunningServer, ServiceBinding, serve_until_signal, start_server

log = logging.getLogger(__name__)

SERVICE_NAME = "rlhf.inference.v1.InferenceService"


async def start(config: InferenceServiceConfig) -> RunningServer:
    """Start the inference server; `running.stop()` shuts it down and releases what it holds."""
    engine = make_engine(config.server.resolved_database_url())
    store = InferenceStore(engine)
    await asyncio.to_thread(store.create_schema)
    policies = PolicyClient(config.policy_addr, config.policy_timeout_seconds, config.server.grpc_options())
    models = ModelCache(config.model_cache_size, config.device, config.model_cache_max_bytes)
    domain = InferenceDomain(config, store, policies, models)
    servicer = InferenceServicer(domain)
    try:
        running = await start_server(
            config.server, [ServiceBinding(SERVICE_NAME, servicer, pb_grpc.add_InferenceServiceServicer_to_server)])
    except BaseException:
        await policies.close()
        engine.dispose()
        raise

    async def cleanup() -> None:
        await policies.close()
        models.clear()
        engine.dispose()

    running.on_stop.append(cleanup)
    log.info("inference service: policy service at %s, base model %s, device %s",
             config.policy_addr, config.base_model, models.device)
    return running


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inference_service", description="Run the RLHF inference service.")
    parser.add_argument("--host", help="interface to bind (RLHF_HOST)")
    parser.add_argument("--port", type=int, help="port to bind (RLHF_INFERENCE_PORT, default 50054)")
    parser.add_argument("--data-dir", type=pathlib.Path, help="data folder (RLHF_DATA_DIR)")
    parser.add_argument("--database-url", help="SQLAlchemy URL (RLHF_INFERENCE_DATABASE_URL)")
    parser.add_argument("--policy-addr", help="policy service address (RLHF_POLICY_ADDR)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (RLHF_INFERENCE_DEVICE)")
    parser.add_argument("--base-model", help="model served as version 'base' (RLHF_INFERENCE_BASE_MODEL)")
    args = parser.parse_args(argv)
    setup_logging("inference")
    config = InferenceServiceConfig.from_env(
        host=args.host, port=args.port, data_dir=args.data_dir.resolve() if args.data_dir else None,
        database_url=args.database_url, policy_addr=args.policy_addr, device=args.device,
        base_model=args.base_model)

    async def run() -> None:
        running = await start(config)
        await serve_until_signal(running, config.server.grace_seconds)

    asyncio.run(run())
