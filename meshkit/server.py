"""Server creation, health, reflection, error mapping and shutdown, for every service.

Every service also answers a request that is not valid protobuf with
INVALID_ARGUMENT (meshkit/request_decoding.py).

A service describes itself as a ``ServiceSpec``; ``serve`` does the rest:
the port opens at once with health NOT_SERVING, ``warm_up`` runs (model load,
Redis check), health turns SERVING, ``watch_health`` (if any) keeps it honest
from then on, and SIGTERM drains in-flight calls.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meshkit import metrics
from meshkit.call_log import CallLogInterceptor
from meshkit.content_capture import warn_if_capturing
from meshkit.errors import INTERNAL_MESSAGE, MeshError, to_status
from meshkit.faults import DelayInterceptor
from meshkit.grpc_io import describe_grpc_io
from meshkit.ports import PortInUse, port_in_use
from meshkit.request_decoding import RequestDecodingInterceptor
from meshkit.request_log import LogFormat, log_handler, served_call_scope
from meshkit.settings import ServiceSettings
from meshkit.tls import TlsConfig, export_certificate_expiry
from meshkit.tracing import server_span

log = logging.getLogger("nlpmesh.server")


# The exit status of a service that refused its configuration at start (StartRefused).
START_REFUSED_EXIT = 2
# The exit status of a service whose port another process holds (PortInUse): the launcher does not restart it.
PORT_IN_USE_EXIT = 3


class StartRefused(Exception):
    """A service cannot serve as configured (a model that is not in the catalogue, not converted, of an
    architecture the engine does not run, in a precision its entry excludes): raised by ``warm_up``, logged
    as one line naming what and why, and the process exits with ``START_REFUSED_EXIT``, no traceback."""

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    # Full proto service names, e.g. "nlpmesh.template.v1.TemplateService".
    service_names: tuple[str, ...]
    register: Callable[[grpc.aio.Server], None]
    warm_up: Callable[[], Awaitable[None]] | None = None
    close: Callable[[], Awaitable[None]] | None = None
    interceptors: tuple = field(default=())
    # Health names beside "" and the service names (e.g. one per path a service can serve on its own):
    # NOT_SERVING until ready, SERVING after, like the others.
    health_names: tuple[str, ...] = field(default=())
    # Runs once the service is ready, until it stops; may set any health name through the servicer
    # (e.g. NOT_SERVING while something the service needs is down).
    watch_health: Callable[[health.aio.HealthServicer], Awaitable[None]] | None = None
    # The line logged per served call (meshkit/call_log.py); None: one at DEBUG.
    call_log: CallLogInterceptor | None = None


# Set by the local launcher (cli/launcher.py) to its pid. It arms each child's parent-death
# signal just before exec; a launcher that died before that is seen here, as another parent.
LAUNCHER_PID_ENV = "NLPMESH_LAUNCHER_PID"


def launcher_is_gone() -> bool:
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    return launcher.isdigit() and os.getppid() != int(launcher)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


# gRPC sets SO_REUSEPORT by default: a second server on a busy port would bind it too, and the kernel would
# split the calls between the two. Off, a port in use fails the start (PortInUse).
SERVER_OPTIONS = (("grpc.so_reuseport", 0),)


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """What every server of the mesh is created with: one process per port, message sizes, connection age."""
    options = [*SERVER_OPTIONS, *channel_options(settings.max_message_bytes)]
    if settings.max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000))]
    return options


async def create_server(spec: ServiceSpec, settings: ServiceSettings):
    """Builds and starts the server; returns (server, port, health servicer).

    Binding port 0 picks a free port, which is how tests run real servers.
    """
    interceptors = [*server_span.server_interceptors(spec.name), *metrics.server_interceptors(spec.name),
                    *spec.interceptors]
    call_log = spec.call_log or CallLogInterceptor()
    if call_log.enabled():  # inside the tracing interceptor: the line has the call's trace id
        interceptors.append(call_log)
    if settings.fault_delay_ms > 0:
        log.warning("%s: fault injection on, every call delayed %.0f ms", spec.name, settings.fault_delay_ms)
        interceptors.append(DelayInterceptor(settings.fault_delay_ms))
    # Last, so innermost: the tracing and metrics interceptors see a malformed request's INVALID_ARGUMENT.
    interceptors.append(RequestDecodingInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
    spec.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = spec.service_names + (health.SERVICE_NAME,)
    if settings.reflection:
        reflection.enable_server_reflection(names + (reflection.SERVICE_NAME,), server)
    tls = TlsConfig.from_settings(settings)
    export_certificate_expiry(tls, spec.name)
    credentials = tls.server_credentials(on_reload=lambda: export_certificate_expiry(tls, spec.name))
    port = _bind(server, settings.address, credentials, spec.name)
    await server.start()
    for name in ("", *spec.service_names, *spec.health_names):
        await health_servicer.set(name, NOT_SERVING)
    return server, port, health_servicer


def _bind(server: grpc.aio.Server, address: str, credentials, name: str) -> int:
    """The port bound; PortInUse when another process holds it (gRPC says only that it could not bind)."""
    try:
        port = (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except RuntimeError:
        port = 0
    if port == 0:
        if port_in_use(address):
            raise PortInUse(name, address)
        raise OSError(f"{name}: cannot bind {address}")
    return port


async def serve(spec: ServiceSpec, settings: ServiceSettings) -> None:
    """Runs one service until SIGTERM or SIGINT, then drains and exits."""
    server, port, health_servicer = await create_server(spec, settings)
    metrics.start_metrics_server(settings)
    log.info("%s listening on %s:%d, %s, %s (NOT_SERVING until ready)", spec.name, settings.host, port,
             TlsConfig.from_settings(settings).describe(), describe_grpc_io())
    warn_if_capturing(spec.name, settings.capture_content)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = None
    try:
        if spec.warm_up is not None:
            warm = asyncio.create_task(spec.warm_up())
            await asyncio.wait([warm, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
            if not warm.done():
                warm.cancel()
            elif isinstance(warm.exception(), StartRefused):
                log.error("%s refused to start: %s", spec.name, warm.exception())
                raise SystemExit(START_REFUSED_EXIT)
            else:
                warm.result()
        if not stop.is_set():
            for name in ("", *spec.service_names, *spec.health_names):
                await health_servicer.set(name, SERVING)
            log.info("%s ready", spec.name)
            if spec.watch_health is not None:
                watcher = asyncio.create_task(spec.watch_health(health_servicer))
            await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        log.info("%s draining (grace %.1fs)", spec.name, settings.grace_s)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(settings.grace_s)
        if spec.close is not None:
            await spec.close()
        log.info("%s stopped", spec.name)


def run(spec_factory: Callable[[ServiceSettings], ServiceSpec], settings: ServiceSettings) -> None:
    """The body of every service's ``main()``."""
    configure_logging(settings.log_level, settings.log_format, settings.capture_content)
    if launcher_is_gone():
        log.error("the launcher that started this service (pid %s) is gone: not starting",
                  os.environ[LAUNCHER_PID_ENV])
        raise SystemExit(1)
    try:
        if settings.event_loop == "uvloop":
            import uvloop

            uvloop.run(_run(spec_factory, settings))
        else:
            asyncio.run(_run(spec_factory, settings))
    except PortInUse as error:
        log.error("%s: not starting", error)
        raise SystemExit(PORT_IN_USE_EXIT) from None


