"""Bootstrap: wire store, policy client, model cache, domain and servicer into a gRPC server; the CLI."""

from __future__ import annotations

import argparse
import asyncio
import logging

from inference_service.config import InferenceServiceConfig
from inference_service.domain import InferenceDomain
from inference_service.migrations import schema
from inference_service.models import ModelCache
from inference_service.policy_client import PolicyClient
from inference_service.servicer import InferenceServicer
from inference_service.store import InferenceStore
from rlhf.inference.v1 import inference_service_pb2_grpc as pb_grpc
from rlhf.runtime.app import run_service, server_flags, server_overrides
from rlhf.runtime.collectors import ModelCacheCollector
from rlhf.runtime.db import make_engine
from rlhf.runtime.migrations import prepare_database
from rlhf.runtime.server import RunningServer, ServiceBinding, start_server
from rlhf.training.modeling import SERVING_DTYPES, serving_dtype

log = logging.getLogger(__name__)

SERVICE_NAME = "rlhf.inference.v1.InferenceService"


async def start(config: InferenceServiceConfig) -> RunningServer:
    """Start the inference server; `running.stop()` shuts it down and releases what it holds."""
    engine = make_engine(config.server.resolved_database_url())
    store = InferenceStore(engine)
    await asyncio.to_thread(prepare_database, engine, schema(), config.server.database_migrate)
    policies = PolicyClient(
        config.policy_addr, config.policy_timeout_seconds, config.server.grpc_options(), config.server.security
    )
    models = ModelCache(config.model_cache_size, config.device, config.model_cache_max_bytes, dtype=config.dtype)
    dtype = serving_dtype(config.dtype, models.device)  # a bad dtype stops the start, not the first request
    domain = InferenceDomain(config, store, policies, models)
    servicer = InferenceServicer(domain)
    try:
        running = await start_server(
            config.server, [ServiceBinding(SERVICE_NAME, servicer, pb_grpc.add_InferenceServiceServicer_to_server)]
        )
    except BaseException:
        await policies.close()
        engine.dispose()
        raise

    async def cleanup() -> None:
        await policies.close()
        models.clear()
        engine.dispose()

    running.on_stop.append(cleanup)
    running.metrics.add(ModelCacheCollector(models, "inference"))
    running.domain = domain
    log.info(
        "inference service: policy service at %s, base model %s, device %s, dtype %s",
        config.policy_addr,
        config.base_model,
        models.device,
        str(dtype).removeprefix("torch."),
    )
    return running


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inference_service", description="Run the RLHF inference service.")
    server_flags(parser)
    parser.add_argument("--policy-addr", help="policy service address (RLHF_POLICY_ADDR)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (RLHF_INFERENCE_DEVICE)")
    parser.add_argument("--dtype", help="auto, float32, bf16 or fp16 (RLHF_INFERENCE_DTYPE)")
    parser.add_argument("--base-model", help="model served as version 'base' (RLHF_INFERENCE_BASE_MODEL)")
    args = parser.parse_args(argv)
    config = InferenceServiceConfig.from_env(
        **server_overrides(args),
        policy_addr=args.policy_addr,
        device=args.device,
        base_model=args.base_model,
        dtype=args.dtype,
    )
    if config.dtype not in ("auto", *SERVING_DTYPES):
        raise SystemExit(f"error: --dtype / RLHF_INFERENCE_DTYPE must be auto, {', '.join(SERVING_DTYPES)}")
    run_service("inference", start, config, config.server)
