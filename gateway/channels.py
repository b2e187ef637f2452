"""The gateway's channels to the internal services: one set of options, reconnect backoff and TLS for all."""
from __future__ import annotations

import grpc

from gateway import balancing
from meshkit.server import channel_options


def open_channel(settings, credentials: grpc.ChannelCredentials | None, target: str, service: str,
                 tls_name: str | None = None) -> grpc.aio.Channel:
    """A channel to ``target`` under ``service``'s service config (gateway/balancing.py); under TLS,
    ``tls_name`` is the host name the server's certificate is checked against, when not the target's."""
    # A restarted service is reached again within seconds: gRPC's own reconnect backoff grows to 120 s.
    options = [*channel_options(settings.max_message_bytes),
               ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000),
               ("grpc.service_config", balancing.service_config(service)),
               # Ours, not one from DNS TXT records.
               ("grpc.service_config_disable_resolution", 1),
               ("grpc.enable_retries", 1)]
    if tls_name is not None and credentials is not None:
        options.append(("grpc.ssl_target_name_override", tls_name))
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)