async def _run(spec_factory, settings) -> None:
    await serve(spec_factory(settings), settings)


def configure_logging(level: str, fmt: LogFormat = "text", capture_content: bool = False) -> None:
    """Logs to stderr in ``fmt`` ("text" or "json"), each line with its request and trace ids."""
    logging.basicConfig(level=level.upper(), handlers=[log_handler(fmt, capture_content=capture_content)])


def rpc_method(handler):
    """Maps the domain error tree to status codes for one servicer method.

    Works for unary (``async def``) and server-streaming (async generator)
    handlers. A MeshError becomes its rich status; anything else is a bug:
    INTERNAL with a fixed message, and the traceback goes to the log only.
    Lines logged during the call carry the caller's ``x-request-id``.
    """
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def streaming(self, request, context):
            with served_call_scope(context.invocation_metadata()):
                async with _statuses(context, handler):
                    async for item in handler(self, request, context):
                        yield item

        return streaming

    @functools.wraps(handler)
    async def unary(self, request, context):
        with served_call_scope(context.invocation_metadata()):
            async with _statuses(context, handler):
                return await handler(self, request, context)

    return unary


@contextlib.asynccontextmanager
async def _statuses(context, handler):
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except MeshError as error:
        status = to_status(error)
        # Trailing metadata the handler set before it failed travels with the status.
        trailing = (*(context.trailing_metadata() or ()), *status.trailing_metadata)
        await context.abort(status.code, status.details, trailing)
    except Exception:
        log.exception("bug in %s", handler.__qualname__)
        await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


@contextlib.asynccontextmanager
async def initial_metadata_meanwhile(context, metadata):
    """Sends a served call's initial metadata while the handler goes on with its work.

    ``context.send_initial_metadata`` waits until gRPC has written the headers; a handler with a hop or an
    engine to start need not wait for that before starting it. The block yields the send: a streaming
    handler awaits it before each message it yields (done, that costs nothing). Leaving the block waits
    for the send too, so neither a unary answer nor an error's status can race the headers; a send that
    failed (the caller went away) raises there, unless the block is already leaving with an error of its own.
    """
    sending = asyncio.ensure_future(context.send_initial_metadata(metadata))
    try:
        yield sending
    except BaseException:
        if not sending.done():
            await asyncio.wait([sending])
        if not sending.cancelled():
            sending.exception()  # retrieved: the block's own error is the one that goes on
        raise
    await sending
