"""gRPC edge of the template service: protobuf in, domain calls, protobuf out."""
from __future__ import annotations

import grpc
from google.protobuf import json_format
from nlpmesh.template.v1 import template_pb2, template_pb2_grpc

from meshkit import span_names
from meshkit.server import ServiceSpec, rpc_method
from meshkit.tracing.provider import tracer
from services.template.catalog import TemplateCatalog
from services.template.prompt import PromptTemplate
from services.template.render import RenderLimits, render_template
from services.template.settings import TemplateSettings

SERVICE_NAME = template_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name

_tracer = tracer("template")


class TemplateServicer(template_pb2_grpc.TemplateServiceServicer):
    def __init__(self, catalog: TemplateCatalog, max_variables: int, limits: RenderLimits):
        self._catalog = catalog
        self._max_variables = max_variables
        self._limits = limits

    @rpc_method
    async def Render(self, request: template_pb2.RenderRequest, context) -> template_pb2.RenderResponse:
        template = self._catalog.resolve(request.id, request.version)
        variables = json_format.MessageToDict(request.variables)
        with _tracer.start_as_current_span(span_names.TEMPLATE_RENDER, attributes={
            span_names.TEMPLATE_ID: template.id, span_names.TEMPLATE_VERSION: template.version,
        }):
            messages = render_template(template, variables, max_variables=self._max_variables,
                                       limits=self._limits)
        reply = template_pb2.RenderResponse(
            id=template.id,
            version=template.version,
            messages=[template_pb2.Message(role=m.role, content=m.content) for m in messages],
        )
        if template.response_format is not None:
            template.response_format.to_pb(reply.response_format)
        return reply

    @rpc_method
    async def ListTemplates(self, request, context) -> template_pb2.ListTemplatesResponse:
        return template_pb2.ListTemplatesResponse(
            templates=[_template_to_pb(t, self._catalog.is_newest(t)) for t in self._catalog.templates()]
        )


def _template_to_pb(template: PromptTemplate, newest: bool) -> template_pb2.Template:
    listed = template_pb2.Template(
        id=template.id,
        version=template.version,
        description=template.description,
        newest=newest,
        variables=[
            template_pb2.Variable(
                name=v.name, required=v.required, description=v.description, max_chars=v.max_chars
            )
            for v in template.variables
        ],
    )
    if template.response_format is not None:
        template.response_format.to_pb(listed.response_format)
    return listed


def build_spec(settings: TemplateSettings) -> ServiceSpec:
    """Loads the catalog now, so a malformed template stops the service at start."""
    catalog = TemplateCatalog.from_dir(settings.templates_dir, settings.template_limits)
    servicer = TemplateServicer(catalog, settings.max_variables, settings.render_limits)

    def register(server: grpc.aio.Server) -> None:
        template_pb2_grpc.add_TemplateServiceServicer_to_server(servicer, server)

    return ServiceSpec(name="template", service_names=(SERVICE_NAME,), register=register)
