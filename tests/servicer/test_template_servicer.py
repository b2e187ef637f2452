"""The template service over a real in-process channel."""
import asyncio
import time

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nlpmesh.template.v1 import template_pb2, template_pb2_grpc

from services.template.catalog import TemplateFileError
from services.template.servicer import build_spec
from services.template.settings import TemplateSettings


def struct(**values) -> struct_pb2.Struct:
    variables = struct_pb2.Struct()
    variables.update(values)
    return variables


def bad_request_fields(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    fields = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields |= {v.field: v.description for v in bad.field_violations}
    return fields


def call(inprocess_server, method: str, request, settings: TemplateSettings | None = None):
    """Calls one RPC on a fresh in-process server; returns the response or the AioRpcError."""

    settings = settings or TemplateSettings()

    async def scenario():
        async with inprocess_server(build_spec(settings), settings) as running:
            stub = template_pb2_grpc.TemplateServiceStub(running.channel)
            try:
                return await getattr(stub, method)(request, timeout=5)
            except grpc.aio.AioRpcError as error:
                return error

    return asyncio.run(scenario())


def test_render_returns_the_messages_and_the_resolved_version(inprocess_server):
    variables = struct(question="{{7*7}}", audience="students")
    request = template_pb2.RenderRequest(id="finance_question", variables=variables)
    response = call(inprocess_server, "Render", request)
    assert (response.id, response.version) == ("finance_question", "1.1.0")
    assert [m.role for m in response.messages] == ["system", "user"]
    assert response.messages[1].content == "{{7*7}}"
    assert "students" in response.messages[0].content


def test_render_an_older_version_on_request(inprocess_server):
    request = template_pb2.RenderRequest(
        id="finance_question", version="1.0.0", variables=struct(question="q")
    )
    assert call(inprocess_server, "Render", request).version == "1.0.0"


def test_a_missing_required_variable_is_invalid_argument_naming_the_field(inprocess_server):
    error = call(inprocess_server, "Render", template_pb2.RenderRequest(id="finance_question"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "question" in bad_request_fields(error)["template.variables.question"]


def test_a_wrong_type_and_an_unknown_variable_are_reported_together(inprocess_server):
    variables = struct(question=["a", "list"], colour="red")
    request = template_pb2.RenderRequest(id="finance_question", variables=variables)
    error = call(inprocess_server, "Render", request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(bad_request_fields(error)) == {"template.variables.question", "template.variables.colour"}


def test_an_unknown_template_is_not_found(inprocess_server):
    error = call(inprocess_server, "Render", template_pb2.RenderRequest(id="nope", variables=struct(q="x")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in error.details()


def test_an_unknown_version_is_not_found(inprocess_server):
    request = template_pb2.RenderRequest(
        id="finance_question", version="3.0.0", variables=struct(question="q")
    )
    error = call(inprocess_server, "Render", request)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "3.0.0" in error.details()


def test_a_template_breaking_the_sandbox_is_internal_without_detail(inprocess_server, tmp_path):
    path = tmp_path / "probe" / "1.0.0.toml"
    path.parent.mkdir()
    path.write_text('id = "probe"\nversion = "1.0.0"\ndescription = "d"\n'
                    '[[messages]]\nrole = "user"\ncontent = "{{ \'\'.__class__.__mro__ }}"\n')
    settings = TemplateSettings(templates_dir=tmp_path)
    error = call(inprocess_server, "Render", template_pb2.RenderRequest(id="probe"), settings)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "__class__" not in error.details()


def test_list_templates_gives_every_version_and_marks_the_newest(inprocess_server):
    response = call(inprocess_server, "ListTemplates", template_pb2.ListTemplatesRequest())
    finance = {t.version: t for t in response.templates if t.id == "finance_question"}
    assert set(finance) == {"1.0.0", "1.1.0"}
    assert finance["1.1.0"].newest and not finance["1.0.0"].newest
    question = next(v for v in finance["1.1.0"].variables if v.name == "question")
    assert question.required and question.max_chars > 0
    assert len({t.id for t in response.templates}) == 5


def test_a_malformed_template_stops_the_service_at_build(tmp_path):
    bad = tmp_path / "probe" / "1.0.0.toml"
    bad.parent.mkdir()
    bad.write_text("id = ")
    with pytest.raises(TemplateFileError, match=str(bad)):
        build_spec(TemplateSettings(templates_dir=tmp_path))


def write_probe(folder, content: str, max_chars: int = 4000):
    """A legal template: it passes the sandbox and the load limits, and renders as written."""
    path = folder / "probe" / "1.0.0.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text('id = "probe"\nversion = "1.0.0"\ndescription = "d"\n'
                    f'[[variables]]\nname = "word"\nrequired = true\ndescription = "d"\nmax_chars = {max_chars}\n'
                    f'[[messages]]\nrole = "user"\ncontent = """{content}"""\n')


# Within the sandbox's range limit (100,000 per range), legal, and 10^10 writes long.
NESTED_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{{ word }}{% endfor %}{% endfor %}"


def test_a_render_over_the_size_limit_is_invalid_argument_naming_the_variables(inprocess_server, tmp_path):
    write_probe(tmp_path, NESTED_LOOP)
    settings = TemplateSettings(templates_dir=tmp_path)
    request = template_pb2.RenderRequest(id="probe", variables=struct(word="w" * 4000))
    error = call(inprocess_server, "Render", request, settings)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    described = bad_request_fields(error)["template.variables"]
    assert f"exceed {settings.max_render_chars} characters" in described
    assert "w" * 20 not in error.details()


def test_a_render_over_the_time_limit_is_resource_exhausted(inprocess_server, tmp_path):
    write_probe(tmp_path, NESTED_LOOP)
    settings = TemplateSettings(templates_dir=tmp_path, render_timeout_ms=50, max_render_chars=10**12)
    started = time.perf_counter()
    error = call(inprocess_server, "Render", template_pb2.RenderRequest(id="probe", variables=struct(word="w")),
                 settings)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "50 ms limit" in error.details()
    assert time.perf_counter() - started < 5  # stopped, not run to its 10^10 writes


def test_the_size_limit_counts_every_message_of_a_render(inprocess_server, tmp_path):
    write_probe(tmp_path, "{{ word }}{{ word }}")
    settings = TemplateSettings(templates_dir=tmp_path, max_render_chars=7000)
    fits = call(inprocess_server, "Render", template_pb2.RenderRequest(id="probe", variables=struct(word="w" * 3500)),
                settings)
    assert len(fits.messages[0].content) == 7000
    over = call(inprocess_server, "Render", template_pb2.RenderRequest(id="probe", variables=struct(word="w" * 3501)),
                settings)
    assert over.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_template_over_the_source_limit_stops_the_service_at_build(tmp_path):
    write_probe(tmp_path, "x" * 101)
    with pytest.raises(TemplateFileError, match="at most 100"):
        build_spec(TemplateSettings(templates_dir=tmp_path, max_template_chars=100))


def test_a_template_whose_variables_may_be_too_big_stops_the_service_at_build(tmp_path):
    write_probe(tmp_path, "{{ word }}", max_chars=5000)
    with pytest.raises(TemplateFileError, match="add up to 5000"):
        build_spec(TemplateSettings(templates_dir=tmp_path, max_template_variables_chars=4999))


def test_no_request_field_carries_template_source():
    """A caller names a template and gives values; the source is only ever the published file."""
    from nlpmesh.gateway.v1 import gateway_pb2

    render = template_pb2.RenderRequest.DESCRIPTOR
    call_ = gateway_pb2.TemplateCall.DESCRIPTOR
    for descriptor in (render, call_):
        assert {f.name for f in descriptor.fields} == {"id", "version", "variables"}
        assert descriptor.fields_by_name["variables"].message_type.full_name == "google.protobuf.Struct"
