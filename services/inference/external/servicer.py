"""gRPC edge of the adapter: nlpmesh.inference.v1 served by an external engine (engine.py).

It stands where the built-in inference service stands: the same contract, load reports, spans (queue wait,
prefill up to the first token, decode) and metrics (services/inference/metrics.py), and beside them the
engine's whole HTTP request as a span of its own (``inference engine``).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid

import aiohttp
import grpc
from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from meshkit import span_names as names
from meshkit.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from meshkit.request_log import request_id_from
from meshkit.sampling import Sampling
from meshkit.server import ServiceSpec, initial_metadata_meanwhile, rpc_method
from meshkit.tracing.stand_in import start_span_later, tracer_now
from meshkit.wire import InferenceLoad
from modelfiles.catalogue import CatalogueModel, load_catalogue
from modelfiles.convert import load_model_files
from services.inference.chunks import chunk_to_pb
from services.inference.external.engine import EngineClient, check_passing, completion_body, unhonoured
from services.inference.external.load import EngineLoad
from services.inference.external.settings import AdapterSettings
from services.inference.generation_types import Delta, Finished, GenerationRequest
from services.inference.metrics import GenerationTimer, unwatch_engine, watch_engine
from services.inference.spans import job_spans
from services.inference.validation import RequestLimits, resolve_request

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
log = logging.getLogger("nlpmesh.inference.openai")
INLINE_DECODE_TOKENS = 512  # a prompt's ids decoded to text in the event loop up to this many


class AdapterServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, settings: AdapterSettings, entry: CatalogueModel):
        if entry.external is None:
            raise ValueError(f"catalogue model {entry.id!r} runs on the built-in engine: start services.inference")
        self._settings = settings
        self.entry = entry
        self.capacity = entry.external.max_in_flight
        self.in_flight = 0
        self.replica = uuid.uuid4().hex[:12]
        self.client: EngineClient | None = None
        self._load: EngineLoad | None = None
        self._poller: asyncio.Task | None = None
        self._limits: RequestLimits | None = None
        self._revision = ""
        self._decode = None  # token ids -> text, for an engine that takes text prompts

    # What services/inference/metrics.py's gauges read.
    @property
    def active_count(self) -> int:
        held = self._load.engine_held if self._load is not None else None
        return max(self.in_flight, held or 0)

    @property
    def queue_depth(self) -> int:
        return max(0, self.active_count - self.capacity)

    async def warm_up(self) -> None:
        external = self.entry.external
        files = load_model_files(self._settings.home, self.entry.files_id)
        vocab_size = json.loads((files.path / "config.json").read_text())["vocab_size"]
        context = self.entry.context_length or files.context_length
        s = self._settings
        self._limits = RequestLimits(context, vocab_size, s.default_max_new_tokens, s.max_new_tokens_limit,
                                     s.max_stop_sequences, s.max_stop_chars)
        # The engine's weights are not ours to hash: the revision is the tokenizer's and the engine's model name.
        self._revision = hashlib.sha256(f"{external.kind}\0{external.served_model}\0{files.revision}".encode()
                                        ).hexdigest()[:16]
        if external.prompt == "text":
            self._decode = await asyncio.to_thread(_text_decoder, files.path)
        self.client = EngineClient(
            external, connect_timeout_s=s.connect_timeout_s, read_timeout_s=s.read_timeout_s,
            replica_down_s=s.replica_down_s, max_connections=s.max_connections, retry_after_s=s.retry_after_s)
        await self._wait_for_engine()
        self._load = EngineLoad(self.client.http, external.urls, s.load_poll_s)
        self._poller = asyncio.create_task(self._load.run())
        watch_engine(self)

    async def _wait_for_engine(self) -> None:
        """Until a replica answers /v1/models listing the model: NOT_SERVING meanwhile."""
        external, said = self.entry.external, set()
        while True:
            for url in external.urls:
                try:
                    async with self.client.http.get(f"{url}/v1/models") as response:
                        status = response.status
                        listed = _model_ids(await response.read()) if status == 200 else set()
                except (aiohttp.ClientError, TimeoutError) as error:  # not reachable yet: wait and ask again
                    problem = f"unreachable ({type(error).__name__})"
                else:
                    if status != 200:
                        problem = f"answered /v1/models with HTTP {status}"
                    elif external.served_model in listed:
                        log.info("inference engine %s serves %s", url, external.served_model)
                        return
                    else:
                        problem = f"does not list the model {external.served_model!r} in /v1/models"
                if (url, problem) not in said:
                    said.add((url, problem))
                    log.warning("inference engine %s %s; waiting", url, problem)
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        unwatch_engine(self)
        if self._poller is not None:
            self._poller.cancel()
        if self.client is not None:
            await self.client.close()

    @rpc_method
    async def Generate(self, request, context):
        client = self._serving(request.model)
        generation = GenerationRequest(
            prompt_token_ids=list(request.prompt_token_ids), sampling=Sampling.from_pb(request.sampling),
            request_id=request_id_from(context.invocation_metadata()), tenant=request.tenant,
            trace_context=otel_context.get_current() if trace.get_current_span().is_recording() else None)
        violations = unhonoured(generation.sampling, self.entry.external.sampling_fields,
                                self.entry.external.response_format)
        if violations:
            raise InvalidArgument("; ".join(f"{v.field}: {v.description}" for v in violations), violations)
        resolved = resolve_request(generation, self._limits)
        if self.in_flight >= self.capacity:
            context.set_trailing_metadata(self._load_report())
            raise ResourceExhausted(f"the inference engine's adapter holds its {self.capacity} requests",
                                    retry_after_s=self._settings.retry_after_s, reason="ENGINE_AT_CAPACITY")
        ids = resolved.prompt_token_ids
        prompt = ids if self._decode is None else await self._prompt_text(ids)
        body = completion_body(self.entry.external.served_model, prompt, resolved.sampling,
                               self.entry.external.response_format)
        self.in_flight += 1
        timer, spans = GenerationTimer(), job_spans(resolved, self.entry.id)
        engine_span = start_span_later(tracer_now("inference"), names.INFERENCE_ENGINE, resolved.trace_context)
        last: Finished | BaseException | None = None
        try:
            # The load report goes out while the engine's request does.
            async with initial_metadata_meanwhile(context, self._load_report()) as sent:
                spans.admitted()
                stream = client.generate(body, ids)
                try:
                    async for item in stream:
                        timer.seen(item)
                        if isinstance(item, Delta):
                            spans.stepped(False)
                        else:
                            last = item
                        await sent
                        yield chunk_to_pb(item)
                finally:
                    await stream.aclose()  # the HTTP response closes: the engine stops generating
        except BaseException as error:
            last = error
            raise
        finally:
            self.in_flight -= 1
            timer.abandoned()
            spans.finished(last if last is not None else asyncio.CancelledError())
            if isinstance(last, BaseException):
                engine_span.set_status(trace.Status(trace.StatusCode.ERROR, type(last).__name__))
            engine_span.end()
            context.set_trailing_metadata(self._load_report())

    @rpc_method
    async def ModelInfo(self, request, context) -> inference_pb2.ModelInfoResponse:
        self._serving("")
        await context.send_initial_metadata(self._load_report())
        return inference_pb2.ModelInfoResponse(
            model=self.entry.id, revision=self._revision, context_length=self._limits.context_length,
            default_max_new_tokens=self._limits.default_max_new_tokens, engine=self.entry.external.kind)

    async def _prompt_text(self, ids: list[int]) -> str:
        """The prompt as text for an engine that takes text: in the event loop for a short prompt (its decode
        costs about what handing it to a thread and back would), on a worker thread for a long one."""
        if len(ids) <= INLINE_DECODE_TOKENS:
            return self._decode(ids, False)
        return await asyncio.to_thread(self._decode, ids, False)

    def _load_report(self) -> tuple[tuple[str, str], ...]:
        """x-nlpmesh-inference-load, read by the gateway's admission control."""
        return InferenceLoad(self.active_count, self.capacity, self.replica).to_metadata()

    def _serving(self, model: str) -> EngineClient:
        if self.client is None or self._load is None:
            raise Unavailable("waiting for the inference engine")
        if model and model != self.entry.id:
            raise NotFound(f"unknown model {model!r}; this inference service serves {self.entry.id}")
        return self.client


def _text_decoder(folder):
    """Token ids -> the text an engine that takes text prompts tokenises again (special tokens kept)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return lambda ids, skip_special_tokens=False: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _model_ids(body: bytes) -> set[str]:
    """The model ids a /v1/models answer lists."""
    try:
        return {str(model.get("id")) for model in json.loads(body).get("data", ())}
    except (ValueError, AttributeError):
        return set()


def build_spec(settings: AdapterSettings) -> ServiceSpec:
    catalogue = load_catalogue()
    entry = catalogue.get(settings.model or catalogue.ids[0])
    if entry.external is not None:
        check_passing(entry.external.response_format)
    servicer = AdapterServicer(settings, entry)

    def register(server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)

    return ServiceSpec(name="inference", service_names=(SERVICE_NAME,), register=register,
                       warm_up=servicer.warm_up, close=servicer.close)
