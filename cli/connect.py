"""How a client reaches a gateway: its address, the transport (plaintext or TLS) and the API key.

Every client this repo ships (the CLI, the demo, the bench, the e2e tests) connects
through ``GatewayAccess``, so the trust settings of a mesh live in one value: the
channels it opens carry the key on every call without the caller passing it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from nlpmesh_client import Client, Config

AUTHORIZATION = "authorization"


@dataclass(frozen=True)
class GatewayAccess:
    address: str
    ca_file: Path | None = None  # TLS when set: the CA that signed the gateway's certificate
    api_key: str | None = None  # sent on every call as ``authorization: Bearer <key>``

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION, f"Bearer {self.api_key}"),) if self.api_key else ()

    def channel(self) -> grpc.Channel:
        channel = (grpc.secure_channel(self.address, self._credentials()) if self.ca_file
                   else grpc.insecure_channel(self.address))
        if not self.api_key:
            return channel
        return grpc.intercept_channel(channel, _MetadataAdder(self.metadata()))

    def aio_channel(self) -> grpc.aio.Channel:
        interceptors = [_AioMetadataAdder(self.metadata())] if self.api_key else None
        if self.ca_file:
            return grpc.aio.secure_channel(self.address, self._credentials(), interceptors=interceptors)
        return grpc.aio.insecure_channel(self.address, interceptors=interceptors)

    def client(self, timeout_s: float) -> Client:
        """nlpmesh-client on this access: TLS with its CA when set, else plaintext (a `--plaintext` mesh)."""
        return Client(config=Config(self.address, api_key=self.api_key, ca_file=self.ca_file,
                                    plaintext=self.ca_file is None, timeout_s=timeout_s))

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=Path(self.ca_file).read_bytes())

    def to_json(self) -> dict:
        """What a state file keeps of it (the key itself stays in its own file, never here)."""
        return {"address": self.address, "ca_file": str(self.ca_file) if self.ca_file else None}


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def _details_with(details, extra) -> _CallDetails:
    return _CallDetails(details.method, details.timeout, tuple(details.metadata or ()) + extra,
                        details.credentials, details.wait_for_ready, details.compression)


class _MetadataAdder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, extra: tuple[tuple[str, str], ...]):
        self._extra = extra

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_details_with(details, self._extra), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_details_with(details, self._extra), request)


class _AioMetadataAdder(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, extra: tuple[tuple[str, str], ...]):
        self._extra = extra

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._with(details), request)

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._with(details), request)

    def _with(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._extra)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)
