"""In-process fakes of the internal services, for gateway servicer tests (unit scope)."""
from __future__ import annotations

import asyncio

from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from nlpmesh.template.v1 import template_pb2, template_pb2_grpc
from nlpmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from meshkit.server import ServiceSpec, rpc_method
from meshkit.wire import InferenceLoad


class Recorder:
    """Counts calls and keeps the deadline, x-request-id and x-nlpmesh-tenant each call arrived with."""

    def __init__(self):
        self.calls = 0
        self.deadlines: list[float | None] = []
        self.request_ids: list[str | None] = []
        self.tenants: list[str | None] = []

    def saw(self, context) -> None:
        self.calls += 1
        self.deadlines.append(context.time_remaining())
        metadata = dict(context.invocation_metadata())
        self.request_ids.append(metadata.get("x-request-id"))
        self.tenants.append(metadata.get("x-nlpmesh-tenant"))


class FakeTemplate(template_pb2_grpc.TemplateServiceServicer, Recorder):
    def __init__(self, delay_s: float = 0.0):
        Recorder.__init__(self)
        self.delay_s = delay_s

    @rpc_method
    async def Render(self, request, context):
        self.saw(context)
        await asyncio.sleep(self.delay_s)
        return template_pb2.RenderResponse(id=request.id, version="1.0.0", messages=[
            template_pb2.Message(role="user", content=request.variables.fields["question"].string_value)])

    @rpc_method
    async def ListTemplates(self, request, context):
        return template_pb2.ListTemplatesResponse(templates=[template_pb2.Template(
            id="finance_question", version="1.0.0", newest=True,
            variables=[template_pb2.Variable(name="question", required=True)])])


class PublishingTemplate(template_pb2_grpc.TemplateServiceServicer, Recorder):
    """A template service whose catalog gains versions while it runs (``publish``)."""

    def __init__(self, template_id: str, versions: list[str]):
        Recorder.__init__(self)
        self.template_id = template_id
        self.versions = list(versions)
        self.rendered: list[str] = []  # the version each Render call asked for

    def publish(self, version: str) -> None:
        self.versions.append(version)

    @rpc_method
    async def Render(self, request, context):
        self.saw(context)
        self.rendered.append(request.version)
        version = request.version or self.versions[-1]
        return template_pb2.RenderResponse(id=request.id, version=version, messages=[
            template_pb2.Message(role="user", content=f"v{version}: {request.variables.fields['question'].string_value}")])

    @rpc_method
    async def ListTemplates(self, request, context):
        return template_pb2.ListTemplatesResponse(templates=[
            template_pb2.Template(id=self.template_id, version=v, newest=v == self.versions[-1],
                                  variables=[template_pb2.Variable(name="question", required=True)])
            for v in self.versions])


class FakeTokenizer(tokenizer_pb2_grpc.TokenizerServiceServicer, Recorder):
    @rpc_method
    async def EncodeChat(self, request, context):
        self.saw(context)
        return tokenizer_pb2.EncodeResponse(token_ids=[1, 2, 3], model=request.model)

    @rpc_method
    async def CountChat(self, request, context):
        self.saw(context)
        return tokenizer_pb2.CountResponse(count=sum(len(m.content) for m in request.messages))


class FakeInference(inference_pb2_grpc.InferenceServiceServicer, Recorder):
    """``capacity``: report the load (x-nlpmesh-inference-load) as the real service does, with that capacity."""

    def __init__(self, deltas=("Hel", "lo", " 世界"), first_token_delay_s: float = 0.0, capacity: int | None = None,
                 model: str = "smollm2", revision: str = "r1"):
        Recorder.__init__(self)
        self.model, self.revision = model, revision  # what ModelInfo reports
        self.request_models: list[str] = []  # the GenerateRequest.model field of each call
        self.deltas = deltas
        self.first_token_delay_s = first_token_delay_s
        self.fail_with: Exception | None = None
        self.request_tenants: list[str] = []  # the GenerateRequest.tenant field of each call
        self.capacity = capacity
        self.active = 0

    async def _report_load(self, context) -> None:
        if self.capacity is not None:
            await context.send_initial_metadata(InferenceLoad(self.active, self.capacity).to_metadata())

    @rpc_method
    async def Generate(self, request, context):
        self.saw(context)
        self.request_tenants.append(request.tenant)
        self.request_models.append(request.model)
        if self.fail_with is not None:
            raise self.fail_with
        self.active += 1
        try:
            await self._report_load(context)
            await asyncio.sleep(self.first_token_delay_s)
            for delta in self.deltas:
                yield inference_pb2.GenerateChunk(delta=delta)
            yield inference_pb2.GenerateChunk(done=True, finish_reason=2,
                                              prompt_tokens=len(request.prompt_token_ids),
                                              completion_tokens=len(self.deltas))
        finally:
            self.active -= 1
            if self.capacity is not None:
                context.set_trailing_metadata(InferenceLoad(self.active, self.capacity).to_metadata())

    @rpc_method
    async def ModelInfo(self, request, context):
        await self._report_load(context)
        return inference_pb2.ModelInfoResponse(model=self.model, revision=self.revision, context_length=8192,
                                               default_max_new_tokens=16)


def fake_spec(name: str, servicer) -> ServiceSpec:
    adders = {
        FakeTemplate: template_pb2_grpc.add_TemplateServiceServicer_to_server,
        PublishingTemplate: template_pb2_grpc.add_TemplateServiceServicer_to_server,
        FakeTokenizer: tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server,
        FakeInference: inference_pb2_grpc.add_InferenceServiceServicer_to_server,
    }
    # The real service's full name: the gateway's channels watch its health (client-side health checking).
    full_names = {
        FakeTemplate: template_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name,
        PublishingTemplate: template_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name,
        FakeTokenizer: tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name,
        FakeInference: inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    }
    kind = next(k for k in full_names if isinstance(servicer, k))
    return ServiceSpec(name=name, service_names=(full_names[kind],),
                       register=lambda server: adders[kind](servicer, server))
