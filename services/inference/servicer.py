"""gRPC edge of the inference service: protobuf in, engine calls, protobuf out."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import grpc
from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from meshkit.errors import NotFound, Unavailable
from meshkit.request_log import request_id_from
from meshkit.sampling import Sampling
from meshkit.server import ServiceSpec, rpc_method
from meshkit.wire import InferenceLoad
from services.inference.chunks import chunk_to_pb
from services.inference.engine import Engine
from services.inference.generation_types import GenerationRequest
from services.inference.loading import load_engine, warm_up_engine
from services.inference.metrics import GenerationTimer, unwatch_engine, watch_engine
from services.inference.settings import InferenceSettings
from services.inference.threads import in_thread_that_ends

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
ENGINE_KIND = "builtin"  # ModelInfo.engine: this service runs the built-in engine

log = logging.getLogger("nlpmesh.inference")


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, load: Callable[[], Engine], capacity: int):
        self._load = load
        self._capacity = capacity  # max_running + max_queue: what the engine holds before it refuses
        self.engine: Engine | None = None
        # Names this replica in its load reports (x-nlpmesh-inference-replica): random, made at start.
        self.replica = uuid.uuid4().hex[:12]

    async def warm_up(self) -> None:
        log.info("loading the model")
        # The executor's thread lives on: the torch work goes to a thread that ends (services/inference/threads.py).
        engine = await asyncio.to_thread(in_thread_that_ends, self._load, "inference-load")
        log.info("running a warm-up generation")
        await warm_up_engine(engine)
        self.engine = engine
        watch_engine(engine)

    async def close(self) -> None:
        if self.engine is not None:
            unwatch_engine(self.engine)
            await asyncio.to_thread(self.engine.close)

    @rpc_method
    async def Generate(self, request, context):
        engine = self._serving(request.model)
        log.debug("generation requested: %d prompt tokens", len(request.prompt_token_ids))
        try:
            stream = engine.submit(_generation_request_from_pb(request, request_id_from(context.invocation_metadata()),
                                                               context.time_remaining()))
        finally:  # a refusal (queue full) reports the load too
            context.set_trailing_metadata(self._load_report(engine))
        await context.send_initial_metadata(self._load_report(engine))
        timer = GenerationTimer()
        try:
            async for item in stream:
                timer.seen(item)
                yield chunk_to_pb(item)
        finally:  # the caller went away or the deadline passed: free the slot
            stream.cancel()
            timer.abandoned()
            context.set_trailing_metadata(self._load_report(engine))

    @rpc_method
    async def ModelInfo(self, request, context) -> inference_pb2.ModelInfoResponse:
        engine = self._serving("")
        await context.send_initial_metadata(self._load_report(engine))
        return inference_pb2.ModelInfoResponse(
            model=engine.model_name,
            revision=engine.revision,
            context_length=engine.context_length,
            default_max_new_tokens=engine.limits.default_max_new_tokens,
            engine=ENGINE_KIND,
        )

    def _load_report(self, engine: Engine) -> tuple[tuple[str, str], ...]:
        """x-nlpmesh-inference-load, read by the gateway's admission control."""
        return InferenceLoad(engine.active_count, self._capacity, self.replica).to_metadata()

    def _serving(self, model: str) -> Engine:
        if self.engine is None:
            raise Unavailable("the model is still loading")
        if model and model != self.engine.model_name:  # the catalogue id this process serves
            raise NotFound(f"unknown model {model!r}; this inference service serves {self.engine.model_name}")
        return self.engine


def _generation_request_from_pb(request: inference_pb2.GenerateRequest, request_id: str,
                                time_remaining_s: float | None) -> GenerationRequest:
    """``time_remaining_s``: the call's deadline as gRPC gives it (None: the caller set none)."""
    return GenerationRequest(
        prompt_token_ids=list(request.prompt_token_ids),
        sampling=Sampling.from_pb(request.sampling),
        request_id=request_id,
        tenant=request.tenant,
        trace_context=_trace_context(),
        deadline=None if time_remaining_s is None else time.monotonic() + time_remaining_s,
    )


def _trace_context() -> otel_context.Context | None:
    """The server span's context, for the engine's spans; None when nothing is recorded."""
    return otel_context.get_current() if trace.get_current_span().is_recording() else None


def build_spec(
    settings: InferenceSettings, engine_factory: Callable[[InferenceSettings], Engine] = load_engine
) -> ServiceSpec:
    """The inference service; tests pass an ``engine_factory`` that builds a tiny model."""
    servicer = InferenceServicer(lambda: engine_factory(settings), settings.max_running + settings.max_queue)

    def register(server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)

    return ServiceSpec(
        name="inference",
        service_names=(SERVICE_NAME,),
        register=register,
        warm_up=servicer.warm_up,
        close=servicer.close,
    )
