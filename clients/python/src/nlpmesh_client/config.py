"""Where and how a client connects: from arguments, else the environment, else defaults.

    NLPMESH_ADDR      the gateway, host:port (default 127.0.0.1:50051)
    NLPMESH_API_KEY   sent as ``authorization: Bearer <key>``
    NLPMESH_CA        a PEM file of the CA that signed the gateway's certificate (default: the system's roots)

TLS is the default; plaintext only when ``plaintext=True`` is passed.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from nlpmesh_client.retry import RetryPolicy

ADDR_ENV, API_KEY_ENV, CA_ENV = "NLPMESH_ADDR", "NLPMESH_API_KEY", "NLPMESH_CA"
DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Config:
    address: str = DEFAULT_ADDRESS
    api_key: str | None = field(default=None, repr=False)  # never printed
    ca_file: Path | None = None
    plaintext: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S  # every call's deadline unless the call gives its own; retries included
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self):
        if not self.address:
            raise ValueError("address: empty (pass one or set NLPMESH_ADDR)")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s: must be positive")
        if self.plaintext and self.ca_file is not None:
            raise ValueError("plaintext with a CA file: choose one")

    @classmethod
    def resolve(cls, address: str | None = None, api_key: str | None = None, ca_file: str | Path | None = None,
                env: Mapping[str, str] | None = None, **rest) -> Config:
        """Each of address, api_key, ca_file from the argument, else its variable in ``env`` (os.environ)."""
        env = os.environ if env is None else env
        ca = ca_file or (None if rest.get("plaintext") else env.get(CA_ENV)) or None
        return cls(address=address or env.get(ADDR_ENV) or DEFAULT_ADDRESS,
                   api_key=api_key or env.get(API_KEY_ENV) or None,
                   ca_file=Path(ca) if ca else None, **rest)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials; None for plaintext."""
        if self.plaintext:
            return None
        roots = self.ca_file.read_bytes() if self.ca_file else None
        return grpc.ssl_channel_credentials(root_certificates=roots)

    def channel(self) -> grpc.Channel:
        credentials = self.credentials()
        return (grpc.insecure_channel(self.address) if credentials is None
                else grpc.secure_channel(self.address, credentials))

    def aio_channel(self) -> grpc.aio.Channel:
        credentials = self.credentials()
        return (grpc.aio.insecure_channel(self.address) if credentials is None
                else grpc.aio.secure_channel(self.address, credentials))
